"""Stage 3, reference init: the frozen reference and the trainable policy.

The reference is the stage-1 model, frozen. The policy is a copy of it (full
fine-tuning) or the same base with LoRA adapters (``dpo.lora``), whose zero-initialized
``B`` matrices make it start equal to the reference. Both are built by the functions
below, which stage 5 calls too (:func:`load_reference`, :func:`build_policy`): same
model, device, dtype, LoRA setting and dropout handling, so stage 3 measures the policy
stage 5 starts training from.

Gate ``initial_kl``: the mean per-token KL(π_θ ‖ π_ref) on the KL probe set (prompts +
chosen responses of the first ``kl_monitor.probe_size`` held-out pairs), computed with
the function the stage-5 monitor uses (:func:`realign.backends.trl.kl_on_probe`), with
the policy in train mode, as the trainer's forward runs it (``as_trained``): a dropout
left on in training shows here. It must be below 1e-4 (all presets): a larger value
means the policy does not start at the reference (wrong weights, dropout left on, a
template mismatch), and every later KL number would be meaningless.

Also written: ``kl_probe.jsonl`` and the reference's statistics on it
(``reference_probe.json`` + ``.safetensors``, :func:`realign.kl_probe.save_reference_probe`),
recorded in the verdict relative to the run directory.

With ``backend: mlx`` the same construction and measurement run on MLX
(:func:`realign.backends.mlx.make_policy`, :func:`realign.backends.mlx.kl_on_probe`, same
definition and tokenization), in eval mode: mlx-lm models have no dropout outside LoRA's.
"""

from __future__ import annotations

from ..fileio import write_jsonl_atomic
from ..gates import StageVerdict, make_verdict
from ..kl_probe import probe_rows, save_reference_probe
from .context import RunContext, build_policy, load_reference

NAME = "reference_init"
#: Where stage 3 writes the reference statistics, relative to its stage folder.
REFERENCE_PROBE_FILE = "reference_probe.json"


def run(ctx: RunContext) -> StageVerdict:
    from ..backends.trl_train import quiet_hf

    quiet_hf()
    cfg = ctx.config
    out = ctx.stage_dir(NAME)
    base = ctx.base_model()
    mlx = ctx.backend_name == "mlx"
    backend = ctx.backend()
    ctx.progress(0, None, "loading reference")
    ref = load_reference(ctx, backend, base)
    policy = build_policy(ctx, ref)
    probe = probe_rows(ctx.artifacts("preference_data").heldout, cfg.kl_monitor.probe_size)
    write_jsonl_atomic(out / "kl_probe.jsonl", probe)
    ctx.progress(0, None, "measuring initial KL")
    prompts, chosen = [r["prompt"] for r in probe], [r["chosen"] for r in probe]
    if mlx:
        from mlx.utils import tree_flatten

        from ..backends.mlx import kl_on_probe as mlx_kl

        # mlx-lm models have no dropout outside LoRA's (0 unless dpo.lora sets it): the
        # policy is measured in eval mode, as the MLX KL monitor measures it
        kl = mlx_kl(policy, ref, prompts, chosen, batch_size=cfg.kl_monitor.batch_size,
                    max_length=cfg.dpo.max_length)
        trainable = sum(int(v.size) for _, v in tree_flatten(policy.model.trainable_parameters()))
        dtype, device, mode = ref.dtype, str(ref.device), "eval"
    else:
        import torch

        from ..backends.trl import kl_on_probe

        torch.manual_seed(cfg.seed)  # a dropout left on draws from the global RNG
        kl = kl_on_probe(policy, ref.model, prompts, chosen, tokenizer=ref.tokenizer,
                         batch_size=cfg.kl_monitor.batch_size, max_length=cfg.dpo.max_length,
                         as_trained=True)
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        dtype = str(next(policy.parameters()).dtype).replace("torch.", "")
        device, mode = ref.device.type, "train"
    ctx.progress(0, None, "reference probe statistics")
    ref_probe = out / REFERENCE_PROBE_FILE
    save_reference_probe(backend, ref, probe, ref_probe, max_length=cfg.dpo.max_length,
                         batch_size=cfg.kl_monitor.batch_size)
    gates = [ctx.thresholds.evaluate(
        "initial_kl", kl.mean,
        detail=f"mean per-token KL over {sum(kl.counts)} completion tokens of {len(probe)} probe "
               f"pairs; policy = {'LoRA on the reference' if cfg.dpo.lora else 'a copy of the reference'}"
               f", built as stage 5 builds it ({ctx.backend_name}, {device}, {dtype}), measured in "
               f"{mode} mode")]
    artifacts = {"reference_model": base, "kl_probe": str(out / "kl_probe.jsonl"),
                 "reference_probe": str(ref_probe.relative_to(ctx.run_dir)), "initial_kl": kl.mean,
                 "policy": "lora" if cfg.dpo.lora else "copy", "trainable_parameters": trainable}
    findings = {"initial_kl_per_sequence": kl.per_sequence,
                "backend": ctx.backend_findings(),
                "policy_build": {"lora": bool(cfg.dpo.lora), "device": device, "dtype": dtype,
                                 "mode": mode,
                                 "disable_dropout": bool(cfg.dpo.extra.get("disable_dropout", True))}}
    return make_verdict(NAME, gates, ctx.thresholds, findings, artifacts)
