"""The live KL gate during DPO: :class:`KLMonitor`, a ``transformers`` callback; and the
held-out measurement stage 5's gates read (:func:`measure_heldout`).

The monitor checks the policy every ``kl_monitor.every`` optimizer steps (and at the
first and last step) on the KL probe written by stage 3 (:mod:`realign.kl_probe`):

* KL: mean per-token KL(π_θ ‖ π_ref) over the probe's completion tokens, exact over the
  vocabulary (:func:`realign.backends.trl.kl_on_probe`), and the mean sequence-level sum;
* held-out DPO implicit reward margin on the same probe pairs:
  ``m_i = β·[(log π_θ(c_i) − log π_ref(c_i)) − (log π_θ(r_i) − log π_ref(r_i))]``;
  reported: mean margin (with a 95% normal CI) and accuracy = share with ``m_i > 0``.

On a breach (KL above the ``kl_divergence`` threshold) it acts by ``on_breach``
(``rollback``: restore the last passing weights, reset the optimizer moments, halve the
learning rate; ``halve_lr``; ``stop``), and stops after ``max_breaches``. It keeps the
passing check with the best held-out margin for the stage to select.

Step 0 is measured on the policy the trainer holds when training begins (not copied from
stage 3). Its state (checks, breach actions, the best passing check and the last passing
one) is written to ``checks.json`` / ``monitor_state.json`` after every check, and into
each checkpoint (:meth:`KLMonitor.save_checkpoint_state`: the state as of that step, plus
the weights of the best and last passing checks when the checkpoint itself and the
reference do not hold them), so a resumed run continues with the history and the best
model found before the kill (:meth:`KLMonitor.load_checkpoint_state`).

The probe serves breach handling and selection only. The gates read
:func:`measure_heldout` on held-out rows outside the probe: KL along responses sampled
from the selected policy, and margins on other held-out pairs.

Also here: the likelihood-displacement detector and its threshold.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from .distributed import is_main_process
from .errors import InputError
from .fileio import write_json_atomic
from .kl_probe import inside_run_dir, reference_probe_stats

#: Detector settings (one home for these numbers).
DISPLACEMENT_MIN_DROP = 1.0  # nats: chosen log-prob must fall at least this much
SATURATION_LOSS = 0.05  # training loss below this with held-out accuracy 1.0
LENGTH_GROWTH = 1.2  # policy answers this many times longer than the reference's


#: Files of the monitor's state: in the stage folder (rewritten after every check) and in
#: each checkpoint folder (the state as of that step, with the weights it needs).
CHECKS_FILE = "checks.json"
STATE_FILE = "monitor_state.json"
CHECKPOINT_STATE = "realign_monitor.json"
CHECKPOINT_WEIGHTS = "realign_monitor.safetensors"
MONITOR_STATE_FORMAT = "realign-kl-monitor/1"


def margin_stats(margins: list[float]) -> dict[str, Any]:
    """Mean (with a normal 95% CI, mean ± 1.96·sd/√n) and accuracy (share > 0) of
    per-pair DPO implicit reward margins."""
    n = len(margins)
    mean = sum(margins) / n
    sd = math.sqrt(sum((m - mean) ** 2 for m in margins) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "ci95": [mean - half, mean + half],
            "accuracy": sum(m > 0 for m in margins) / n, "pairs": n}


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
                 initial_kl: float | None = None, initial_threshold: float | None = None,
                 reference_weights: dict[str, Any] | None = None,
                 state_dir: Path | None = None) -> None:
        from .backends.encoding import encode_pair

        self.backend, self.ref = backend, ref
        self.beta, self.threshold, self.every = beta, threshold, every
        self.on_breach, self.max_breaches = on_breach, max_breaches
        self.batch_size, self.max_length = batch_size, max_length
        self.log, self.progress = log, progress
        self.initial_kl = initial_kl  # stage 3's initial_kl, compared with step 0 here
        self.initial_threshold = initial_threshold
        # the policy's step-0 weights when they are the frozen reference's (full fine-tuning):
        # held by reference instead of a second copy
        self.reference_weights = reference_weights
        self.state_dir = state_dir  # checks.json / monitor_state.json go here after each check
        tok = ref.tokenizer
        self.chosen_enc = [encode_pair(tok, r["prompt"], r["chosen"], max_length) for r in probe]
        self.rejected_enc = [encode_pair(tok, r["prompt"], r["rejected"], max_length) for r in probe]
        rp = reference_probe
        if rp is None or rp.get("max_length") != max_length:  # stage 3 did not precompute
            rp = reference_probe_stats(backend, ref, probe, max_length=max_length, batch_size=batch_size)
        self.ref_c, self.ref_r = rp["ref_chosen"], rp["ref_rejected"]
        self.ref_answers: list[str] = rp["answers"]
        self.ref_for_kl: Any = self._reference_for_kl(rp)
        self.checks: list[dict[str, Any]] = []
        self.trl_logs: list[dict[str, float]] = []
        self.breaches = 0
        self.last_good: dict[str, Any] | None = None
        self.last_good_step: int | None = None
        self.best: tuple[float, int, dict[str, Any]] | None = None  # (margin, step, weights)
        self.actions: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.trainer: Any = None
        self.check_seconds = 0.0  # wall time spent in checks (measure + snapshot/restore)
        self._weights_are_reference = False  # step 0's weights are held as the reference's
        self.resumed_from: int | None = None  # the checkpoint step whose state was loaded
        self._pending: dict[str, Any] | None = None  # resumed weights, resolved at train begin

    # -- backend hooks (torch here; realign.dpo_round_mlx.MLXKLMonitor: MLX) --------
    def _reference_for_kl(self, rp: dict[str, Any]) -> Any:
        """The reference :meth:`measure` compares against: the precomputed distributions
        when stage 3 kept them, else the reference model."""
        from .backends.trl import ReferenceDistributions

        return (ReferenceDistributions(logps=rp["distributions"])
                if rp.get("distributions") is not None else self.ref.model)

    @staticmethod
    def _trainable(model: Any) -> dict[str, Any]:
        """The trainable parameters of ``model``, by name."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    @staticmethod
    def _equal(a: Any, b: Any) -> bool:
        import torch

        return bool(torch.equal(a.detach(), b.detach().to(a.device)))

    @staticmethod
    def _save_weights(tensors: dict[str, Any], path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(path))

    @staticmethod
    def _load_weights(path: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        return dict(load_file(str(path)))

    def _record(self, step: int, kl: Any, pol_c: list[float], pol_r: list[float]) -> dict[str, Any]:
        """A check's record from the KL result and the policy's probe log-probs."""
        margins = [self.beta * ((pc - rc) - (pr - rr))
                   for pc, rc, pr, rr in zip(pol_c, self.ref_c, pol_r, self.ref_r)]
        m = margin_stats(margins)
        return {
            "step": step, "kl": kl.mean,
            "kl_sequence_mean": sum(kl.per_sequence) / len(kl.per_sequence),
            "heldout_margin": m["mean"], "heldout_margin_ci95": m["ci95"],
            "heldout_accuracy": m["accuracy"],
            "heldout_chosen_logp": sum(pol_c) / len(pol_c),
            "passed": kl.mean <= self.threshold,
        }

    # -- measurement -------------------------------------------------------------
    def measure(self, model: Any, step: int) -> dict[str, Any]:
        """KL and held-out margin of the trainer's ``model`` on the probe. The policy runs
        its own forward, as the reference's numbers were computed and as the saved model
        runs: not the autocast wrapper a mixed-precision trainer puts around it
        (:func:`realign.backends.trl.own_forward`), which alone read KL 6e-4 at step 0."""
        from .backends.trl import ModelHandle, kl_on_probe, own_forward

        with own_forward(model, self.ref_for_kl):
            kl = kl_on_probe(model, self.ref_for_kl, encoded=self.chosen_enc,
                             tokenizer=self.ref.tokenizer, batch_size=self.batch_size)
            handle = ModelHandle(model=model, tokenizer=self.ref.tokenizer, device=self.ref.device,
                                 source="policy")
            assert kl.policy_token_logps is not None  # same forward pass as the KL
            pol_c = [float(sum(x)) for x in kl.policy_token_logps]
            pol_r = self.backend.completion_logprobs(handle, [], [], encoded=self.rejected_enc,
                                                     batch_size=self.batch_size).sums
        return self._record(step, kl, pol_c, pol_r)

    def start(self, model: Any) -> dict[str, Any]:
        """Step 0, measured on the policy the trainer starts from (as every later check).
        Its weights are held by reference to the frozen reference's when they are equal
        to them (full fine-tuning), instead of a second copy. A step-0 KL at or above the
        ``initial_kl`` threshold is a warning: stage 5 does not start at the reference."""
        t0 = time.perf_counter()
        rec = _from_rank0({**self.measure(model, 0), "source": "measured at the start of stage 5"})
        if self.initial_threshold is not None and rec["kl"] >= self.initial_threshold:
            self.warnings.append(
                f"the policy stage 5 starts from is not the reference: KL {rec['kl']:.3g} on the "
                f"probe at step 0 (initial_kl threshold {self.initial_threshold:g}; stage 3 measured "
                f"{self.initial_kl if self.initial_kl is not None else float('nan'):.3g}); every "
                "KL number of this stage is measured against a different starting point")
        if rec["passed"]:
            params = self._trainable(model)
            rw = self.reference_weights
            same = rw is not None and params.keys() <= rw.keys() and all(
                self._equal(p, rw[n]) for n, p in params.items())
            weights = {n: rw[n] for n in params} if same and rw is not None \
                else self.snapshot(model)
            self._weights_are_reference = same
            self.last_good, self.last_good_step = weights, 0
            self.best = (rec["heldout_margin"], 0, weights)
        self.checks.append(rec)
        self.log({"event": "kl_check", **rec})
        self.check_seconds += time.perf_counter() - t0
        self._persist()
        return rec

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
            self.last_good, self.last_good_step = weights, step
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
        self._persist()
        metrics = getattr(self.trainer, "_metrics", None)
        if isinstance(metrics, dict) and "train" in metrics:
            # TRL averages these into its next logged record, which reaches the report_to
            # trackers and metrics.jsonl beside rewards/margins, logps/chosen, ...
            for key in ("kl", "heldout_margin", "heldout_accuracy"):
                metrics["train"][f"realign/{key}"].append(rec[key])
        return rec

    # -- persistence -----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The monitor's state as JSON-able data (weights excluded)."""
        return {"format": MONITOR_STATE_FORMAT, "checks": self.checks, "actions": self.actions,
                "breaches": self.breaches, "trl_logs": self.trl_logs,
                "best": None if self.best is None else {"step": self.best[1], "margin": self.best[0]},
                "last_good": None if self.last_good_step is None else {"step": self.last_good_step}}

    def _persist(self) -> None:
        """``checks.json`` and ``monitor_state.json`` in the stage folder, rewritten
        (atomically) after every check."""
        if self.state_dir is None or not is_main_process():
            return
        write_json_atomic(Path(self.state_dir) / CHECKS_FILE, self.checks)
        write_json_atomic(Path(self.state_dir) / STATE_FILE, self.state())

    def save_checkpoint_state(self, folder: Path, step: int) -> None:
        """Into checkpoint ``folder`` (step ``step``): the state as of that step and the
        weights of the best and the last passing checks, unless the checkpoint itself
        holds them (their step is ``step``) or the reference does (step 0, equal to it).
        Called by the trainer inside the save, before the completion marker."""
        folder = Path(folder)
        state = self.state()
        tensors: dict[str, Any] = {}
        for key, step_w in (("best", self.best and (self.best[1], self.best[2])),
                            ("last_good", self.last_good_step is not None
                             and (self.last_good_step, self.last_good))):
            if not step_w or state[key] is None:
                continue
            s, weights = step_w
            if s == step and self.checks and self.checks[-1]["step"] == step and self.checks[-1]["passed"]:
                state[key]["weights"] = "checkpoint"
            elif s == 0 and self._weights_are_reference:
                state[key]["weights"] = "reference"
            else:
                state[key]["weights"] = f"step{s}"
                for n, t in weights.items():
                    tensors[f"step{s}/{n}"] = t
        if tensors:
            self._save_weights(tensors, folder / CHECKPOINT_WEIGHTS)
        write_json_atomic(folder / CHECKPOINT_STATE, {**state, "step": step})

    def load_checkpoint_state(self, folder: Path, run_dir: Path) -> bool:
        """Load what :meth:`save_checkpoint_state` wrote into ``folder`` (inside
        ``run_dir`` only); the weights are resolved when training begins (the checkpoint's
        own weights are in the model only then). False when the folder has no state
        (a checkpoint written before it was saved)."""
        folder = inside_run_dir(folder, run_dir, what="checkpoint")
        f = folder / CHECKPOINT_STATE
        if not f.is_file():
            return False
        try:
            st = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"unreadable KL-monitor state ({exc}); remove the checkpoint to "
                             "resume from the one before", file=f) from None
        if not isinstance(st, dict) or st.get("format") != MONITOR_STATE_FORMAT \
                or not isinstance(st.get("checks"), list):
            raise InputError("not a KL-monitor state", file=f)
        self.checks = st["checks"]
        self.actions = list(st.get("actions") or [])
        self.breaches = int(st.get("breaches") or 0)
        self.trl_logs = list(st.get("trl_logs") or [])
        self.resumed_from = int(st["step"])
        self._pending = {"folder": folder, "run_dir": run_dir, "best": st.get("best"),
                         "last_good": st.get("last_good")}
        self._persist()
        return True

    def _resolve_pending(self, model: Any) -> None:
        """At train begin after a resume: the best and last passing weights, from the
        checkpoint's own weights (now in ``model``), the reference, or the saved file."""
        p, self._pending = self._pending, None
        if p is None:
            return
        loaded: dict[str, dict[str, Any]] = {}

        def weights(src: str) -> dict[str, Any]:
            if src == "checkpoint":
                return self.snapshot(model)
            if src == "reference":
                trainable = list(self._trainable(model))
                rw = self.reference_weights or {}
                if not set(trainable) <= rw.keys():
                    raise InputError("the checkpoint's KL-monitor state names the reference "
                                     "weights, which this policy cannot take", file=p["folder"])
                self._weights_are_reference = True
                return {n: rw[n] for n in trainable}
            if src not in loaded:
                wf = inside_run_dir(p["folder"] / CHECKPOINT_WEIGHTS, p["run_dir"],
                                    what="checkpoint weights")
                prefix = f"{src}/"
                loaded[src] = {k[len(prefix):]: v for k, v in self._load_weights(wf).items()
                               if k.startswith(prefix)}
                if not loaded[src]:
                    raise InputError(f"no weights for {src} in {CHECKPOINT_WEIGHTS}", file=wf)
            return loaded[src]

        if p["last_good"]:
            self.last_good_step = int(p["last_good"]["step"])
            self.last_good = weights(p["last_good"]["weights"])
        if p["best"]:
            b = p["best"]
            w = (self.last_good if self.last_good_step == b["step"] and self.last_good is not None
                 else weights(b["weights"]))
            self.best = (float(b["margin"]), int(b["step"]), w)

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
                if monitor.resumed_from is not None:  # resumed with the monitor's state
                    monitor._resolve_pending(model)
                elif state.global_step == 0:
                    monitor.start(model)
                else:  # resumed from a checkpoint without monitor state: measure where it stands
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




