"""One DPO round on MLX: :class:`realign.backends.mlx_dpo.MLXDPOTrainer` under the live KL
monitor — the same contract as :func:`realign.dpo_round.run_round` (same signature, same
:class:`realign.dpo_round.RoundResult`), selected by the run's ``backend``
(:func:`round_runner`), so stages 5 and 6 do not branch on the framework.

What is the same as the TRL round (docs/dpo-optimization.md has the rules):

* the pairs trained on (``max_steps × batch_size × accumulation`` drawn by seed, the same
  draw as TRL's round when ``datasets`` is installed), the reference log-probs
  precomputed once and cached by content (``$REALIGN_HOME/cache/ref_logps/mlx-<key>.npz``);
* the KL monitor (:class:`MLXKLMonitor`, a :class:`realign.kl_monitor.KLMonitor` whose
  measurements run on MLX with the same definitions): a check every
  ``kl_monitor.every`` optimizer steps and at the first and last step, the breach policy
  (``rollback``: restore the last passing weights, reset AdamW's moments, halve the
  learning rate; ``halve_lr``; ``stop``; ``max_breaches``) through the trainer's step
  callback (:class:`realign.backends.mlx_dpo.StepAction`), ``checks.json`` /
  ``monitor_state.json`` after every check and the monitor's state inside each checkpoint;
* checkpoint selection: the check that passed the KL gate with the best probe margin
  (the last state when none passed, with a warning);
* resume from the newest *complete* checkpoint (the completion marker is written last,
  :meth:`MLXDPOTrainer.mark_complete`; incomplete ones are removed);
* the length probe and the detectors (displacement, saturation, length exploitation).

Not the same: the order in which pairs are drawn into batches (a NumPy permutation, not
torch's sampler) and the random draws, so step-by-step numbers match TRL only in
distribution; the policy is measured in eval mode (mlx-lm models have no dropout outside
LoRA's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .dpo_round import RoundResult, detector_warnings, mean_words, phase
from .kl_monitor import KLMonitor
from .kl_probe import LENGTH_PROBE_PROMPTS, LENGTH_PROBE_TOKENS
from .rundir import metrics_log

#: ``dpo.extra`` keys with no MLX counterpart that change nothing there (mlx-lm models have
#: no dropout to disable outside LoRA's); any other unknown key is refused by the trainer.
MLX_DROPPED_EXTRA = ("disable_dropout",)


def round_runner(backend_name: str | None) -> Callable[..., RoundResult]:
    """The ``run_round`` of a backend: :func:`realign.dpo_round.run_round` (TRL) or
    :func:`run_round` here (MLX)."""
    if backend_name == "mlx":
        return run_round
    from .dpo_round import run_round as trl_round

    return trl_round


class MLXKLMonitor(KLMonitor):
    """:class:`realign.kl_monitor.KLMonitor` measuring an MLX policy: KL exact over the
    vocabulary (:func:`realign.backends.mlx.kl_on_probe`) and the held-out margins on the
    probe; weights snapshotted by reference (MLX arrays are immutable) and written into
    checkpoints with ``mx.save_safetensors``. The breach decisions are the base class's;
    :meth:`step_action` turns them into the trainer's :class:`StepAction`."""

    def _reference_for_kl(self, rp: dict[str, Any]) -> Any:
        import numpy as np

        from .backends.mlx import ReferenceDistributions, mx

        d = rp.get("distributions")
        if d is None:
            return self.ref.model
        return ReferenceDistributions(logps=[x if isinstance(x, mx.array)
                                             else mx.array(np.asarray(x, dtype=np.float32)) for x in d])

    @staticmethod
    def _trainable(model: Any) -> dict[str, Any]:
        from .backends.mlx import tree_flatten

        return dict(tree_flatten(model.trainable_parameters()))

    @staticmethod
    def _equal(a: Any, b: Any) -> bool:
        from .backends.mlx import mx

        return a is b or (a.shape == b.shape and bool(mx.array_equal(a, b)))

    @staticmethod
    def snapshot(model: Any) -> dict[str, Any]:
        from .backends.mlx import tree_flatten

        return dict(tree_flatten(model.trainable_parameters()))  # immutable: no copy needed

    @staticmethod
    def restore(model: Any, weights: dict[str, Any]) -> None:
        from .backends.mlx import mx, tree_unflatten

        model.update(tree_unflatten(list(weights.items())))
        mx.eval(model.parameters())

    @staticmethod
    def _save_weights(tensors: dict[str, Any], path: Path) -> None:
        from .backends.mlx import mx

        mx.save_safetensors(str(path), dict(tensors))

    @staticmethod
    def _load_weights(path: Path) -> dict[str, Any]:
        from .backends.mlx import mx

        return dict(mx.load(str(path)))

    def measure(self, model: Any, step: int) -> dict[str, Any]:
        from .backends.mlx import MLXModelHandle, kl_on_probe

        kl = kl_on_probe(model, self.ref_for_kl, encoded=self.chosen_enc,
                         tokenizer=self.ref.tokenizer, batch_size=self.batch_size)
        assert kl.policy_token_logps is not None  # same forward pass as the KL
        pol_c = [float(sum(x)) for x in kl.policy_token_logps]
        handle = MLXModelHandle(model=model, tokenizer=self.ref.tokenizer, source="policy",
                                config=self.ref.config)
        pol_r = self.backend.completion_logprobs(handle, [], [], encoded=self.rejected_enc,
                                                 batch_size=self.batch_size).sums
        return self._record(step, kl, pol_c, pol_r)

    def step_action(self, rec: dict[str, Any], had_good: bool) -> Any:
        """The trainer's :class:`StepAction` for a check's record: ``rollback`` (the
        weights were restored by the check) resets the optimizer moments when there was
        a passing state to go back to, and halves the learning rate; ``halve_lr`` halves
        it; ``stop`` ends training. None when the check passed."""
        from .backends.mlx_dpo import StepAction

        action = rec.get("action")
        if action == "rollback":
            return StepAction(reset_optimizer=had_good, lr_factor=0.5)
        if action == "halve_lr":
            return StepAction(lr_factor=0.5)
        if action == "stop":
            return StepAction(stop=True)
        return None


