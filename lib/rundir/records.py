"""A run's records: creating it (``run.json``), its config, its status for pollers."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from ..config import RunConfig
from ..distributed import is_main_process
from ..errors import InputError
from ..fileio import write_json_atomic
from ..gates import StageVerdict
from ..provenance import hardware_summary, package_versions
from ..stages.registry import STAGES
from .layout import RunDir
from .lock import pid_alive, read_lock

RunState = Literal["created", "running", "passed", "failed", "incomplete", "interrupted"]


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


def create_run(config: RunConfig) -> Path:
    """Make ``<output_dir>/<run_id>/`` with run.json. The run id defaults to a timestamp."""
    run_id = config.run_id or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    rd = RunDir(Path(config.output_dir) / run_id)
    if rd.exists():
        raise InputError(f"run '{run_id}' already exists in {config.output_dir} "
                         "(use `realign resume` or another run_id)")
    config = config.model_copy(update={"run_id": run_id})
    write_json_atomic(rd.run_json, {
        "run_id": run_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "versions": package_versions(),
        "hardware": hardware_summary(),
    })
    write_status(rd.path, state="created")
    return rd.path


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config recorded in ``run.json`` (InputError when absent or invalid)."""
    p = RunDir(run_dir).run_json
    if not p.exists():
        raise InputError("not a run directory (no run.json)", file=run_dir)
    try:
        return RunConfig.model_validate(json.loads(p.read_text(encoding="utf-8"))["config"])
    except (ValidationError, ValueError, KeyError) as e:
        raise InputError(f"run.json holds no valid config ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0]})", file=p) from None


def write_status(run_dir: str | Path, **fields: Any) -> None:
    """Merge ``fields`` into ``status.json`` with an ``updated`` time (rank 0 only)."""
    if not is_main_process():
        return
    p = RunDir(run_dir).status_json
    try:
        cur = json.loads(p.read_text()) if p.exists() else {}
    except ValueError:
        cur = {}
    cur.update(fields, updated=_dt.datetime.now(_dt.timezone.utc).isoformat())
    write_json_atomic(p, cur)


def run_status(run_dir: str | Path) -> RunStatus:
    """The run's state, current stage, progress and verdicts, read from disk. A run that
    says ``running`` but whose lock holder is gone is ``interrupted``."""
    rd = RunDir(run_dir)
    config = load_run_config(rd.path)
    try:
        st = json.loads(rd.status_json.read_text())
    except (OSError, ValueError):
        st = {}
    lock = read_lock(rd.path)
    state = st.get("state", "created")
    if state == "running" and not (lock and pid_alive(lock.get("pid"))):
        state = "interrupted"
    stages = []
    for name in config.stages:
        v = rd.read_verdict(name)
        if v is not None:
            s = v.status
        elif st.get("current_stage") == name and state == "running":
            s = "running"
        else:
            s = "pending"
        stages.append(StageStatus(name=name, number=STAGES[name], status=s, verdict=v))
    return RunStatus(run_id=rd.run_id, run_dir=str(rd.path), state=state,
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
        if RunDir(d).exists():
            out.append(run_status(d))
    return out
