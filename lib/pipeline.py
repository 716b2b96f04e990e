"""The pipeline: runs the stages in order, enforces the gates, triggers rollback.

Rules:

* Stages run in the order of the stage registry (:data:`realign.stages.registry.STAGES`);
  stage ``<name>`` is the function ``run`` of ``realign.stages.<name>``.
* A stage whose verdict is ``fail`` stops the run, unless every failed gate is listed
  in ``allow_gate_failures`` (the verdict then records the override). ``incomplete``
  (a gate unmeasured) does not stop the run, but the run ends ``incomplete`` unless a
  later stage measured that gate (:func:`unresolved_unmeasured`).
* When stage 7 rejects the policy and ``evaluation.rollback_on_regression`` is true,
  :func:`realign.rollback.rollback` restores the best earlier model that passes (same as
  ``realign rollback RUN``); the stage-7 verdict records what was restored.
* A stage is complete when its ``verdict.json`` exists; :func:`resume` skips complete
  stages and restarts the first incomplete one (stage 5 continues from its last on-disk
  checkpoint). One job at a time per run directory (:class:`realign.rundir.RunLock`).

Where every file lives is :class:`realign.rundir.RunDir`'s business, not this module's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from .config import RunConfig
from .distributed import barrier, is_main_process
from .gates import StageVerdict, Thresholds
from .report import write_report
from .rollback import rollback
from .rundir import (
    RunBusyError,
    RunDir,
    RunLock,
    RunState,
    RunStatus,
    create_run,
    list_runs,
    load_run_config,
    run_status,
    write_status,
)
from .stages import (
    dpo,
    evaluation,
    preference_data,
    reference_init,
    reward_model,
    sft_baseline,
)
from .stages.context import ProgressFn, RunContext
from .stages.registry import REGISTRY, STAGES

__all__ = ["RunBusyError", "RunStatus", "create_run", "list_runs", "load_run_config",
           "resume", "run_pipeline", "run_stages", "run_status", "stage_function",
           "unresolved_unmeasured"]

#: The function that runs each built stage (the registry names the module).
_RUNNERS: dict[str, Callable[[RunContext], StageVerdict]] = {
    m.NAME: m.run for m in (sft_baseline, preference_data, reference_init, reward_model, dpo,
                            evaluation)
}
assert all(REGISTRY[n].module == n for n in _RUNNERS) and set(_RUNNERS) == set(STAGES), \
    "stage registry and stage modules disagree"


def stage_function(name: str) -> Callable[[RunContext], StageVerdict]:
    """The stage's entry point: ``realign.stages.<name>.run``."""
    return _RUNNERS[name]


def _blocking_failures(verdict: StageVerdict, allowed: list[str]) -> list[str]:
    return [g.name for g in verdict.gates if g.status == "fail" and g.name not in allowed]


def _after_evaluation(ctx: RunContext, verdict: StageVerdict) -> None:
    """The rollback trigger: a failed stage 7 with ``rollback_on_regression`` restores the
    best earlier model that passes; the verdict records it."""
    if verdict.status != "fail" or not ctx.config.evaluation.rollback_on_regression:
        return
    ctx.progress(0, None, "regression: rolling back")
    result = rollback(ctx.run_dir, verdict=verdict, trigger="pipeline", lock=False,
                      progress=ctx.progress)
    verdict.findings["rollback"] = {"restored": result.restored.model_dump(mode="json")
                                    if result.restored else None,
                                    "record": str(ctx.rundir.rollback_json)}
    verdict.warnings.append(result.summary)


