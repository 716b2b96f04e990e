"""Stage 3, reference init: the frozen reference and the trainable policy.

The reference is the stage-1 model, frozen. The policy is a copy of it (full
fine-tuning) or the same base with LoRA adapters (``dpo.lora``), whose zero-initialized
``B`` matrices make it start equal to the reference. Gate ``initial_kl``: the mean
per-token KL(π_θ ‖ π_ref) on the KL probe set (prompts + chosen responses of the first
``kl_monitor.probe_size`` held-out pairs), computed with the same function the stage-5
monitor uses (:func:`realign.training_metrics.per_token_kl` via
:func:`realign.backends.trl.kl_on_probe`). It must be below 1e-4 (all presets): a larger
value means the policy does not start at the reference (wrong weights, dropout left on,
a template mismatch), and every later KL number would be meaningless.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..gates import StageVerdict, make_verdict
from ..models import resolve_model
from ..pipeline import RunContext
from .common import read_jsonl, write_jsonl

NAME = "reference_init"


def make_policy(ref_model, lora: dict | None):  # type: ignore[no-untyped-def]
    """A trainable policy starting at the reference: a deep copy, or LoRA on a copy."""
    policy = copy.deepcopy(ref_model)
    for p in policy.parameters():  # the reference may be frozen; the copy trains
        p.requires_grad_(True)
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **lora))
    policy.train()
    return policy


def probe_rows(ctx: RunContext) -> list[dict]:
    held = ctx.artifact("preference_data", "heldout")
    if not held:
        raise RuntimeError("stage 2 (preference_data) has no held-out split; run it first")
    return read_jsonl(Path(held))[: ctx.config.kl_monitor.probe_size]


#: Cache the reference's full next-token distributions on the probe when they fit in this
#: many bytes (tokens × vocabulary × 4); otherwise stage 5 runs the reference at each check.
REF_DIST_MAX_BYTES = 512 << 20
#: The length-exploitation probe: greedy answers to this many probe prompts, capped.
LENGTH_PROBE_PROMPTS = 4
LENGTH_PROBE_TOKENS = 48


def save_reference_probe(backend, ref, probe: list[dict], path: Path, *, max_length: int,  # type: ignore[no-untyped-def]
                         batch_size: int) -> None:
    """Everything stage 5 needs from the frozen reference on the probe, computed once:
    log π_ref of each chosen and rejected response (for held-out margins), the full
    next-token log-distributions on the chosen responses (for exact KL without a
    reference forward pass per check, when they fit :data:`REF_DIST_MAX_BYTES`), and the
    reference's greedy answers to the first probe prompts (for the length detector).
    Written atomically with ``torch.save``.
    """
    import os
    import tempfile

    import torch

    from ..backends.trl import encode_pair, reference_distributions

    tok = ref.tokenizer
    chosen = [encode_pair(tok, r["prompt"], r["chosen"], max_length) for r in probe]
    rejected = [encode_pair(tok, r["prompt"], r["rejected"], max_length) for r in probe]
    data = {
        "max_length": max_length,
        "ref_chosen": backend.completion_logprobs(ref, [], [], encoded=chosen, batch_size=batch_size).sums,
        "ref_rejected": backend.completion_logprobs(ref, [], [], encoded=rejected, batch_size=batch_size).sums,
        "answers": backend.generate(ref, [r["prompt"] for r in probe[:LENGTH_PROBE_PROMPTS]],
                                    max_new_tokens=LENGTH_PROBE_TOKENS),
        "distributions": None,
    }
    vocab = int(getattr(ref.model.config, "vocab_size", 0) or 0)
    if 0 < sum(e.n_completion for e in chosen) * vocab * 4 <= REF_DIST_MAX_BYTES:
        data["distributions"] = reference_distributions(ref, chosen, batch_size=batch_size).logps
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    torch.save(data, tmp)
    os.replace(tmp, path)


def run(ctx: RunContext) -> StageVerdict:
    from ..backends.trl import TRLBackend, kl_on_probe
    from ..backends.trl_train import quiet_hf

    quiet_hf()
    cfg = ctx.config
    out = ctx.stage_dir(NAME)
    base = ctx.artifact("sft_baseline", "model") or str(resolve_model(cfg.model))
    backend = TRLBackend()
    ctx.progress(0, None, "loading reference")
    ref = backend.load(base, device=cfg.device)
    ref.model.eval()
    policy = make_policy(ref.model, cfg.dpo.lora)
    probe = probe_rows(ctx)
    write_jsonl(out / "kl_probe.jsonl", probe)
    ctx.progress(0, None, "measuring initial KL")
    kl = kl_on_probe(policy, ref.model, [r["prompt"] for r in probe], [r["chosen"] for r in probe],
                     tokenizer=ref.tokenizer, batch_size=cfg.kl_monitor.batch_size,
                     max_length=cfg.dpo.max_length)
    ctx.progress(0, None, "reference probe statistics")
    ref_probe = out / "reference_probe.pt"
    save_reference_probe(backend, ref, probe, ref_probe, max_length=cfg.dpo.max_length,
                         batch_size=cfg.kl_monitor.batch_size)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    gates = [ctx.thresholds.evaluate(
        "initial_kl", kl.mean,
        detail=f"mean per-token KL over {sum(kl.counts)} completion tokens of {len(probe)} probe "
               f"pairs; policy = {'LoRA on the reference' if cfg.dpo.lora else 'a copy of the reference'}")]
    artifacts = {"reference_model": base, "kl_probe": str(out / "kl_probe.jsonl"),
                 "reference_probe": str(ref_probe), "initial_kl": kl.mean,
                 "policy": "lora" if cfg.dpo.lora else "copy", "trainable_parameters": trainable}
    findings = {"initial_kl_per_sequence": kl.per_sequence}
    return make_verdict(NAME, gates, ctx.thresholds, findings, artifacts)
