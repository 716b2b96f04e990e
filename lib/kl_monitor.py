"""The live KL gate during DPO: :class:`KLMonitor`, a ``transformers`` callback.

It checks the policy every ``kl_monitor.every`` optimizer steps (and at the first and
last step) on the KL probe written by stage 3 (:mod:`realign.kl_probe`):

* KL: mean per-token KL(π_θ ‖ π_ref) over the probe's completion tokens, exact over the
  vocabulary (:func:`realign.backends.trl.kl_on_probe`), and the mean sequence-level sum;
* held-out DPO implicit reward margin on the same probe pairs:
  ``m_i = β·[(log π_θ(c_i) − log π_ref(c_i)) − (log π_θ(r_i) − log π_ref(r_i))]``;
  reported: mean margin (with a 95% normal CI) and accuracy = share with ``m_i > 0``.

On a breach (KL above the ``kl_divergence`` threshold) it acts by ``on_breach``
(``rollback``: restore the last passing weights, reset the optimizer moments, halve the
learning rate; ``halve_lr``; ``stop``), and stops after ``max_breaches``. It keeps the
passing check with the best held-out margin for the stage to select.

Also here: the likelihood-displacement detector and its threshold.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from .kl_probe import load_reference_probe, save_reference_probe

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
                "add an NLL term on the chosen response (loss_type: [sigmoid, sft]).")
    return None


class KLMonitor:
    """The live KL gate. Built lazily as a ``transformers.TrainerCallback`` (see ``callback``)."""

    def __init__(self, *, backend: Any, ref: Any, probe: list[dict[str, Any]], beta: float,
                 threshold: float, every: int, on_breach: str, max_breaches: int,
                 batch_size: int, max_length: int, log: Any, progress: Any,
                 reference_probe: dict[str, Any] | None = None,
                 initial_kl: float | None = None,
                 reference_weights: dict[str, Any] | None = None) -> None:
        from .backends.trl import ReferenceDistributions, encode_pair

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

            with tempfile.TemporaryDirectory() as d:
                save_reference_probe(backend, ref, probe, Path(d) / "p.pt", max_length=max_length,
                                     batch_size=batch_size)
                rp = load_reference_probe(Path(d) / "p.pt")
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
        from .backends.trl import ModelHandle, kl_on_probe

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


