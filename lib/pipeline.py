"""The pipeline: runs the stages in order, enforces the gates, triggers rollback.

Rules:

* Stages run in the order of the stage registry (:data:`realign.stages.registry.STAGES`);
  stage ``<name>`` is the function ``run`` of ``realign.stages.<name>``.
* A stage whose verdict is ``fail`` stops the run, unless every failed gate is listed
  in ``allow_gate_failures`` (the verdict then records the override). ``incomplete``
  (a gate unmeasured) does not stop the run, but the run ends ``incomplete`` unless a
  later stage measured that gate (:func:`unresolved_unmeasured`).
* The run's final state (:func:`final_state`): ``failed`` when a gate failed that the
  config does not allow; else ``passed_with_failures`` when a gate failed that it
  allows; else ``incomplete`` when a gate is left unmeasured; else ``passed`` (every gate
  of every stage run passed). Exit codes: :data:`realign.gates.RUN_EXIT`.
* When stage 7 rejects the policy and ``evaluation.rollback_on_regression`` is true,
  :func:`realign.rollback.rollback` restores the best earlier model that passes (same as
  ``realign rollback RUN``); the stage-7 verdict records what was restored.
* A stage is complete when its ``verdict.json`` exists; :func:`resume` skips complete
  stages and restarts the first incomplete one (stage 5 continues from its last on-disk
  checkpoint). A stage is rerun instead of skipped when its verdict is stale (an earlier
  stage it reads was rerun and its artifacts changed; the old folder is moved aside) or
  unreadable (the corrupt ``verdict.json`` is moved aside). One job at a time per run
  directory (:class:`realign.rundir.RunLock`); a job starts by removing the temp files
  a killed job left there.
* :func:`preflight` checks a config before a run directory exists (``realign run``
  calls it, then :func:`create_run`).

Where every file lives is :class:`realign.rundir.RunDir`'s business, not this module's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .config import RunConfig
from .distributed import barrier, is_main_process
from .errors import InputError
from .gates import RunState, StageVerdict, Thresholds, remedy_context_from_config
from .report import write_report
from .rollback import rollback
from .rundir import (
    CorruptVerdictError,
    RunBusyError,
    RunDir,
    RunLock,
    RunStatus,
    check_run_id,
    create_run,
    list_runs,
    load_run_config,
    run_status,
    write_status,
)
from .stages import (
    dpo,
    evaluation,
    iterative,
    preference_data,
    reference_init,
    reward_model,
    sft_baseline,
)
from .stages.context import ProgressFn, RunContext
from .stages.registry import REGISTRY, STAGES

__all__ = ["RunBusyError", "RunStatus", "create_run", "final_state", "list_runs",
           "load_run_config", "preflight", "resume", "run_pipeline", "run_stages", "run_status",
           "stage_function", "unresolved_unmeasured"]

#: The function that runs each built stage (the registry names the module).
_RUNNERS: dict[str, Callable[[RunContext], StageVerdict]] = {
    m.NAME: m.run for m in (sft_baseline, preference_data, reference_init, reward_model, dpo,
                            iterative, evaluation)
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

    ``force`` reruns stages that already have a verdict. A stale or unreadable verdict
    is rerun too. Returns the final status.
    """
    rd = RunDir(run_dir)
    config = load_run_config(rd.path)
    todo = [s for s in STAGES if s in (stages or config.stages)]
    thresholds = Thresholds(preset=config.preset, overrides=config.thresholds).with_context(
        **remedy_context_from_config(config, rd.path))
    main = is_main_process()

    # Under a multi-process launch every rank runs the stages (DDP needs them all);
    # rank 0 alone holds the lock and writes status and verdicts.
    with RunLock(rd.path, job) if main else nullcontext():
        if main:
            rd.clean_temp_files()  # left by a killed job; nobody else writes here now
        last_write = [0.0]

        def report(done: float, total: float | None, msg: str) -> None:
            now = time.monotonic()
            if now - last_write[0] >= 0.5 or (total is not None and done >= total):
                last_write[0] = now
                write_status(rd.path, progress={"done": done, "total": total, "message": msg})
            if progress:
                progress(done, total, msg)

        # the backend of stages 1, 3, 5 and 6, resolved once for the whole job
        from .backends import resolve_backend_name

        ctx = RunContext(config=config, run_dir=rd.path, thresholds=thresholds, progress=report,
                         backend_name=resolve_backend_name(config.backend))
        write_status(rd.path, state="running", pid=os.getpid(), message="")
        try:
            for name in todo:
                barrier()  # every rank decides on the same files
                notes: list[str] = []
                corrupt: CorruptVerdictError | None = None
                try:
                    existing = rd.read_verdict(name)
                except CorruptVerdictError as e:
                    existing, corrupt = None, e
                stale = rd.stale_inputs(name, existing) if existing is not None else []
                if existing is not None and not force and not stale and not _blocking_failures(
                        existing, config.allow_gate_failures):
                    continue
                barrier()  # every rank has read before rank 0 moves anything
                if corrupt is not None:
                    kept = rd.set_aside_verdict(name) if main else None
                    notes.append(f"rerun: the previous verdict was unreadable ({corrupt.message})"
                                 + (f"; kept as {kept.name}" if kept else ""))
                elif existing is not None and (force or stale):
                    if stale:
                        notes.append("rerun: stale, the artifacts of "
                                     f"{', '.join(stale)} changed since it ran")
                    if main:
                        rd.set_aside(name)
                barrier()
                write_status(rd.path, current_stage=name, progress={})
                inputs = rd.input_digests(name)
                ctx.thresholds = thresholds.with_context(**_stage_remedy_context(rd, name))
                verdict = stage_function(name)(ctx)
                verdict.inputs = inputs
                verdict.warnings.extend(notes)
                # stages 1, 3, 5 and 6 record the run's backend; the others run on PyTorch
                verdict.findings.setdefault("backend", ctx.backend_findings("trl"))
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
                    write_status(rd.path, state="failed", current_stage=name,
                                 message=f"stopped at {name}: gate(s) {', '.join(blocking)} failed")
                    _write_report(rd.path)
                    return run_status(rd.path)
            state, message = final_state([rd.read_verdict(n) for n in todo],
                                         config.allow_gate_failures)
        except KeyboardInterrupt:
            write_status(rd.path, state="interrupted", message="interrupted")
            raise
        except BaseException as e:
            write_status(rd.path, state="interrupted", message=f"{type(e).__name__}: {e}")
            raise
        write_status(rd.path, state=state, current_stage=None, message=message)
        _write_report(rd.path)
    return run_status(rd.path)


