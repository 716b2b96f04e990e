"""Stage 3, reference init: the frozen reference and the trainable policy.

The reference is the stage-1 model, frozen. The policy is a copy of it (full
fine-tuning) or the same base with LoRA adapters (``dpo.lora``), whose zero-initialized
``B`` matrices make it start equal to the reference. Gate ``initial_kl``: the mean
per-token KL(π_θ ‖ π_ref) on the KL probe set (prompts + chosen responses of the first
``kl_monitor.probe_size`` held-out pairs), computed with the same function the stage-5
monitor uses (:func:`realign.metrics.per_token_kl` via
:func:`realign.backends.trl.kl_on_probe`). It must be below 1e-4 (all presets): a larger
value means the policy does not start at the reference (wrong weights, dropout left on,
a template mismatch), and every later KL number would be meaningless.
"""

from __future__ import annotations

from ..fileio import write_jsonl_atomic
from ..gates import StageVerdict, make_verdict
from ..kl_probe import probe_rows, save_reference_probe
from .context import RunContext

NAME = "reference_init"


def run(ctx: RunContext) -> StageVerdict:
    from ..backends.trl import TRLBackend, kl_on_probe, make_policy
    from ..backends.trl_train import quiet_hf

    quiet_hf()
    cfg = ctx.config
    out = ctx.stage_dir(NAME)
    base = ctx.base_model()
    backend = TRLBackend()
    ctx.progress(0, None, "loading reference")
    ref = backend.load(base, device=cfg.device)
    ref.model.eval()
    policy = make_policy(ref.model, cfg.dpo.lora)
    probe = probe_rows(ctx.artifacts("preference_data").heldout, cfg.kl_monitor.probe_size)
    write_jsonl_atomic(out / "kl_probe.jsonl", probe)
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
