"""The pipeline: runs stages in order, enforces gates, keeps the run directory.

Run directory (DESIGN.md)::

    runs/<run-id>/run.json                       config, seed, package versions, hardware
    runs/<run-id>/status.json                    current stage, progress, state (for pollers)
    runs/<run-id>/stages/<k>-<name>/verdict.json gate results + artifact hashes
    runs/<run-id>/stages/<k>-<name>/...          checkpoints, metrics.jsonl, data

Rules:

* Stages run in the order of :data:`realign.config.STAGES`.
* A stage whose verdict is ``fail`` stops the run, unless every failed gate is listed
  in ``allow_gate_failures`` (the verdict then records the override). ``incomplete``
  (a gate unmeasured) does not stop the run, but the run ends ``incomplete`` unless a
  later stage measured that gate (:func:`unresolved_unmeasured`).
* Every file is written atomically (temp file + rename). A stage is complete when its
  ``verdict.json`` exists; :func:`resume` skips complete stages and restarts the first
  incomplete one (stage 5 continues from its last on-disk checkpoint).
* One job at a time per run directory (:class:`RunLock`, a lock file holding the pid).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from .config import STAGES, RunConfig
from .errors import InputError, RealignError
from .gates import StageVerdict, Thresholds

#: progress(done, total, message); total None when unknown.
ProgressFn = Callable[[float, float | None, str], None]
RunState = Literal["created", "running", "passed", "failed", "incomplete", "interrupted"]


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a multi-process launch (accelerate, torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return max(int(os.environ.get("WORLD_SIZE", "1")), 1)


def _barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


class RunBusyError(RealignError):
    """Another job holds this run directory."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if isinstance(data, BaseModel):
                fh.write(data.model_dump_json(indent=2))
            else:
                json.dump(data, fh, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (sorted relative paths and contents)."""
    h = hashlib.sha256()
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in paths:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


class StageStatus(BaseModel):
    name: str
    number: int
    status: Literal["pending", "running", "pass", "fail", "incomplete"]
    verdict: StageVerdict | None = None


class RunStatus(BaseModel):
    """What a poller sees: state, current stage, progress, every verdict so far."""

    run_id: str
    run_dir: str
    state: RunState
    current_stage: str | None = None
    progress: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageStatus] = Field(default_factory=list)
    message: str = ""
    pid: int | None = None


@dataclass
class RunContext:
    """What a stage function receives."""

    config: RunConfig
    run_dir: Path
    thresholds: Thresholds
    progress: ProgressFn = field(default=lambda done, total, msg: None)

    def stage_dir(self, name: str) -> Path:
        d = self.run_dir / "stages" / f"{STAGES[name]}-{name}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def verdict(self, name: str) -> StageVerdict | None:
        p = self.run_dir / "stages" / f"{STAGES[name]}-{name}" / "verdict.json"
        if not p.exists():
            return None
        return StageVerdict.model_validate_json(p.read_text(encoding="utf-8"))

    def artifact(self, stage: str, key: str) -> Any:
        """An artifact recorded by an earlier stage's verdict (None if absent)."""
        v = self.verdict(stage)
        return None if v is None else v.artifacts.get(key)


class RunLock:
    """A lock file ``run.lock`` holding the owner's pid and job; stale locks are taken over."""

    def __init__(self, run_dir: Path, job: str) -> None:
        self.path = run_dir / "run.lock"
        self.job = job

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = read_lock(self.path.parent)
                if holder and pid_alive(holder.get("pid")):
                    raise RunBusyError(
                        f"{self.path.parent} is busy: job '{holder.get('job')}' (pid "
                        f"{holder.get('pid')}, since {holder.get('since')}) is running") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "job": self.job,
                           "since": _dt.datetime.now(_dt.timezone.utc).isoformat()}, fh)
            return self

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def read_lock(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "run.lock").read_text())
    except (OSError, ValueError):
        return None


def pid_alive(pid: Any) -> bool:
    """True when a process with this pid exists (a lock holder still running)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("realign", "torch", "transformers", "trl", "peft", "accelerate", "datasets",
                "pyarrow", "lm_eval", "mlx", "mlx_lm"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def _hardware() -> dict[str, Any]:
    hw: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                          "cpu_count": os.cpu_count()}
    try:
        import torch

        hw["cuda"] = torch.cuda.is_available()
        if hw["cuda"]:
            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        hw["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        hw["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return hw


def create_run(config: RunConfig) -> Path:
    """Make ``<output_dir>/<run_id>/`` with run.json. The run id defaults to a timestamp."""
    run_id = config.run_id or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.output_dir) / run_id
    if (run_dir / "run.json").exists():
        raise InputError(f"run '{run_id}' already exists in {config.output_dir} "
                         "(use `realign resume` or another run_id)")
    config = config.model_copy(update={"run_id": run_id})
    write_json_atomic(run_dir / "run.json", {
        "run_id": run_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "versions": _versions(),
        "hardware": _hardware(),
    })
    _write_status(run_dir, state="created")
    return run_dir


def load_run_config(run_dir: Path) -> RunConfig:
    p = Path(run_dir) / "run.json"
    if not p.exists():
        raise InputError("not a run directory (no run.json)", file=run_dir)
    from pydantic import ValidationError

    try:
        return RunConfig.model_validate(json.loads(p.read_text(encoding="utf-8"))["config"])
    except (ValidationError, ValueError, KeyError) as e:
        raise InputError(f"run.json holds no valid config ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0]})", file=p) from None


def _write_status(run_dir: Path, **fields: Any) -> None:
    if not is_main_process():
        return
    p = run_dir / "status.json"
    try:
        cur = json.loads(p.read_text()) if p.exists() else {}
    except ValueError:
        cur = {}
    cur.update(fields, updated=_dt.datetime.now(_dt.timezone.utc).isoformat())
    write_json_atomic(p, cur)


def stage_function(name: str) -> Callable[[RunContext], StageVerdict]:
    """The stage's entry point: ``realign.stages.<name>.run``."""
    import importlib

    return importlib.import_module(f"realign.stages.{name}").run  # type: ignore[no-any-return]