def _stage_remedy_context(rd: RunDir, name: str) -> dict[str, str]:
    """What a stage's remedies name beyond the config: for stage 7, the first model
    ``realign rollback`` would try (:func:`realign.rollback.rollback_candidates`)."""
    if name != "evaluation":
        return {}
    from .rollback import rollback_candidates

    try:
        first = rollback_candidates(rd.path)[0]
    except Exception:  # noqa: BLE001 - a remedy detail never fails a run
        return {}
    return {"candidate": "the stage-1 baseline" if first.source == "baseline"
            else f"{first.name}, {first.path}"}


def final_state(verdicts: Sequence[StageVerdict | None], allowed: Sequence[str] = ()
                ) -> tuple[RunState, str]:
    """The state a run ends in after its stages ran, with a message.

    ``failed``: a gate failed that ``allowed`` (the config's ``allow_gate_failures``) does
    not list; else ``passed_with_failures``: every failed gate is allowed; else
    ``incomplete``: a gate is unmeasured and no later stage measured it
    (:func:`unresolved_unmeasured`); else ``passed``: every gate passed. A failure
    outranks an unmeasured gate; the message names both.
    """
    vs = [v for v in verdicts if v is not None]
    failed = [f"{v.stage}:{g.name}" for v in vs for g in v.gates if g.status == "fail"]
    blocking = [f for f in failed if f.split(":", 1)[1] not in allowed]
    open_gates = unresolved_unmeasured(list(vs))
    tail = f"; unmeasured: {', '.join(open_gates)}" if open_gates else ""
    if blocking:
        return "failed", f"gate(s) {', '.join(blocking)} failed" + tail
    if failed:
        return "passed_with_failures", ("complete with failed gates the config allows "
                                        f"(allow_gate_failures): {', '.join(failed)}" + tail)
    if open_gates:
        return "incomplete", "complete, but unmeasured: " + ", ".join(open_gates)
    return "passed", "all stages complete"


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