def measure_heldout(backend: Any, policy: Any, ref: Any, *, prompts: list[Any],
                    pairs: list[dict[str, Any]], beta: float, max_new_tokens: int, seed: int,
                    batch_size: int, max_length: int) -> dict[str, Any]:
    """What stage 5's gates read: the (selected) ``policy`` against the frozen ``ref``
    (model handles) on held-out data the selection never saw.

    * ``sampled``: one response per prompt sampled from the policy
      (:func:`realign.backends.trl.sample_responses`: temperature 1, no logits processor,
      ``seed``, at most ``max_new_tokens`` tokens), then KL(π ‖ π_ref) at each sampled
      token, exact over the vocabulary (:func:`realign.backends.trl.kl_on_probe` on the
      sampled token ids): ``kl`` = Σ_i Σ_t KL_it ÷ Σ_i T_i (the gated number; an estimate
      of the per-token KL under π itself) and ``kl_sequence_mean`` = mean_i Σ_t KL_it.
    * ``teacher_forced``: the same KL along the chosen responses of ``pairs`` (the
      monitor's kind of number, for comparison).
    * ``margin``: the DPO implicit reward margin on ``pairs``,
      m_i = β·[(log π(c_i) − log π_ref(c_i)) − (log π(r_i) − log π_ref(r_i))], with its
      mean, normal 95% CI and accuracy (:func:`margin_stats`).

    An empty ``prompts`` or ``pairs`` leaves that part None. Wall seconds of each part are
    in ``seconds``. With the MLX backend (``backend.name == "mlx"``) the same measurement
    runs on MLX (:func:`realign.backends.mlx.sample_responses`, ``kl_on_probe``); its
    draws come from MLX's generator, so the sampled responses differ from TRL's. On the
    TRL path both models run their own forward (:func:`realign.backends.trl.own_forward`),
    not the autocast wrapper a mixed-precision trainer leaves on them.
    """
    mlx = getattr(backend, "name", "trl") == "mlx"
    if mlx:  # the same definitions on MLX (realign.backends.mlx)
        from .backends.mlx import kl_on_probe, sample_responses
    else:
        from .backends.trl import kl_on_probe, own_forward, sample_responses  # type: ignore[assignment]

        # both models run their own forward, not a trainer's autocast wrapper (which a
        # full fine-tune's policy and reference both carry, a LoRA's merged policy not)
        with own_forward(policy, ref):
            return _measure_heldout(backend, policy, ref, prompts=prompts, pairs=pairs, beta=beta,
                                    max_new_tokens=max_new_tokens, seed=seed,
                                    batch_size=batch_size, max_length=max_length,
                                    kl_on_probe=kl_on_probe, sample_responses=sample_responses)
    return _measure_heldout(backend, policy, ref, prompts=prompts, pairs=pairs, beta=beta,
                            max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                            max_length=max_length, kl_on_probe=kl_on_probe,
                            sample_responses=sample_responses)