def _blocking_failures(verdict: StageVerdict, allowed: list[str]) -> list[str]:
    return [g.name for g in verdict.gates if g.status == "fail" and g.name not in allowed]


def _set_aside(stage_dir: Path) -> None:
    """Move a stage folder out of the way before a forced rerun (nothing is deleted)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.replace(stage_dir, stage_dir.with_name(f".{stage_dir.name}.replaced-{stamp}"))


def run_stages(run_dir: Path, *, stages: list[str] | None = None, force: bool = False,
               progress: ProgressFn | None = None, job: str = "run") -> RunStatus:
    """Run the configured stages of a run directory in order (skipping complete ones).

    ``force`` reruns stages that already have a verdict. Returns the final status.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    todo = [s for s in STAGES if s in (stages or config.stages)]
    thresholds = Thresholds(preset=config.preset, overrides=config.thresholds)
    main = is_main_process()
    from contextlib import nullcontext

    # Under a multi-process launch every rank runs the stages (DDP needs them all);
    # rank 0 alone holds the lock and writes status and verdicts.
    with RunLock(run_dir, job) if main else nullcontext():
        last_write = [0.0]

        def report(done: float, total: float | None, msg: str) -> None:
            now = time.monotonic()
            if now - last_write[0] >= 0.5 or (total is not None and done >= total):
                last_write[0] = now
                _write_status(run_dir, progress={"done": done, "total": total, "message": msg})
            if progress:
                progress(done, total, msg)

        ctx = RunContext(config=config, run_dir=run_dir, thresholds=thresholds, progress=report)
        _write_status(run_dir, state="running", pid=os.getpid(), message="")
        state: RunState = "passed"
        try:
            for name in todo:
                existing = ctx.verdict(name)
                if existing is not None and not force and not _blocking_failures(
                        existing, config.allow_gate_failures):
                    continue
                if force and existing is not None:
                    if main:
                        _set_aside(ctx.stage_dir(name))
                    _barrier()
                _write_status(run_dir, current_stage=name, progress={})
                verdict = stage_function(name)(ctx)
                allowed = [g.name for g in verdict.gates
                           if g.status == "fail" and g.name in config.allow_gate_failures]
                if allowed:
                    verdict.warnings.append(
                        f"gate(s) {', '.join(allowed)} failed; the run continued because the "
                        "config lists them in allow_gate_failures")
                    verdict.findings["allowed_failures"] = allowed
                if main:
                    write_json_atomic(ctx.stage_dir(name) / "verdict.json", verdict)
                _barrier()
                blocking = _blocking_failures(verdict, config.allow_gate_failures)
                if blocking:
                    state = "failed"
                    _write_status(run_dir, state=state, current_stage=name,
                                  message=f"stopped at {name}: gate(s) {', '.join(blocking)} failed")
                    _write_report(run_dir)  # report hook (lib/report.py)
                    return run_status(run_dir)
            open_gates = unresolved_unmeasured([ctx.verdict(n) for n in todo])
            if open_gates:
                state = "incomplete"
        except KeyboardInterrupt:
            _write_status(run_dir, state="interrupted", message="interrupted")
            raise
        except BaseException as e:
            _write_status(run_dir, state="interrupted", message=f"{type(e).__name__}: {e}")
            raise
        _write_status(run_dir, state=state, current_stage=None,
                      message="all stages complete" if state == "passed" else
                      "complete, but unmeasured: " + ", ".join(open_gates))
        _write_report(run_dir)  # report hook (lib/report.py)
    return run_status(run_dir)


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
    """Report hook: write report.html / report.md (rank 0). A report error is a warning,
    never a failed run: the verdicts on disk are the record."""
    if not is_main_process():
        return
    try:
        from .report import write_report

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


def run_status(run_dir: str | Path) -> RunStatus:
    """The run's state, current stage, progress and verdicts, read from disk."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    try:
        st = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        st = {}
    lock = read_lock(run_dir)
    state = st.get("state", "created")
    if state == "running" and not (lock and pid_alive(lock.get("pid"))):
        state = "interrupted"
    ctx = RunContext(config=config, run_dir=run_dir, thresholds=Thresholds())
    stages = []
    for name in config.stages:
        v = ctx.verdict(name)
        if v is not None:
            s = v.status
        elif st.get("current_stage") == name and state == "running":
            s = "running"
        else:
            s = "pending"
        stages.append(StageStatus(name=name, number=STAGES[name], status=s, verdict=v))
    return RunStatus(run_id=run_dir.name, run_dir=str(run_dir), state=state,
                     current_stage=st.get("current_stage"), progress=st.get("progress") or {},
                     stages=stages, message=st.get("message", ""),
                     pid=(lock or {}).get("pid") if state == "running" else None)


def list_runs(root: str | Path = "runs") -> list[RunStatus]:
    """Every run directory under ``root`` (newest first)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if (d / "run.json").exists():
            out.append(run_status(d))
    return out


@contextmanager
def metrics_log(path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Append JSON lines to ``metrics.jsonl`` (flushed per line, so a kill loses nothing)."""
    if not is_main_process():
        yield lambda record: None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        def write(record: dict[str, Any]) -> None:
            fh.write(json.dumps(record, default=float) + "\n")
            fh.flush()

        yield write