def _config_line(source: str | Path | None, field: str) -> int | None:
    """The line of ``field`` (dotted) in the YAML config ``source``, when it says."""
    if source is None:
        return None
    try:
        import yaml

        from .config import _line_of

        raw = yaml.compose(Path(source).read_text(encoding="utf-8"))
        return _line_of(raw, field.split("."))
    except Exception:  # noqa: BLE001 - the line is a courtesy; the field is named anyway
        return None


def _looks_local(value: str) -> bool:
    """A model/data value that is meant as a local path (not a hub id ``org/name``)."""
    return value.startswith((".", "/", "~")) or value.endswith(
        (".jsonl", ".json", ".parquet", ".ndjson", ".txt")) or \
        (os.sep in value and value.count("/") != 1)


def preflight(config: RunConfig, *, stages: Sequence[str] | None = None,
              source: str | Path | None = None) -> None:
    """Check a run config before its run directory exists; raise :class:`InputError`.

    What the stages to run (``stages``, default the config's) will need: a safe
    ``run_id``; ``output_dir`` a folder (or absent); ``dpo.max_steps`` /
    ``reward.max_steps`` / ``sft.max_steps`` (with ``sft.dataset``) not 0 (≥ 1, or -1 for
    epochs); the local ``model`` path (``default`` and hub ids are not checked here);
    ``data``, read through :class:`realign.data.PairSource` (every row parsed: a bad row
    is named by file, line and field unless ``skip_bad_rows``), or ``prompts`` (every row
    parsed; the generation scorer usable); ``backend: mlx`` installed (mlx and mlx-lm) when
    a stage that runs on it is to run; each of ``eval_sets``
    (:func:`realign.decontamination.load_eval_set`); ``sft.dataset``. ``source``, the
    config file, lets errors in config fields name their line. Nothing is written.
    """
    todo = [s for s in STAGES if s in (stages or config.stages)]

    def bad(msg: str, field: str, file: str | Path | None = None) -> InputError:
        if file is None:
            return InputError(msg, file=source, line=_config_line(source, field), field=field)
        return InputError(msg, file=file, field=field)

    if config.run_id is not None:
        try:
            check_run_id(config.run_id)
        except InputError as e:
            raise bad(e.message, "run_id") from None
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise bad(f"output_dir {str(out)!r} is not a folder", "output_dir")
    from .backends import BACKEND_STAGES, mlx_installed

    if config.backend == "mlx" and any(s in BACKEND_STAGES for s in todo) and not mlx_installed():
        raise bad("backend is mlx but mlx and mlx-lm are not installed: pip install -e '.[mlx]' "
                  "(mlx[cpu] on Linux, mlx on Apple Silicon), or set backend: trl / auto", "backend")
    if config.backend == "mlx" and ("dpo" in todo or "iterative" in todo) and mlx_installed():
        from .backends.mlx_dpo import EXTRA_DEFAULTS, EXTRA_IGNORED, LOSS_TYPES
        from .dpo_round_mlx import MLX_DROPPED_EXTRA

        lt = config.dpo.loss_type
        for t in [lt] if isinstance(lt, str) else list(lt):
            if t not in LOSS_TYPES:
                raise bad(f"loss type {t!r} is not implemented by the MLX backend (it has "
                          f"{', '.join(LOSS_TYPES)}); use backend: trl", "dpo.loss_type")
        unknown = sorted(set(config.dpo.extra) - set(EXTRA_DEFAULTS) - EXTRA_IGNORED
                         - set(MLX_DROPPED_EXTRA))
        if unknown:
            raise bad(f"dpo.extra keys the MLX backend does not implement: {', '.join(unknown)} "
                      f"(it has {', '.join(EXTRA_DEFAULTS)}); use backend: trl", "dpo.extra")
    if config.backend == "mlx" and "sft_baseline" in todo and config.sft.dataset:
        raise bad("stage 1's SFT fine-tune (sft.dataset) runs on TRL only: use backend: trl, or "
                  "run stage 1 with backend: trl first", "sft.dataset")
    steps = []
    if "dpo" in todo:
        steps.append(("dpo.max_steps", config.dpo.max_steps))
    if "reward_model" in todo:
        steps.append(("reward.max_steps", config.reward.max_steps))
    if "sft_baseline" in todo and config.sft.dataset:
        steps.append(("sft.max_steps", config.sft.max_steps))
    for field, n in steps:
        if n == 0 or n < -1:
            raise bad(f"{n} optimizer steps trains nothing: use ≥ 1, or -1 to train for "
                      "num_epochs epochs", field)
    if any(s != "preference_data" for s in todo) and config.model != "default":
        m = Path(config.model).expanduser()
        if not m.exists() and _looks_local(config.model):
            raise bad(f"model path {config.model!r} does not exist", "model")
    if "sft_baseline" in todo and config.sft.dataset:
        d = Path(config.sft.dataset).expanduser()
        if not d.exists() and _looks_local(config.sft.dataset):
            raise bad(f"sft.dataset {config.sft.dataset!r} does not exist", "sft.dataset")
    if config.prompts is not None and ("preference_data" in todo or "sft_baseline" in todo):
        from .generation import read_prompt_rows

        if not Path(config.prompts).expanduser().exists():
            raise bad(f"prompts file {config.prompts!r} does not exist", "prompts")
        rows = read_prompt_rows(config.prompts)  # every row parsed; the first bad one raises
        if "preference_data" in todo:
            _check_scorer(config, rows, bad)
    if "preference_data" in todo:
        from .data import PairSource
        from .decontamination import load_eval_set

        if config.data is not None:
            if not Path(config.data).expanduser().exists() and _looks_local(config.data):
                raise bad(f"data file {config.data!r} does not exist", "data")
            src = PairSource(config.data, split=config.data_split,
                             skip_bad_rows=config.skip_bad_rows)
            if src.format != "hub":
                for _ in src.blocks():  # every row parsed; the first bad one raises
                    pass
        for i, e in enumerate(config.eval_sets):
            if not Path(e).expanduser().exists():
                raise bad(f"eval set {e!r} does not exist", f"eval_sets.{i}")
            load_eval_set(e, config.eval_field)