def run_stages(run_dir: Path, *, stages: list[str] | None = None, force: bool = False,
               progress: ProgressFn | None = None, job: str = "run") -> RunStatus:
    """Run the configured stages of a run directory in order (skipping complete ones).

    ``force`` reruns stages that already have a verdict. Returns the final status.
    """
    rd = RunDir(run_dir)
    config = load_run_config(rd.path)
    todo = [s for s in STAGES if s in (stages or config.stages)]
    thresholds = Thresholds(preset=config.preset, overrides=config.thresholds)
    main = is_main_process()

    # Under a multi-process launch every rank runs the stages (DDP needs them all);
    # rank 0 alone holds the lock and writes status and verdicts.
    with RunLock(rd.path, job) if main else nullcontext():
        last_write = [0.0]

        def report(done: float, total: float | None, msg: str) -> None:
            now = time.monotonic()
            if now - last_write[0] >= 0.5 or (total is not None and done >= total):
                last_write[0] = now
                write_status(rd.path, progress={"done": done, "total": total, "message": msg})
            if progress:
                progress(done, total, msg)

        ctx = RunContext(config=config, run_dir=rd.path, thresholds=thresholds, progress=report)
        write_status(rd.path, state="running", pid=os.getpid(), message="")
        state: RunState = "passed"
        try:
            for name in todo:
                existing = rd.read_verdict(name)
                if existing is not None and not force and not _blocking_failures(
                        existing, config.allow_gate_failures):
                    continue
                if force and existing is not None:
                    if main:
                        rd.set_aside(name)
                    barrier()
                write_status(rd.path, current_stage=name, progress={})
                verdict = stage_function(name)(ctx)
                if name == "evaluation":
                    _after_evaluation(ctx, verdict)
                allowed = [g.name for g in verdict.gates
                           if g.status == "fail" and g.name in config.allow_gate_failures]
                if allowed:
                    verdict.warnings.append(
                        f"gate(s) {', '.join(allowed)} failed; the run continued because the "
                        "config lists them in allow_gate_failures")
                    verdict.findings["allowed_failures"] = allowed
                rd.write_verdict(name, verdict)
                barrier()
                blocking = _blocking_failures(verdict, config.allow_gate_failures)
                if blocking:
                    state = "failed"
                    write_status(rd.path, state=state, current_stage=name,
                                 message=f"stopped at {name}: gate(s) {', '.join(blocking)} failed")
                    _write_report(rd.path)
                    return run_status(rd.path)
            open_gates = unresolved_unmeasured([rd.read_verdict(n) for n in todo])
            if open_gates:
                state = "incomplete"
        except KeyboardInterrupt:
            write_status(rd.path, state="interrupted", message="interrupted")
            raise
        except BaseException as e:
            write_status(rd.path, state="interrupted", message=f"{type(e).__name__}: {e}")
            raise
        write_status(rd.path, state=state, current_stage=None,
                     message="all stages complete" if state == "passed" else
                     "complete, but unmeasured: " + ", ".join(open_gates))
        _write_report(rd.path)
    return run_status(rd.path)


def unresolved_unmeasured(verdicts: list[StageVerdict | None]) -> list[str]:
    """Gates left ``unmeasured`` that no later stage measured, as ``stage:gate``.

    A later stage may measure a gate an earlier one could not: stage 4 measures
    ``preference_gap`` with its reward model when the data had no scores. Such a gate is
    resolved; any other unmeasured gate makes the run ``incomplete``.
    """
    out = []
    vs = [v for v in verdicts if v is not None]
    for i, v in enumerate(vs):
        for g in v.gates:
            if g.status != "unmeasured":
                continue
            if any(h.name == g.name and h.status != "unmeasured" for w in vs[i + 1:] for h in w.gates):
                continue
            out.append(f"{v.stage}:{g.name}")
    return out


def _write_report(run_dir: Path) -> None:
    """Write report.html / report.md (rank 0). A report error is a warning, never a failed
    run: the verdicts on disk are the record."""
    if not is_main_process():
        return
    try:
        write_report(run_dir)
    except Exception as e:  # noqa: BLE001
        import warnings

        warnings.warn(f"run report not written: {type(e).__name__}: {e}", stacklevel=2)


def run_pipeline(config: RunConfig, *, progress: ProgressFn | None = None) -> RunStatus:
    """Create a run directory for ``config`` and run every configured stage."""
    run_dir = create_run(config)
    return run_stages(run_dir, progress=progress)


def resume(run_dir: str | Path, *, progress: ProgressFn | None = None) -> RunStatus:
    """Continue a run from its first stage without a passing verdict."""
    return run_stages(Path(run_dir), progress=progress, job="resume")
