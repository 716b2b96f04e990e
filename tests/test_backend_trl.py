"""The TRL backend on a tiny random llama: log-probs, batching, generation, save/load."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from realign.backends import get_backend  # noqa: E402
from realign.backends.base import Backend  # noqa: E402
from realign.backends.trl import ModelHandle, TRLBackend, encode_pair  # noqa: E402
from realign.errors import InputError  # noqa: E402

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling in a quiet forest at dusk.",
    "2+2?",
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a color."}],
    "Explain DPO in one sentence.",
]
COMPLETIONS = [
    "Paris.",
    "Red leaves drift and fall / the forest holds its breath now / dusk settles softly.",
    "4",
    [{"role": "assistant", "content": "Blue."}],
    "It fits a policy to preference pairs with a classification loss against a frozen reference.",
]


@pytest.fixture(scope="module")
def backend() -> TRLBackend:
    return TRLBackend()


@pytest.fixture(scope="module")
def handle(backend, tiny_model_path) -> ModelHandle:
    return backend.load(tiny_model_path, device="cpu")


def test_backend_satisfies_protocol(backend):
    assert isinstance(backend, Backend)
    assert isinstance(get_backend("trl"), TRLBackend)
    with pytest.raises(InputError):
        get_backend("nope")


def test_load_picks_cpu_float32(handle):
    assert handle.device.type == "cpu" and handle.model.dtype == torch.float32
    assert handle.has_chat_template and handle.tokenizer.pad_token_id is not None
    assert not handle.model.training


def test_load_unknown_hub_id_offline_is_input_error(backend, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as exc:
        backend.load("nobody-here/no-such-model-xyz", device="cpu")
    assert "no-such-model-xyz" in str(exc.value)


def test_encode_pair_splits_at_the_assistant_turn(handle):
    tok = handle.tokenizer
    enc = encode_pair(tok, "hi", "hello there")
    prompt_text = tok.decode(enc.input_ids[: enc.start])
    completion_text = tok.decode(enc.input_ids[enc.start:])
    assert prompt_text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert completion_text == "hello there<|im_end|>\n"
    # a string prompt is the same as a one-message conversation
    enc2 = encode_pair(tok, [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello there"}])
    assert enc2 == enc


def test_encode_pair_truncation_keeps_prompt_end_and_completion_start(handle):
    tok = handle.tokenizer
    full = encode_pair(tok, "a " * 50, "b " * 50)
    cut = encode_pair(tok, "a " * 50, "b " * 50, max_length=40)
    assert len(cut.input_ids) == 40
    assert cut.input_ids[cut.start:] == full.input_ids[full.start:][: 40 - cut.start]
    assert cut.input_ids[: cut.start] == full.input_ids[: full.start][-cut.start:]
    tiny = encode_pair(tok, "a " * 50, "b " * 50, max_length=10)
    assert len(tiny.input_ids) == 10 and tiny.start == 1


def _direct_logprobs(handle, prompt, completion):
    """log p of completion tokens from one unpadded forward, computed independently."""
    enc = encode_pair(handle.tokenizer, prompt, completion)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logits = handle.model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[t - 1, ids[0, t]]) for t in range(enc.start, len(enc.input_ids))]


def test_logprobs_match_a_direct_forward(backend, handle):
    lp = backend.completion_logprobs(handle, PROMPTS, COMPLETIONS, batch_size=3)
    assert len(lp.token_logps) == len(PROMPTS)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        ref = _direct_logprobs(handle, p, c)
        assert len(lp.token_logps[i]) == len(ref) > 0
        assert lp.token_logps[i] == pytest.approx(ref, abs=1e-4)
        assert all(v <= 0 for v in lp.token_logps[i])
    # a random model over 49152 tokens is near-uniform: mean log p ≈ −log(49152) ≈ −10.8
    mean = sum(lp.sums) / sum(lp.counts)
    assert -12.5 < mean < -9.5


def test_logprobs_independent_of_batch_composition(backend, handle):
    one = backend.completion_logprobs(handle, PROMPTS, COMPLETIONS, batch_size=1)
    many = backend.completion_logprobs(handle, PROMPTS, COMPLETIONS, batch_size=5)
    # same examples in a different order / with different neighbours
    rev = backend.completion_logprobs(handle, PROMPTS[::-1], COMPLETIONS[::-1], batch_size=2)
    for i in range(len(PROMPTS)):
        assert many.token_logps[i] == pytest.approx(one.token_logps[i], abs=1e-4)
        assert rev.token_logps[len(PROMPTS) - 1 - i] == pytest.approx(one.token_logps[i], abs=1e-4)


def test_logprobs_without_chat_template(backend, tiny_model_path):
    h = backend.load(tiny_model_path, device="cpu")
    h.tokenizer.chat_template = None
    enc = encode_pair(h.tokenizer, "hello", "world")
    assert enc.input_ids[-1] == h.tokenizer.eos_token_id
    assert h.tokenizer.decode(enc.input_ids[enc.start:]) == "world<|im_end|>"
    lp = backend.completion_logprobs(h, ["hello"], ["world"])
    assert lp.counts == [enc.n_completion]


def test_generate_greedy_is_deterministic_and_batch_independent(backend, handle):
    prompts = PROMPTS[:4]
    a = backend.generate(handle, prompts, max_new_tokens=6, batch_size=4)
    b = backend.generate(handle, prompts, max_new_tokens=6, batch_size=1)
    assert a == b and len(a) == 4 and all(isinstance(x, str) for x in a)
    # greedy continuation equals the argmax chain of a direct forward
    from realign.backends.trl import encode_prompt

    ids = encode_prompt(handle.tokenizer, prompts[0])
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(6):
            nxt = handle.model(input_ids=x).logits[0, -1].argmax()
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
            if int(nxt) == handle.tokenizer.eos_token_id:
                break
    assert a[0] == handle.tokenizer.decode(x[0, len(ids):], skip_special_tokens=True)


def test_generate_sampled_uses_seed(backend, handle):
    a = backend.generate(handle, PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=3)
    b = backend.generate(handle, PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=3)
    c = backend.generate(handle, PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=4)
    assert a == b and a != c


def test_save_load_round_trip(backend, handle, tmp_path):
    out = backend.save(handle, tmp_path / "saved")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    again = backend.load(out, device="cpu")
    a = backend.completion_logprobs(handle, PROMPTS[:2], COMPLETIONS[:2])
    b = backend.completion_logprobs(again, PROMPTS[:2], COMPLETIONS[:2])
    assert a.token_logps == b.token_logps
    # saving over an existing directory replaces it atomically
    with torch.no_grad():
        again.model.model.norm.weight.mul_(2.0)
    backend.save(again, out)
    third = backend.load(out, device="cpu")
    assert torch.equal(third.model.model.norm.weight, again.model.model.norm.weight)


def test_scoring_restores_train_mode(backend, handle):
    handle.model.train()
    try:
        backend.completion_logprobs(handle, PROMPTS[:1], COMPLETIONS[:1])
        assert handle.model.training
    finally:
        handle.model.eval()


def test_dpo_with_every_prompt_over_max_length_is_a_clear_error(tiny_model_path, tmp_path):
    """TRL silently drops pairs whose prompt fills max_length; when that leaves nothing the
    stage says which setting to raise instead of crashing inside TRL."""
    from realign.config import RunConfig
    from realign.errors import InputError
    from realign.pipeline import create_run, run_stages

    rows = [{"prompt": f"Question {i}: " + "please explain this in detail " * 6,
             "chosen": "A good answer." if i % 2 else "Yes.",
             "rejected": "No." if i % 2 else "A poor answer here."} for i in range(40)]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = create_run(RunConfig(model=str(tiny_model_path), data=str(data),
                               output_dir=str(tmp_path / "runs"), thresholds={"min_pairs": 10},
                               dpo={"max_steps": 2, "batch_size": 2, "max_length": 24},
                               kl_monitor={"probe_size": 2, "batch_size": 2}))
    st = run_stages(run, stages=["preference_data", "reference_init"])
    assert [s.status for s in st.stages if s.name == "reference_init"] == ["pass"], st
    with pytest.raises(InputError, match="raise dpo.max_length"):
        run_stages(run, stages=["dpo"])
