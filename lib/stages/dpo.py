"""Stage 5, DPO optimization with a live KL gate.

Training is TRL's ``DPOTrainer`` (through :mod:`realign.backends.trl_train`, which adds a
content-addressed cache of the precomputed reference log-probs). :class:`KLMonitor`, a
``transformers`` callback, checks the policy every ``kl_monitor.every`` optimizer steps
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
passed the KL gate with the highest held-out margin (not simply the last one); the
reference itself (step 0, margin 0) is the fallback, which fails ``reward_margin``.

Detectors (warnings with a suggested fix, never silent):

* likelihood displacement: ``logps/chosen`` falling while ``rewards/margins`` rise;
* saturation: held-out accuracy 1.0 with training loss near 0;
* length exploitation: the policy's greedy answers to the probe prompts grow longer than
  the reference's.

Gates: ``kl_divergence`` and ``reward_margin`` of the selected checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..gates import GateResult, StageVerdict, make_verdict
from ..models import resolve_model
from ..pipeline import RunContext, _barrier, file_digest, is_main_process, world_size, metrics_log, write_json_atomic
from .common import read_jsonl
from .reference_init import LENGTH_PROBE_PROMPTS, LENGTH_PROBE_TOKENS, make_policy

NAME = "dpo"

#: Detector settings (one home for these numbers).
DISPLACEMENT_MIN_DROP = 1.0  # nats: chosen log-prob must fall at least this much
SATURATION_LOSS = 0.05  # training loss below this with held-out accuracy 1.0
LENGTH_GROWTH = 1.2  # policy answers this many times longer than the reference's


def _slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0..n-1 (0 for fewer than 2 points)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx = (n - 1) / 2
    my = sum(ys) / n
    num = sum((i - mx) * (y - my) for i, y in enumerate(ys))
    den = sum((i - mx) ** 2 for i in range(n))
    return num / den


def detect_displacement(checks: list[dict[str, Any]]) -> str | None:
    """Warn when the policy's log-prob of the held-out chosen responses falls (by at least
    DISPLACEMENT_MIN_DROP nats per response, first check to last) while the held-out
    margin rises: the policy widens the margin by pushing both responses down.

    Measured on the fixed probe pairs, not on TRL's per-batch ``logps/chosen``, which
    varies with each batch's content.
    """
    if len(checks) < 2:
        return None
    lc = [c["heldout_chosen_logp"] for c in checks]
    mg = [c["heldout_margin"] for c in checks]
    drop = lc[0] - lc[-1]
    if drop >= DISPLACEMENT_MIN_DROP and mg[-1] > mg[0] and _slope(lc) < 0:
        return (f"likelihood displacement: the held-out chosen log-prob fell from {lc[0]:.2f} to "
                f"{lc[-1]:.2f} nats while the margin rose from {mg[0]:.3f} to {mg[-1]:.3f}; the "
                "policy lowers both responses. Try a lower learning rate or a larger beta, or "
                "add an NLL term on the chosen response (loss_type: sigmoid plus sft, or "
                "rpo_alpha).")
    return None


class KLMonitor:
    """The live KL gate. Built lazily as a ``transformers.TrainerCallback`` (see ``callback``)."""

    def __init__(self, *, backend: Any, ref: Any, probe: list[dict[str, Any]], beta: float,
                 threshold: float, every: int, on_breach: str, max_breaches: int,
                 batch_size: int, max_length: int, log: Any, progress: Any,
                 reference_probe: dict[str, Any] | None = None,
                 initial_kl: float | None = None,
                 reference_weights: dict[str, Any] | None = None) -> None:
        from ..backends.trl import ReferenceDistributions, encode_pair

        self.backend, self.ref = backend, ref
        self.beta, self.threshold, self.every = beta, threshold, every
        self.on_breach, self.max_breaches = on_breach, max_breaches
        self.batch_size, self.max_length = batch_size, max_length
        self.log, self.progress = log, progress
        self.initial_kl = initial_kl
        # the policy's step-0 weights when they are the frozen reference's (full fine-tuning):
        # held by reference instead of a second copy
        self.reference_weights = reference_weights
        tok = ref.tokenizer
        self.chosen_enc = [encode_pair(tok, r["prompt"], r["chosen"], max_length) for r in probe]
        self.rejected_enc = [encode_pair(tok, r["prompt"], r["rejected"], max_length) for r in probe]
        rp = reference_probe
        if rp is None or rp.get("max_length") != max_length:  # stage 3 did not precompute
            import tempfile

            from .reference_init import save_reference_probe

            with tempfile.TemporaryDirectory() as d:
                save_reference_probe(backend, ref, probe, Path(d) / "p.pt", max_length=max_length,
                                     batch_size=batch_size)
                import torch

                rp = torch.load(Path(d) / "p.pt", weights_only=False)
        self.ref_c, self.ref_r = rp["ref_chosen"], rp["ref_rejected"]
        self.ref_answers: list[str] = rp["answers"]
        self.ref_for_kl: Any = (ReferenceDistributions(logps=rp["distributions"])
                                if rp.get("distributions") is not None else ref.model)
        self.checks: list[dict[str, Any]] = []
        self.trl_logs: list[dict[str, float]] = []
        self.breaches = 0
        self.last_good: dict[str, Any] | None = None
        self.best: tuple[float, int, dict[str, Any]] | None = None  # (margin, step, weights)
        self.actions: list[dict[str, Any]] = []
        self.trainer: Any = None
        self.check_seconds = 0.0  # wall time spent in checks (measure + snapshot/restore)

    # -- measurement -------------------------------------------------------------
    def measure(self, model: Any, step: int) -> dict[str, Any]:
        from ..backends.trl import ModelHandle, kl_on_probe

        kl = kl_on_probe(model, self.ref_for_kl, encoded=self.chosen_enc,
                         tokenizer=self.ref.tokenizer, batch_size=self.batch_size)
        handle = ModelHandle(model=model, tokenizer=self.ref.tokenizer, device=self.ref.device,
                             source="policy")
        assert kl.policy_token_logps is not None  # same forward pass as the KL
        pol_c = [float(sum(x)) for x in kl.policy_token_logps]
        pol_r = self.backend.completion_logprobs(handle, [], [], encoded=self.rejected_enc,
                                                 batch_size=self.batch_size).sums
        margins = [self.beta * ((pc - rc) - (pr - rr))
                   for pc, rc, pr, rr in zip(pol_c, self.ref_c, pol_r, self.ref_r)]
        n = len(margins)
        mean = sum(margins) / n
        sd = math.sqrt(sum((m - mean) ** 2 for m in margins) / (n - 1)) if n > 1 else 0.0
        half = 1.96 * sd / math.sqrt(n) if n > 1 else 0.0
        return {
            "step": step, "kl": kl.mean,
            "kl_sequence_mean": sum(kl.per_sequence) / len(kl.per_sequence),
            "heldout_margin": mean, "heldout_margin_ci95": [mean - half, mean + half],
            "heldout_accuracy": sum(m > 0 for m in margins) / n,
            "heldout_chosen_logp": sum(pol_c) / n,
            "passed": kl.mean <= self.threshold,
        }

    def start_at_reference(self, model: Any) -> None:
        """Step 0: the policy is the reference (stage 3 measured its KL on this probe with
        the same function); its held-out margin is 0 by definition, no forward pass needed."""
        n = len(self.ref_c)
        rec = {"step": 0, "kl": float(self.initial_kl), "kl_sequence_mean": None,
               "heldout_margin": 0.0, "heldout_margin_ci95": [0.0, 0.0],
               "heldout_accuracy": 0.0, "heldout_chosen_logp": sum(self.ref_c) / n,
               "passed": float(self.initial_kl) <= self.threshold, "source": "stage 3"}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        rw = self.reference_weights
        weights = ({n: rw[n].detach() for n in trainable} if rw is not None and trainable <= rw.keys()
                   else self.snapshot(model))
        self.last_good = weights
        self.best = (0.0, 0, weights)
        self.checks.append(rec)
        self.log({"event": "kl_check", **rec})

    @staticmethod
    def snapshot(model: Any) -> dict[str, Any]:
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                if p.requires_grad}

    @staticmethod
    def restore(model: Any, weights: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in weights:
                    p.copy_(weights[n].to(p.device))

    # -- policy --------------------------------------------------------------------
    def check(self, model: Any, step: int, optimizer: Any = None, scheduler: Any = None,
              control: Any = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            return self._check(model, step, optimizer, scheduler, control)
        finally:
            self.check_seconds += time.perf_counter() - t0

    def _check(self, model: Any, step: int, optimizer: Any, scheduler: Any,
               control: Any) -> dict[str, Any]:
        rec = _from_rank0(self.measure(model, step))
        if rec["passed"]:
            weights = self.snapshot(model)
            self.last_good = weights
            if self.best is None or rec["heldout_margin"] > self.best[0]:
                self.best = (rec["heldout_margin"], step, weights)
        else:
            self.breaches += 1
            action = self.on_breach
            if self.breaches >= self.max_breaches:
                action = "stop"
            if action == "rollback" and self.last_good is not None:
                self.restore(model, self.last_good)
                if optimizer is not None:
                    optimizer.state.clear()
            if action in ("rollback", "halve_lr"):
                self._halve_lr(optimizer, scheduler)
            if action == "stop" and control is not None:
                control.should_training_stop = True
            self.actions.append({"step": step, "kl": rec["kl"], "action": action,
                                 "breach": self.breaches})
            rec["action"] = action
        self.checks.append(rec)
        self.log({"event": "kl_check", **rec})
        metrics = getattr(self.trainer, "_metrics", None)
        if isinstance(metrics, dict) and "train" in metrics:
            # TRL averages these into its next logged record, which reaches the report_to
            # trackers and metrics.jsonl beside rewards/margins, logps/chosen, ...
            for key in ("kl", "heldout_margin", "heldout_accuracy"):
                metrics["train"][f"realign/{key}"].append(rec[key])
        return rec

    @staticmethod
    def _halve_lr(optimizer: Any, scheduler: Any) -> None:
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr / 2 for lr in scheduler.base_lrs]
        if optimizer is not None:
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] / 2
                if "initial_lr" in g:
                    g["initial_lr"] = g["initial_lr"] / 2

    def callback(self) -> Any:
        from transformers import TrainerCallback

        monitor = self

        class _CB(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                               **kw: Any) -> None:
                if not monitor.checks:
                    if state.global_step == 0 and monitor.initial_kl is not None:
                        monitor.start_at_reference(model)
                    else:  # resumed from a checkpoint: measure where training stands
                        monitor.check(model, state.global_step)

            def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                            optimizer: Any = None, lr_scheduler: Any = None, **kw: Any) -> None:
                step = state.global_step
                monitor.progress(step, state.max_steps, "DPO training")
                if step % monitor.every == 0 or step >= state.max_steps:
                    monitor.check(model, step, optimizer, lr_scheduler, control)

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                       **kw: Any) -> None:
                if logs:
                    rec = {"step": state.global_step, **{k: float(v) for k, v in logs.items()
                                                         if isinstance(v, (int, float))}}
                    monitor.trl_logs.append(rec)
                    monitor.log({"event": "train_log", **rec})

            def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                             **kw: Any) -> None:
                if not monitor.checks or monitor.checks[-1]["step"] != state.global_step:
                    monitor.check(model, state.global_step)

        return _CB()


@contextmanager
def _phase(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``timings[name]`` (the stage's time breakdown)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _from_rank0(rec: dict[str, Any]) -> dict[str, Any]:
    """Under DDP every rank measures the same replica on the same probe; rank 0's numbers
    are broadcast so that every rank takes the same breach decision."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return rec
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [rec]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return rec


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
    from ..backends.trl_train import dpo_config, make_dpo_trainer_class, quiet_hf

    quiet_hf()
    cfg, d = ctx.config, ctx.config.dpo
    out = ctx.stage_dir(NAME)
    torch.manual_seed(cfg.seed)
    backend = TRLBackend()
    base = (ctx.artifact("reference_init", "reference_model")
            or ctx.artifact("sft_baseline", "model") or str(resolve_model(cfg.model)))
    train_path = ctx.artifact("preference_data", "train")
    probe_path = ctx.artifact("reference_init", "kl_probe")
    if not train_path or not probe_path:
        raise RuntimeError("stage 5 needs stages 2 (train split) and 3 (KL probe) to have run")
    train_rows = read_jsonl(Path(train_path))
    probe = read_jsonl(Path(probe_path))

    timings: dict[str, float] = {}
    ctx.progress(0, None, "loading reference and policy")
    with _phase(timings, "load"):
        ref = backend.load(base, device=cfg.device)
        for p in ref.model.parameters():
            p.requires_grad_(False)
        policy = make_policy(ref.model, d.lora)
    threshold = ctx.thresholds.get("kl_divergence")
    warnings: list[str] = []

    with metrics_log(out / "metrics.jsonl") as log:
        rp_path = ctx.artifact("reference_init", "reference_probe")
        with _phase(timings, "monitor_init"):
            reference_probe = (torch.load(rp_path, weights_only=False)
                               if rp_path and Path(rp_path).exists() else None)
            monitor = KLMonitor(backend=backend, ref=ref, probe=probe, beta=d.beta, threshold=threshold,
                                every=cfg.kl_monitor.every, on_breach=cfg.kl_monitor.on_breach,
                                max_breaches=cfg.kl_monitor.max_breaches,
                                batch_size=cfg.kl_monitor.batch_size, max_length=d.max_length,
                                log=log, progress=ctx.progress, reference_probe=reference_probe,
                                initial_kl=ctx.artifact("reference_init", "initial_kl"),
                                reference_weights=None if d.lora else dict(ref.model.named_parameters()))
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
            _barrier()
            dataset = load_from_disk(str(out / "train_dataset"))
        args = dpo_config(out / "checkpoints", beta=d.beta, loss_type=d.loss_type,
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
                              ref_progress=lambda i, n: ctx.progress(i, n, "reference log-probs"))
        monitor.trainer = trainer
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl, not stdout
        cache = {"hit": trainer.ref_cache_hit, "path": str(getattr(trainer, "ref_cache_path", "")),
                 "precompute_seconds": trainer.ref_cache_seconds,
                 "method": trainer.ref_precompute_method}
        ckpts = sorted((out / "checkpoints").glob("checkpoint-*"),
                       key=lambda p: int(p.name.split("-")[-1]))
        timings["ref_precompute"] = trainer.ref_cache_seconds  # 0.0 on a cache hit
        timings["trainer_init"] = time.perf_counter() - t0 - timings["ref_precompute"]
        t_train = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(ckpts[-1]) if ckpts else None)
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

    n_probe = len(probe)
    gates: list[GateResult] = [
        ctx.thresholds.evaluate(
            "kl_divergence", final["kl"],
            detail=f"step {final['step']}: mean per-token KL on {n_probe} probe responses"
                   + (f" (sequence sum mean {final['kl_sequence_mean']:.4f} nats)"
                      if final.get("kl_sequence_mean") is not None else " (the reference, from stage 3)")),
        ctx.thresholds.evaluate(
            "reward_margin", final["heldout_margin"], ci95=tuple(final["heldout_margin_ci95"]),
            detail=f"step {final['step']}: mean held-out DPO implicit reward margin (beta "
                   f"{d.beta}) on {n_probe} pairs; accuracy {final['heldout_accuracy']:.2f}"),
    ]
    steps_per_s = trainer.state.global_step / train_seconds if train_seconds > 0 else None
    findings = {
        "checks": monitor.checks, "breach_actions": monitor.actions,
        "selected_step": final["step"], "global_step": trainer.state.global_step,
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
                     "metrics": str(out / "metrics.jsonl")}
    findings["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return make_verdict(NAME, gates, ctx.thresholds, findings, artifacts, warnings)