def _check_scorer(config: RunConfig, rows: Sequence[Any],
                  bad: Callable[[str, str], InputError]) -> None:
    """Generation mode: stage 2 can score the samples (the verifier needs ground truth in
    the rows; a reward model must be given, since stage 4 runs after stage 2)."""
    g = config.generation
    truth = any(r.truth.get(k) is not None for r in rows
                for k in ("answer", "tests", "instructions", "instruction_id_list"))
    scorer = g.scorer if g.scorer != "auto" else ("verifier" if truth else "reward_model")
    if scorer == "verifier" and not truth:
        raise bad("generation.scorer is verifier but no prompt row carries an answer, tests "
                  "or instructions", "generation.scorer")
    if scorer == "reward_model":
        if not g.reward_model:
            raise bad("the prompts carry no ground truth for the verifier: set "
                      "generation.reward_model to a trained reward model to score the "
                      "samples with", "generation.reward_model")
        if not Path(g.reward_model).expanduser().is_dir():
            raise bad(f"generation.reward_model {g.reward_model!r} is not a folder",
                      "generation.reward_model")


def run_pipeline(config: RunConfig, *, progress: ProgressFn | None = None) -> RunStatus:
    """Check ``config`` (:func:`preflight`), create its run directory and run every
    configured stage."""
    preflight(config)
    run_dir = create_run(config)
    return run_stages(run_dir, progress=progress)


def resume(run_dir: str | Path, *, progress: ProgressFn | None = None) -> RunStatus:
    """Continue a run from its first stage without a passing verdict (stale and unreadable
    verdicts are rerun)."""
    return run_stages(Path(run_dir), progress=progress, job="resume")