def _train_rows(rows: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """The pairs a round trains on: TRL's draw (:func:`realign.dpo_round.train_dataset`)
    when ``datasets`` is installed, else ``n`` rows by a NumPy permutation of ``seed``."""
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    if n is None or n >= len(rows):
        return rows
    try:
        from .dpo_round import train_dataset

        return list(train_dataset(rows, n, seed))
    except ImportError:
        import numpy as np

        return [rows[int(i)] for i in np.random.default_rng(seed).permutation(len(rows))[:n]]


def run_round(*, backend: Any, ref: Any, policy: Any, train_rows: list[dict[str, Any]],
              probe: list[dict[str, Any]], folder: Path, metrics_path: Path, run_dir: Path,
              dpo: Any, kl_monitor: Any, seed: int, threshold: float,
              max_steps: int | None = None, learning_rate: float | None = None,
              reference_probe: dict[str, Any] | None = None, initial_kl: float | None = None,
              initial_threshold: float | None = None, policy_is_reference: bool = True,
              progress: Callable[[float, float | None, str], None] | None = None,
              timings: dict[str, float] | None = None) -> RoundResult:
    """Train one DPO round on MLX (see the module doc); the arguments are
    :func:`realign.dpo_round.run_round`'s, with ``ref`` a frozen
    :class:`realign.backends.mlx.MLXModelHandle` and ``policy`` the trainable handle
    (:func:`realign.backends.mlx.make_policy`). The result's ``model`` is the policy's
    ``nn.Module`` holding the selected check's weights (LoRA not merged)."""
    from .backends.base import DPOSettings
    from .backends.mlx import MLXModelHandle, tree_flatten
    from .backends.mlx_dpo import MLXDPOTrainer
    from .backends.trl_train import resume_checkpoint

    say = progress or (lambda d, t, m: None)
    timings = timings if timings is not None else {}
    d = dpo
    steps = d.max_steps if max_steps is None else max_steps
    lr = d.learning_rate if learning_rate is None else learning_rate
    warnings: list[str] = []
    ckpt_root = Path(folder) / "checkpoints"
    resume_from, incomplete = resume_checkpoint(ckpt_root, remove_incomplete=True)
    if incomplete:
        warnings.append(f"removed incomplete checkpoint(s) {', '.join(incomplete)} (a save was cut "
                        f"short); {'resumed from ' + resume_from.name if resume_from else 'started over'}")

    if [r for r in (d.report_to or []) if r != "none"]:
        warnings.append(f"dpo.report_to ({', '.join(d.report_to)}) is a transformers feature: the "
                        "MLX round sends nothing to trackers; its metrics are in metrics.jsonl")
    extra = {k: v for k, v in dict(d.extra or {}).items() if k not in MLX_DROPPED_EXTRA}
    if d.warmup_steps:
        extra["warmup_steps"] = d.warmup_steps
    settings = DPOSettings(beta=d.beta, loss_type=d.loss_type, learning_rate=lr,
                           per_device_batch_size=d.batch_size,
                           gradient_accumulation_steps=d.gradient_accumulation_steps,
                           max_steps=steps, num_epochs=d.num_epochs, max_length=d.max_length,
                           seed=seed, lora=d.lora, extra=extra)
    with metrics_log(metrics_path) as log:
        with phase(timings, "monitor_init"):
            ref_weights = (dict(tree_flatten(ref.model.parameters()))
                           if policy_is_reference and not d.lora else None)
            monitor = MLXKLMonitor(backend=backend, ref=ref, probe=probe, beta=d.beta,
                                   threshold=threshold, every=kl_monitor.every,
                                   on_breach=kl_monitor.on_breach,
                                   max_breaches=kl_monitor.max_breaches,
                                   batch_size=kl_monitor.batch_size, max_length=d.max_length,
                                   log=log, progress=say, reference_probe=reference_probe,
                                   initial_kl=initial_kl, initial_threshold=initial_threshold,
                                   reference_weights=ref_weights, state_dir=Path(folder))
            if resume_from is not None:
                monitor.load_checkpoint_state(resume_from, run_dir)
        length_prompts = [r["prompt"] for r in probe[:LENGTH_PROBE_PROMPTS]]
        ref_answers = monitor.ref_answers

        needed = steps * d.batch_size * d.gradient_accumulation_steps if steps > 0 else None
        rows = _train_rows(train_rows, needed, seed)
        t0 = time.perf_counter()
        trainer: Any = None

        def on_step(step: int, metrics: dict[str, float]) -> Any:
            rec = {"step": step, **{k: float(v) for k, v in metrics.items()
                                    if isinstance(v, (int, float)) and k != "step"}}
            monitor.trl_logs.append(rec)
            monitor.log({"event": "train_log", **rec})
            say(step, trainer.max_steps, "DPO training")
            if step % monitor.every == 0 or step >= trainer.max_steps:
                had_good = monitor.last_good is not None
                return monitor.step_action(monitor.check(trainer.model, step), had_good)
            return None

        trainer = MLXDPOTrainer(policy, ref, rows, settings, output_dir=ckpt_root,
                                save_every=d.save_every or None, callback=on_step,
                                progress=None, on_save=monitor.save_checkpoint_state)
        monitor.trainer = trainer
        if resume_from is not None:
            trainer.load_checkpoint(resume_from)
        with phase(timings, "ref_precompute"):
            trainer.precompute_reference()
        cache = {"hit": bool(trainer.ref_cache.get("hit")), "path": trainer.ref_cache.get("path") or "",
                 "precompute_seconds": 0.0 if trainer.ref_cache.get("hit")
                 else float(trainer.ref_cache.get("seconds", 0.0)), "method": "mlx"}
        timings["trainer_init"] = time.perf_counter() - t0 - timings["ref_precompute"]
        # the monitor's start, as the TRL callback's on_train_begin
        if monitor.resumed_from is not None:
            monitor._resolve_pending(trainer.model)
        elif trainer.step == 0:
            monitor.start(trainer.model)
        else:  # a checkpoint without monitor state: measure where it stands
            monitor.check(trainer.model, trainer.step)
        t_train = time.perf_counter()
        trainer.train()
        if not monitor.checks or monitor.checks[-1]["step"] != trainer.step:
            monitor.check(trainer.model, trainer.step)
        train_seconds = time.perf_counter() - t0
        timings["kl_checks"] = monitor.check_seconds
        timings["train"] = time.perf_counter() - t_train - monitor.check_seconds

        model = trainer.model
        final: dict[str, Any]
        if monitor.best is not None:
            _margin, step, weights = monitor.best
            monitor.restore(model, weights)
            final = next(c for c in monitor.checks if c["step"] == step and c["passed"])
        else:
            final = monitor.checks[-1]
            warnings.append("no check passed the KL gate: the final model is the last state")

        with phase(timings, "length_probe"):
            policy_answers = backend.generate(
                MLXModelHandle(model=model, tokenizer=ref.tokenizer, wrapper=ref.wrapper,
                               source="policy", config=ref.config, device=ref.device),
                length_prompts, max_new_tokens=LENGTH_PROBE_TOKENS)
        ref_len, pol_len = mean_words(ref_answers), mean_words(policy_answers)
        log({"event": "length_probe", "reference_words": ref_len, "policy_words": pol_len})

    warnings.extend(detector_warnings(monitor, threshold, ref_len, pol_len))
    return RoundResult(model=model, trainer=trainer, monitor=monitor, final=final,
                       threshold=threshold, ref_words=ref_len, policy_words=pol_len, cache=cache,
                       train_seconds=train_seconds, warnings=warnings)
