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
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    gates = [ctx.thresholds.evaluate(
        "initial_kl", kl.mean,
        detail=f"mean per-token KL over {sum(kl.counts)} completion tokens of {len(probe)} probe "
               f"pairs; policy = {'LoRA on the reference' if cfg.dpo.lora else 'a copy of the reference'}")]
    artifacts = {"reference_model": base, "kl_probe": str(out / "kl_probe.jsonl"),
                 "policy": "lora" if cfg.dpo.lora else "copy", "trainable_parameters": trainable}
    findings = {"initial_kl_per_sequence": kl.per_sequence}
    return make_verdict(NAME, gates, ctx.thresholds, findings, artifacts)
