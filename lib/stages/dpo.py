"""Stage 5, DPO optimization with a live KL monitor, gated on held-out data.

Training is one DPO round (:func:`realign.dpo_round.run_round`, which stage 6 runs too):
TRL's ``DPOTrainer`` through :mod:`realign.backends.trl_train`, which adds a
content-addressed cache of the precomputed reference log-probs and crash-safe
checkpoints. The reference and the policy are built by stage 3's functions
(:func:`realign.stages.context.load_reference`, ``build_policy``), so stage 3's
``initial_kl`` measured this construction.
:class:`realign.kl_monitor.KLMonitor`, a ``transformers`` callback, checks the policy every ``kl_monitor.every`` optimizer steps
(and at the first and last step) on the KL probe written by stage 3:

* KL: mean per-token KL(π_θ ‖ π_ref) over the probe's completion tokens, exact over the
  vocabulary (:func:`realign.backends.trl.kl_on_probe` semantics), and the mean
  sequence-level sum;
* held-out DPO implicit reward margin on the same probe pairs:
  ``m_i = β·[(log π_θ(c_i) − log π_ref(c_i)) − (log π_θ(r_i) − log π_ref(r_i))]``;
  reported: mean margin (with a 95% normal CI) and accuracy = share with ``m_i > 0``.

Each check is appended to ``metrics.jsonl`` beside TRL's own logged metrics
(``loss``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ...) and sent
to the configured ``report_to`` trackers.

On a breach (KL above the ``kl_divergence`` threshold) the monitor acts by
``kl_monitor.on_breach``:

* ``rollback`` (default): restore the weights of the last check that passed, reset the
  optimizer moments, halve the learning rate, continue;
* ``halve_lr``: halve the learning rate and continue from where it is;
* ``stop``: stop training.

After ``max_breaches`` breaches training stops. The final model is the checkpoint that
passed the KL gate with the highest probe margin (not simply the last one); the
reference itself (step 0, margin 0) is the fallback, which fails ``reward_margin``.

A killed run resumes from the newest *complete* checkpoint (partial ones are removed) with
the monitor's history and best passing check as of that checkpoint.

Detectors (warnings with a suggested fix, never silent):

* likelihood displacement: ``logps/chosen`` falling while ``rewards/margins`` rise;
* saturation: held-out accuracy 1.0 with training loss near 0;
* length exploitation: the policy's greedy answers to the probe prompts grow longer than
  the reference's.

Gates, on the selected (saved) model and held-out rows the selection never saw
(:func:`realign.kl_probe.gate_rows`: held-out pairs after the probe, prompts not in it;
in generation mode the KL gate's prompts also come from the held-out prompts that gave
no pair, :func:`realign.kl_probe.gate_prompts`),
by :func:`realign.kl_monitor.measure_heldout`:

* ``kl_divergence``: mean per-token KL(π ‖ π_ref), exact over the vocabulary, along
  responses sampled from π (temperature 1, seeded) for ``kl_monitor.gate_prompts``
  prompts; the teacher-forced figure and the sequence-level sum beside it;
* ``reward_margin``: mean implicit reward margin (95% CI) on ``kl_monitor.gate_pairs``
  pairs.

No held-out rows outside the probe: both are ``unmeasured``.

Backend (``backend``): with ``mlx`` the round is :func:`realign.dpo_round_mlx.run_round`
(:class:`realign.backends.mlx_dpo.MLXDPOTrainer` under the same monitor, breach policy,
selection and resume rules) and the gates are measured on MLX with the same definitions;
the model is saved as a safetensors folder both backends load (LoRA merged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..distributed import is_main_process
from ..dpo_round import mean_words as _mean_words  # noqa: F401  (kept for callers)
from ..dpo_round import phase as _phase
from ..dpo_round_mlx import round_runner
from ..dpo_round import train_dataset as _train_dataset  # noqa: F401  (benchmarks/bench_dpo.py)
from ..fileio import file_digest, read_jsonl, write_json_atomic
from ..gates import GateResult, StageVerdict, make_verdict
from ..kl_monitor import measure_heldout
from ..generation import read_prompt_rows
from ..kl_probe import gate_prompts as select_gate_prompts
from ..kl_probe import gate_rows, load_reference_probe
from .context import RunContext, build_policy, load_reference

NAME = "dpo"


def run(ctx: RunContext) -> StageVerdict:
    from ..backends.trl_train import quiet_hf

    quiet_hf()
    cfg, d = ctx.config, ctx.config.dpo
    out = ctx.stage_dir(NAME)
    mlx = ctx.backend_name == "mlx"
    if mlx:
        from ..backends.mlx import mx

        mx.random.seed(cfg.seed)
    else:
        import torch

        torch.manual_seed(cfg.seed)
    backend = ctx.backend()
    s2, s3 = ctx.artifacts("preference_data"), ctx.artifacts("reference_init")
    base = s3.reference_model or ctx.base_model()
    train_path, probe_path = s2.train, s3.kl_probe
    if not train_path or not probe_path:
        raise RuntimeError("stage 5 needs stages 2 (train split) and 3 (KL probe) to have run")
    train_rows = read_jsonl(Path(train_path))
    probe = read_jsonl(Path(probe_path))
    # the gates' held-out rows: after the probe, no probe prompt (never used for selection)
    heldout_rest = gate_rows(read_jsonl(Path(s2.heldout)), probe) if s2.heldout else []
    gate_pairs = heldout_rest[:cfg.kl_monitor.gate_pairs]
    extra = ([r.prompt for r in read_prompt_rows(s2.heldout_prompts)]
             if s2.heldout_prompts and Path(s2.heldout_prompts).is_file() else [])
    gate_prompts = select_gate_prompts(heldout_rest, extra, probe, cfg.kl_monitor.gate_prompts)

    timings: dict[str, float] = {}
    ctx.progress(0, None, "loading reference and policy")
    with _phase(timings, "load"):
        ref = load_reference(ctx, backend, base)
        policy = build_policy(ctx, ref)
    threshold = ctx.thresholds.get("kl_divergence")
    # from inside the run directory only, never a pickle; missing: recomputed
    reference_probe = (load_reference_probe(s3.reference_probe, ctx.run_dir, missing_ok=True,
                                            framework="numpy" if mlx else "pt")
                       if s3.reference_probe else None)
    rnd = round_runner(ctx.backend_name)(backend=backend, ref=ref, policy=policy, train_rows=train_rows, probe=probe,
                    folder=out, metrics_path=ctx.rundir.metrics_path(NAME), run_dir=ctx.run_dir,
                    dpo=d, kl_monitor=cfg.kl_monitor, seed=cfg.seed, threshold=threshold,
                    reference_probe=reference_probe, initial_kl=s3.initial_kl,
                    initial_threshold=ctx.thresholds.get("initial_kl"),
                    progress=ctx.progress, timings=timings)
    monitor, trainer, final, model = rnd.monitor, rnd.trainer, rnd.final, rnd.model

    if mlx:
        from ..backends.mlx import merge

        handle = policy  # its model holds the selected weights
        if d.lora:
            handle = merge(handle)
        handle.model.eval()
    else:
        if d.lora:
            model = model.merge_and_unload()
        handle = type(ref)(model=model, tokenizer=ref.tokenizer, device=ref.device, source="dpo")

    # the gates: the selected model on held-out rows outside the probe
    ctx.progress(0, None, "held-out gates: sampling from the selected model")
    with _phase(timings, "heldout_gates"):
        held = measure_heldout(backend, handle, ref, prompts=gate_prompts, pairs=gate_pairs,
                               beta=d.beta, max_new_tokens=cfg.kl_monitor.gate_max_new_tokens,
                               seed=cfg.seed, batch_size=cfg.kl_monitor.batch_size,
                               max_length=d.max_length)

    saved = out / "model"
    if is_main_process():
        with _phase(timings, "save"):
            backend.save(handle, saved)
            write_json_atomic(out / "checks.json", monitor.checks)

    warnings = list(rnd.warnings)
    gates: list[GateResult] = [_kl_gate(ctx, held, final, len(heldout_rest), len(probe)),
                               _margin_gate(ctx, held, final, d.beta, len(heldout_rest), len(probe))]
    train_seconds = rnd.train_seconds
    steps_per_s = rnd.global_step / train_seconds if train_seconds > 0 else None
    findings = {
        "backend": ctx.backend_findings(),
        "checks": monitor.checks, "breach_actions": monitor.actions,
        "selected_step": final["step"], "global_step": rnd.global_step,
        "heldout_gates": {**held, "probe_pairs": len(probe), "heldout_outside_probe": len(heldout_rest),
                          "probe_check_at_selection": {k: final.get(k) for k in (
                              "kl", "kl_sequence_mean", "heldout_margin", "heldout_accuracy")}},
        "resumed_from_step": monitor.resumed_from,
        "length_probe": {"reference_words": rnd.ref_words, "policy_words": rnd.policy_words},
        "ref_logp_cache": rnd.cache,
        "lm_head_positions": getattr(trainer, "lm_head_positions", None),
        "train_seconds": train_seconds,
        "examples_per_second": (steps_per_s * d.batch_size * d.gradient_accumulation_steps
                                if steps_per_s else None),
    }
    with _phase(timings, "digest"):
        artifacts = {"model": str(saved),
                     "model_digest": file_digest(saved) if is_main_process() else None,
                     "metrics": str(ctx.rundir.metrics_path(NAME))}
    findings["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return make_verdict(NAME, gates, ctx.thresholds, findings, artifacts, warnings)


def _none_outside(n_outside: int, n_probe: int) -> str:
    return (f"no held-out pair outside the KL probe ({n_probe} pairs, {n_outside} after it with "
            "another prompt): the gate would reread the set the checkpoint was selected on. Raise "
            "heldout.min_pairs / heldout.fraction or lower kl_monitor.probe_size")


def _kl_gate(ctx: RunContext, held: dict[str, Any], final: dict[str, Any], n_outside: int,
             n_probe: int) -> GateResult:
    """kl_divergence: per-token KL along responses sampled from the selected model."""
    s, tf = held["sampled"], held["teacher_forced"]
    if s is None:
        return ctx.thresholds.evaluate("kl_divergence", None, detail=_none_outside(n_outside, n_probe))
    beside = (f"; teacher-forced on {tf['pairs']} held-out chosen responses {tf['kl']:.4f}"
              if tf else "")
    return ctx.thresholds.evaluate(
        "kl_divergence", s["kl"],
        detail=f"selected model (step {final['step']}): mean per-token KL(policy || reference), exact "
               f"over the vocabulary, along {s['tokens']} tokens of responses sampled from the policy "
               f"(temperature 1, seed {s['seed']}, at most {s['max_new_tokens']} tokens) for "
               f"{s['prompts']} held-out prompts outside the KL probe; sequence sum mean "
               f"{s['kl_sequence_mean']:.4f} nats{beside}; probe check at selection {final['kl']:.4f}")


def _margin_gate(ctx: RunContext, held: dict[str, Any], final: dict[str, Any], beta: float,
                 n_outside: int, n_probe: int) -> GateResult:
    """reward_margin: mean implicit reward margin of the selected model on held-out pairs."""
    m = held["margin"]
    if m is None:
        return ctx.thresholds.evaluate("reward_margin", None, detail=_none_outside(n_outside, n_probe))
    return ctx.thresholds.evaluate(
        "reward_margin", m["mean"], ci95=(m["ci95"][0], m["ci95"][1]),
        detail=f"selected model (step {final['step']}): mean DPO implicit reward margin (beta {beta}) "
               f"on {m['pairs']} held-out pairs outside the KL probe; accuracy {m['accuracy']:.2f}; "
               f"on the probe at selection {final['heldout_margin']:.4f}")