def _measure_heldout(backend: Any, policy: Any, ref: Any, *, prompts: list[Any],
                     pairs: list[dict[str, Any]], beta: float, max_new_tokens: int, seed: int,
                     batch_size: int, max_length: int, kl_on_probe: Any,
                     sample_responses: Any) -> dict[str, Any]:
    """:func:`measure_heldout` with the backend's functions chosen."""
    from .backends.encoding import encode_pair

    mlx = getattr(backend, "name", "trl") == "mlx"
    out: dict[str, Any] = {"sampled": None, "teacher_forced": None, "margin": None, "seconds": {}}
    secs = out["seconds"]
    tok = ref.tokenizer
    if prompts:
        t0 = time.perf_counter()
        # one batch for a few prompts: sampling is token by token, so the number of
        # sequential steps, not the batch width, sets its time on a CPU
        samples = sample_responses(policy, prompts, max_new_tokens=max_new_tokens, seed=seed,
                                   tokenizer=tok, batch_size=min(len(prompts), max(batch_size, 16)),
                                   max_length=max_length)
        secs["sample"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        kl = kl_on_probe(policy, ref, encoded=samples, tokenizer=tok, batch_size=batch_size)
        secs["sampled_kl"] = time.perf_counter() - t0
        out["sampled"] = {"kl": kl.mean, "kl_sequence_mean": kl.mean_sequence, "tokens": kl.tokens,
                          "prompts": len(prompts), "mean_response_tokens": kl.tokens / len(prompts),
                          "max_new_tokens": max_new_tokens, "temperature": 1.0, "seed": seed}
    if pairs:
        t0 = time.perf_counter()
        chosen = [encode_pair(tok, r["prompt"], r["chosen"], max_length) for r in pairs]
        rejected = [encode_pair(tok, r["prompt"], r["rejected"], max_length) for r in pairs]
        if mlx:
            kl = kl_on_probe(policy, ref, encoded=chosen, tokenizer=tok, batch_size=batch_size)
            assert kl.policy_token_logps is not None
            ref_c = backend.completion_logprobs(ref, [], [], encoded=chosen, batch_size=batch_size).sums
        else:
            kl = kl_on_probe(policy, ref, encoded=chosen, tokenizer=tok, batch_size=batch_size,
                             reference_logps=True)
            assert kl.policy_token_logps is not None and kl.reference_token_logps is not None
            ref_c = [float(sum(x)) for x in kl.reference_token_logps]
        pol_c = [float(sum(x)) for x in kl.policy_token_logps]
        pol_r = backend.completion_logprobs(policy, [], [], encoded=rejected, batch_size=batch_size).sums
        ref_r = backend.completion_logprobs(ref, [], [], encoded=rejected, batch_size=batch_size).sums
        secs["pairs"] = time.perf_counter() - t0
        out["teacher_forced"] = {"kl": kl.mean, "kl_sequence_mean": kl.mean_sequence,
                                 "tokens": kl.tokens, "pairs": len(pairs)}
        out["margin"] = margin_stats([beta * ((pc - rc) - (pr - rr))
                                      for pc, rc, pr, rr in zip(pol_c, ref_c, pol_r, ref_r)])
    secs["total"] = sum(secs.values())
    return out
