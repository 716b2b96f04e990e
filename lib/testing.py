"""Test helpers: a tiny randomly initialized model of the default model's family.

``tiny_model()`` builds a ``LlamaForCausalLM`` (the SmolLM2 architecture: RMSNorm,
SwiGLU, grouped-query attention, tied embeddings) with a few thousand hidden units in
all, gives it the real SmolLM2 tokenizer (vocabulary 49152 and its ChatML template) and
saves it to disk. It loads and runs in well under a second on a CPU, so integration
tests exercise the real code paths (chat templates, padding, TRL trainers) quickly.
Its outputs are random: tests must check relations (padding independence, KL ≈ 0 for a
model with itself, ...), never that it says something sensible.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
}

_cache: dict[tuple[int], Path] = {}
_tmpdirs: list[tempfile.TemporaryDirectory[str]] = []


def tiny_model(path: Path | None = None, *, seed: int = 0) -> Path:
    """Build and save a tiny random Llama with the SmolLM2 tokenizer; return its directory.

    With ``path=None`` the model goes to a temporary directory that lives as long as the
    process, and the result is cached per ``seed``: repeated calls cost nothing. With a
    ``path`` it is (re)built there. Same ``seed`` → bit-identical weights.
    """
    if path is None and (seed,) in _cache:
        return _cache[(seed,)]
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from .models import default_tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_tokenizer_path()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="realign-tiny-")
        _tmpdirs.append(tmp)  # removed at interpreter exit
        out = Path(tmp.name) / f"tiny-llama-seed{seed}"
    else:
        out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if path is None:
        _cache[(seed,)] = out
    return out
