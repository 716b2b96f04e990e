"""Stage 5, DPO optimization with a live KL monitor, gated on held-out data.

Training is TRL's ``DPOTrainer`` (through :mod:`realign.backends.trl_train`, which adds a
content-addressed cache of the precomputed reference log-probs and crash-safe
checkpoints). The reference and the policy are built by stage 3's functions
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
(:func:`realign.kl_probe.gate_rows`: held-out pairs after the probe, prompts not in it),
by :func:`realign.kl_monitor.measure_heldout`:

* ``kl_divergence``: mean per-token KL(π ‖ π_ref), exact over the vocabulary, along
  responses sampled from π (temperature 1, seeded) for ``kl_monitor.gate_prompts``
  prompts; the teacher-forced figure and the sequence-level sum beside it;
* ``reward_margin``: mean implicit reward margin (95% CI) on ``kl_monitor.gate_pairs``
  pairs.

No held-out rows outside the probe: both are ``unmeasured``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..distributed import barrier, is_main_process, world_size
from ..fileio import file_digest, read_jsonl, write_json_atomic
from ..gates import GateResult, StageVerdict, make_verdict
from ..kl_monitor import (
    LENGTH_GROWTH,
    SATURATION_LOSS,
    KLMonitor,
    detect_displacement,
    measure_heldout,
)
from ..kl_probe import (
    LENGTH_PROBE_PROMPTS,
    LENGTH_PROBE_TOKENS,
    distinct_prompts,
    gate_rows,
    load_reference_probe,
)
from ..rundir import metrics_log
from .context import RunContext, build_policy, load_reference

NAME = "dpo"

@contextmanager
def _phase(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``timings[name]`` (the stage's time breakdown)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _train_dataset(rows: list[dict[str, Any]], n: int | None, seed: int) -> Any:
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"],
                             "rejected": r["rejected"]} for r in rows])
    if n is not None and n < len(ds):
        ds = ds.shuffle(seed=seed).select(range(n)).flatten_indices()
    return ds


def _mean_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)


def run(ctx: RunContext) -> StageVerdict:
    import torch

    from ..backends.trl import TRLBackend
    from ..backends.trl_train import (
        dpo_config,
        make_dpo_trainer_class,
        quiet_hf,
        resume_checkpoint,
    )

    quiet_hf()
    cfg, d = ctx.config, ctx.config.dpo
    out = ctx.stage_dir(NAME)
    torch.manual_seed(cfg.seed)
    backend = TRLBackend()
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
    gate_prompts = distinct_prompts(heldout_rest, cfg.kl_monitor.gate_prompts)

    timings: dict[str, float] = {}
    ctx.progress(0, None, "loading reference and policy")
    with _phase(timings, "load"):
        ref = load_reference(ctx, backend, base)
        policy = build_policy(ctx, ref.model)
    threshold = ctx.thresholds.get("kl_divergence")
    warnings: list[str] = []
    ckpt_root = out / "checkpoints"
    resume_from, incomplete = resume_checkpoint(ckpt_root, remove_incomplete=is_main_process())
    barrier()
    if incomplete:
        warnings.append(f"removed incomplete checkpoint(s) {', '.join(incomplete)} (a save was cut "
                        f"short); {'resumed from ' + resume_from.name if resume_from else 'started over'}")

    with metrics_log(ctx.rundir.metrics_path(NAME)) as log:
        with _phase(timings, "monitor_init"):
            # from inside the run directory only, never a pickle; missing: recomputed
            reference_probe = (load_reference_probe(s3.reference_probe, ctx.run_dir, missing_ok=True)
                               if s3.reference_probe else None)
            monitor = KLMonitor(backend=backend, ref=ref, probe=probe, beta=d.beta, threshold=threshold,
                                every=cfg.kl_monitor.every, on_breach=cfg.kl_monitor.on_breach,
                                max_breaches=cfg.kl_monitor.max_breaches,
                                batch_size=cfg.kl_monitor.batch_size, max_length=d.max_length,
                                log=log, progress=ctx.progress, reference_probe=reference_probe,
                                initial_kl=s3.initial_kl,
                                initial_threshold=ctx.thresholds.get("initial_kl"),
                                reference_weights=None if d.lora else dict(ref.model.named_parameters()),
                                state_dir=out)
            if resume_from is not None:
                monitor.load_checkpoint_state(resume_from, ctx.run_dir)
        length_prompts = [r["prompt"] for r in probe[:LENGTH_PROBE_PROMPTS]]
        ref_answers = monitor.ref_answers

        world = world_size()
        needed = d.max_steps * d.batch_size * d.gradient_accumulation_steps * world \
            if d.max_steps > 0 else None
        dataset = _train_dataset(train_rows, needed, cfg.seed)
        if world > 1:
            # TRL keeps precomputed reference log-probs beside the dataset's cache files;
            # an in-memory dataset has them in a per-process temp folder, which the other
            # ranks cannot read. A dataset on disk is shared by all ranks.
            from datasets import load_from_disk

            if is_main_process():
                dataset.save_to_disk(str(out / "train_dataset"))
            barrier()
            dataset = load_from_disk(str(out / "train_dataset"))
        args = dpo_config(ckpt_root, beta=d.beta, loss_type=d.loss_type,
                          learning_rate=d.learning_rate, batch_size=d.batch_size,
                          gradient_accumulation_steps=d.gradient_accumulation_steps,
                          max_steps=d.max_steps, num_epochs=d.num_epochs, max_length=d.max_length,
                          seed=cfg.seed, save_every=d.save_every, warmup_steps=d.warmup_steps,
                          report_to=d.report_to, use_cpu=(ref.device.type == "cpu") or None,
                          extra=d.extra)
        trainer_cls = make_dpo_trainer_class()
        t0 = time.perf_counter()
        # The frozen reference we hold anyway is TRL's ref_model (one process, no LoRA):
        # the precompute then runs it, not the policy, and no second copy is loaded.
        # (with several processes TRL would shard a passed reference under FSDP/ZeRO-3)
        trainer = trainer_cls(model=policy,
                              ref_model=ref.model if world == 1 and not d.lora else None,
                              args=args, train_dataset=dataset, processing_class=ref.tokenizer,
                              callbacks=[monitor.callback()],
                              checkpoint_hooks=[monitor.save_checkpoint_state],
                              ref_progress=lambda i, n: ctx.progress(i, n, "reference log-probs"))
        monitor.trainer = trainer
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl, not stdout
        cache = {"hit": trainer.ref_cache_hit, "path": str(getattr(trainer, "ref_cache_path", "")),
                 "precompute_seconds": trainer.ref_cache_seconds,
                 "method": trainer.ref_precompute_method}
        timings["ref_precompute"] = trainer.ref_cache_seconds  # 0.0 on a cache hit
        timings["trainer_init"] = time.perf_counter() - t0 - timings["ref_precompute"]
        t_train = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        train_seconds = time.perf_counter() - t0
        timings["kl_checks"] = monitor.check_seconds
        timings["train"] = time.perf_counter() - t_train - monitor.check_seconds

        model = trainer.model
        final: dict[str, Any]
        if monitor.best is not None:
            margin, step, weights = monitor.best
            monitor.restore(model, weights)
            final = next(c for c in monitor.checks if c["step"] == step and c["passed"])
        else:
            final = monitor.checks[-1]
            warnings.append("no check passed the KL gate: the final model is the last state")

        with _phase(timings, "length_probe"):
            policy_answers = backend.generate(
                type(ref)(model=model, tokenizer=ref.tokenizer, device=ref.device, source="policy"),
                length_prompts, max_new_tokens=LENGTH_PROBE_TOKENS)
        ref_len, pol_len = _mean_words(ref_answers), _mean_words(policy_answers)
        log({"event": "length_probe", "reference_words": ref_len, "policy_words": pol_len})

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

    # detectors
    w = detect_displacement(monitor.checks)
    if w:
        warnings.append(w)
    losses = [r["loss"] for r in monitor.trl_logs if "loss" in r]
    if any(c["heldout_accuracy"] >= 1.0 for c in monitor.checks[1:]) and losses \
            and min(losses[-3:]) < SATURATION_LOSS:
        warnings.append("saturation: held-out accuracy reached 1.0 with training loss near 0; "
                        "the policy can separate the pairs perfectly and will keep drifting. "
                        "Stop earlier, raise beta, or use loss_type: ipo / label smoothing.")
    if ref_len > 0 and pol_len > LENGTH_GROWTH * ref_len:
        warnings.append(f"length exploitation: greedy answers grew from {ref_len:.1f} to "
                        f"{pol_len:.1f} words on the probe prompts; check the length-bias gate of "
                        "stage 2, balance lengths, or use a length-normalized loss "
                        "(loss_type: ipo, or ld_alpha).")
    for a in monitor.actions:
        warnings.append(f"KL breach at step {a['step']} (KL {a['kl']:.4f} > {threshold:g}): "
                        f"{a['action']}")
    warnings.extend(monitor.warnings)

    gates: list[GateResult] = [_kl_gate(ctx, held, final, len(heldout_rest), len(probe)),
                               _margin_gate(ctx, held, final, d.beta, len(heldout_rest), len(probe))]
    steps_per_s = trainer.state.global_step / train_seconds if train_seconds > 0 else None
    findings = {
        "checks": monitor.checks, "breach_actions": monitor.actions,
        "selected_step": final["step"], "global_step": trainer.state.global_step,
        "heldout_gates": {**held, "probe_pairs": len(probe), "heldout_outside_probe": len(heldout_rest),
                          "probe_check_at_selection": {k: final.get(k) for k in (
                              "kl", "kl_sequence_mean", "heldout_margin", "heldout_accuracy")}},
        "resumed_from_step": monitor.resumed_from,
        "length_probe": {"reference_words": ref_len, "policy_words": pol_len},
        "ref_logp_cache": cache,
        "lm_head_positions": trainer.lm_head_positions,
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
