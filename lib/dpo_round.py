"""One DPO round: TRL's ``DPOTrainer`` under the live KL monitor, from a given policy
against a given frozen reference, resumable from its complete checkpoints.

Stage 5 runs one round from the stage-3 policy; each stage-6 iteration runs one from the
previous iteration's policy (:mod:`realign.stages.dpo`, :mod:`realign.stages.iterative`).
What a round does (docs/dpo-optimization.md has the rules):

* resumes from the newest *complete* checkpoint under ``<folder>/checkpoints`` (partial
  ones are removed), with the KL monitor's history as of that checkpoint;
* trains on the pairs the steps consume (``max_steps × batch_size × accumulation ×
  processes``, drawn by seed), reference log-probs precomputed once and cached by content;
* checks KL(π ‖ π_ref) and the held-out margin on the KL probe every
  ``kl_monitor.every`` steps (:class:`realign.kl_monitor.KLMonitor`), acting on a breach
  by ``kl_monitor.on_breach``;
* keeps the check that passed the KL gate with the best probe margin (the last state when
  none passed, with a warning);
* greedy answers of the policy and the reference to the first probe prompts, for the
  length detector;
* detectors (warnings): likelihood displacement, saturation, length exploitation, and
  every breach action.

Gates, saving and the held-out measurements are the caller's. The MLX round with the same
contract is :mod:`realign.dpo_round_mlx` (``round_runner`` picks one by the run's backend).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .distributed import barrier, is_main_process, world_size
from .kl_monitor import (
    LENGTH_GROWTH,
    SATURATION_LOSS,
    KLMonitor,
    detect_displacement,
)
from .kl_probe import LENGTH_PROBE_PROMPTS, LENGTH_PROBE_TOKENS
from .rundir import metrics_log


@contextmanager
def phase(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``timings[name]`` (a stage's time breakdown)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def train_dataset(rows: list[dict[str, Any]], n: int | None, seed: int) -> Any:
    """The pairs a round trains on: ``n`` rows drawn by ``seed`` (all when None or fewer)."""
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"],
                             "rejected": r["rejected"]} for r in rows])
    if n is not None and n < len(ds):
        ds = ds.shuffle(seed=seed).select(range(n)).flatten_indices()
    return ds


def mean_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)


@dataclass
class RoundResult:
    """A finished round: the trained ``model`` (the selected check's weights; LoRA not
    merged), the ``trainer`` and ``monitor``, the ``final`` (selected) check, the length
    probe, the reference-cache record, ``train_seconds`` and the ``warnings`` in the order
    stage 5 reports them."""

    model: Any
    trainer: Any
    monitor: KLMonitor
    final: dict[str, Any]
    threshold: float
    ref_words: float
    policy_words: float
    cache: dict[str, Any]
    train_seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def global_step(self) -> int:
        state = getattr(self.trainer, "state", None)  # TRL's Trainer; MLXDPOTrainer: .step
        return int(state.global_step if state is not None else self.trainer.step)


def detector_warnings(monitor: Any, threshold: float, ref_len: float, pol_len: float
                      ) -> list[str]:
    """The round's detector warnings, the same for every backend: likelihood displacement
    (:func:`realign.kl_monitor.detect_displacement`), saturation (held-out accuracy 1.0 at
    some check after step 0 and one of the last three training losses below
    ``SATURATION_LOSS``), length exploitation (the policy's greedy probe answers longer
    than ``LENGTH_GROWTH`` × the reference's), each KL breach with its action, then the
    monitor's own warnings."""
    out: list[str] = []
    w = detect_displacement(monitor.checks)
    if w:
        out.append(w)
    losses = [r["loss"] for r in monitor.trl_logs if "loss" in r]
    if any(c["heldout_accuracy"] >= 1.0 for c in monitor.checks[1:]) and losses \
            and min(losses[-3:]) < SATURATION_LOSS:
        out.append("saturation: held-out accuracy reached 1.0 with training loss near 0; "
                   "the policy can separate the pairs perfectly and will keep drifting. "
                   "Stop earlier, raise beta, or use loss_type: ipo / label smoothing.")
    if ref_len > 0 and pol_len > LENGTH_GROWTH * ref_len:
        out.append(f"length exploitation: greedy answers grew from {ref_len:.1f} to "
                   f"{pol_len:.1f} words on the probe prompts; check the length-bias gate of "
                   "stage 2, balance lengths, or use a length-normalized loss "
                   "(loss_type: ipo, or ld_alpha).")
    for a in monitor.actions:
        out.append(f"KL breach at step {a['step']} (KL {a['kl']:.4f} > {threshold:g}): "
                   f"{a['action']}")
    out.extend(monitor.warnings)
    return out


def run_round(*, backend: Any, ref: Any, policy: Any, train_rows: list[dict[str, Any]],
              probe: list[dict[str, Any]], folder: Path, metrics_path: Path, run_dir: Path,
              dpo: Any, kl_monitor: Any, seed: int, threshold: float,
              max_steps: int | None = None, learning_rate: float | None = None,
              reference_probe: dict[str, Any] | None = None, initial_kl: float | None = None,
              initial_threshold: float | None = None, policy_is_reference: bool = True,
              progress: Callable[[float, float | None, str], None] | None = None,
              timings: dict[str, float] | None = None) -> RoundResult:
    """Train one DPO round (see the module doc) and return it.

    ``ref`` and ``policy``: the frozen reference (a model handle) and the trainable
    policy module (full copy or PEFT). ``dpo`` / ``kl_monitor``: the config sections;
    ``max_steps`` / ``learning_rate`` replace theirs when given (stage 6).
    ``policy_is_reference``: the policy starts at the reference (stage 5; its step-0 weights
    are then held by reference, and with LoRA TRL's reference is the policy with its
    adapters disabled). False (stage 6): the reference is passed to TRL explicitly.
    ``folder`` holds ``checkpoints/`` and the monitor's ``checks.json`` /
    ``monitor_state.json``; ``metrics_path`` gets the training log.
    """
    from transformers.trainer_callback import PrinterCallback

    from .backends.trl_train import (
        dpo_config,
        make_dpo_trainer_class,
        mixed_precision_bf16,
        resume_checkpoint,
    )

    say = progress or (lambda d, t, m: None)
    timings = timings if timings is not None else {}
    d = dpo
    steps = d.max_steps if max_steps is None else max_steps
    lr = d.learning_rate if learning_rate is None else learning_rate
    warnings: list[str] = []
    ckpt_root = Path(folder) / "checkpoints"
    resume_from, incomplete = resume_checkpoint(ckpt_root, remove_incomplete=is_main_process())
    barrier()
    if incomplete:
        warnings.append(f"removed incomplete checkpoint(s) {', '.join(incomplete)} (a save was cut "
                        f"short); {'resumed from ' + resume_from.name if resume_from else 'started over'}")

    with metrics_log(metrics_path) as log:
        with phase(timings, "monitor_init"):
            monitor = KLMonitor(backend=backend, ref=ref, probe=probe, beta=d.beta, threshold=threshold,
                                every=kl_monitor.every, on_breach=kl_monitor.on_breach,
                                max_breaches=kl_monitor.max_breaches,
                                batch_size=kl_monitor.batch_size, max_length=d.max_length,
                                log=log, progress=say, reference_probe=reference_probe,
                                initial_kl=initial_kl, initial_threshold=initial_threshold,
                                reference_weights=(dict(ref.model.named_parameters())
                                                   if policy_is_reference and not d.lora else None),
                                state_dir=Path(folder))
            if resume_from is not None:
                monitor.load_checkpoint_state(resume_from, run_dir)
        length_prompts = [r["prompt"] for r in probe[:LENGTH_PROBE_PROMPTS]]
        ref_answers = monitor.ref_answers

        world = world_size()
        needed = steps * d.batch_size * d.gradient_accumulation_steps * world if steps > 0 else None
        dataset = train_dataset(train_rows, needed, seed)
        if world > 1:
            # TRL keeps precomputed reference log-probs beside the dataset's cache files;
            # an in-memory dataset has them in a per-process temp folder, which the other
            # ranks cannot read. A dataset on disk is shared by all ranks.
            from datasets import load_from_disk

            if is_main_process():
                dataset.save_to_disk(str(Path(folder) / "train_dataset"))
            barrier()
            dataset = load_from_disk(str(Path(folder) / "train_dataset"))
        args = dpo_config(ckpt_root, beta=d.beta, loss_type=d.loss_type,
                          learning_rate=lr, batch_size=d.batch_size,
                          gradient_accumulation_steps=d.gradient_accumulation_steps,
                          max_steps=steps, num_epochs=d.num_epochs, max_length=d.max_length,
                          seed=seed, save_every=d.save_every, warmup_steps=d.warmup_steps,
                          report_to=d.report_to, use_cpu=(ref.device.type == "cpu") or None,
                          # bf16 autocast only for a bf16 model: TRL's default (on) would run a
                          # float32 policy in bf16, away from its float32 reference at step 0
                          bf16=mixed_precision_bf16(policy), extra=d.extra)
        trainer_cls = make_dpo_trainer_class()
        t0 = time.perf_counter()
        # The frozen reference we hold anyway is TRL's ref_model (one process, no LoRA):
        # the precompute then runs it, not the policy, and no second copy is loaded.
        # (with several processes TRL would shard a passed reference under FSDP/ZeRO-3)
        # A policy that does not start at the reference (stage 6) always gets it passed:
        # with LoRA, "adapters disabled" would be the previous policy, not the reference.
        pass_ref = (world == 1 and not d.lora) or not policy_is_reference
        trainer = trainer_cls(model=policy, ref_model=ref.model if pass_ref else None,
                              args=args, train_dataset=dataset, processing_class=ref.tokenizer,
                              callbacks=[monitor.callback()],
                              checkpoint_hooks=[monitor.save_checkpoint_state],
                              ref_progress=lambda i, n: say(i, n, "reference log-probs"))
        monitor.trainer = trainer
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
            _margin, step, weights = monitor.best
            monitor.restore(model, weights)
            final = next(c for c in monitor.checks if c["step"] == step and c["passed"])
        else:
            final = monitor.checks[-1]
            warnings.append("no check passed the KL gate: the final model is the last state")

        with phase(timings, "length_probe"):
            policy_answers = backend.generate(
                type(ref)(model=model, tokenizer=ref.tokenizer, device=ref.device, source="policy"),
                length_prompts, max_new_tokens=LENGTH_PROBE_TOKENS)
        ref_len, pol_len = mean_words(ref_answers), mean_words(policy_answers)
        log({"event": "length_probe", "reference_words": ref_len, "policy_words": pol_len})

    warnings.extend(detector_warnings(monitor, threshold, ref_len, pol_len))
    return RoundResult(model=model, trainer=trainer, monitor=monitor, final=final,
                       threshold=threshold, ref_words=ref_len, policy_words=pol_len, cache=cache,
                       train_seconds=train_seconds, warnings=warnings)
