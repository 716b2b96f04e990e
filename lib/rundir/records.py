"""A run's records: creating it (``run.json``), its config, its status for pollers.

A run directory is claimed with one ``os.mkdir`` (:func:`create_run`): of two starts
on the same run id exactly one creates the folder; the other is refused before it has
written anything.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from ..config import RunConfig, validate_run_id
from ..distributed import is_main_process
from ..errors import InputError
from ..fileio import write_json_atomic
from ..gates import RunState, StageVerdict
from ..provenance import hardware_summary, package_versions
from ..stages.registry import STAGES
from .layout import CorruptVerdictError, RunDir
from .lock import pid_alive, read_lock

#: Timestamped run ids tried before giving up (``<time>``, ``<time>-2``, ...).
_MAX_ID_TRIES = 1000


class StageStatus(BaseModel):
    """One configured stage of a run. ``stale``: its verdict was computed from an earlier
    stage's artifacts that have changed since (``note`` says which; ``resume`` reruns
    it). ``corrupt``: its ``verdict.json`` is unreadable (``note`` says why; ``resume``
    reruns it)."""

    name: str
    number: int
    status: Literal["pending", "running", "pass", "fail", "incomplete", "stale", "corrupt"]
    verdict: StageVerdict | None = None
    note: str = ""


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
    allowed_failures: list[str] = Field(
        default_factory=list,
        description="failed gates the config allows (allow_gate_failures), as stage:gate")
    stale: list[str] = Field(
        default_factory=list,
        description="stages whose verdict is stale (an earlier stage was rerun since); "
                    "resume reruns them")


def check_run_id(run_id: str) -> str:
    """``run_id`` when it is one safe folder name (:func:`realign.config.validate_run_id`),
    else :class:`InputError` naming the field."""
    try:
        return validate_run_id(run_id)
    except ValueError as e:
        raise InputError(str(e), field="run_id") from None


def _claim(parent: Path, run_id: str | None) -> Path:
    """Create the run folder with one ``os.mkdir``: whoever creates it owns the run. A given
    id that exists is refused; a timestamp id that exists gets ``-2``, ``-3``, ..."""
    if run_id is not None:
        check_run_id(run_id)  # before anything is created
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the runs folder: {e.strerror or e}",
                         file=parent, field="output_dir") from None
    if not parent.is_dir():
        raise InputError("output_dir is not a folder", file=parent, field="output_dir")
    if run_id is not None:
        d = parent / check_run_id(run_id)
        try:
            os.mkdir(d)
        except FileExistsError:
            what = ("use `realign resume` or another run_id" if RunDir(d).exists() else
                    "it holds no run.json: a start that was killed, or not a run; remove it "
                    "or use another run_id")
            raise InputError(f"run '{run_id}' already exists in {parent} ({what})",
                             field="run_id") from None
        except OSError as e:
            raise InputError(f"cannot create the run directory: {e.strerror or e}",
                             file=d) from None
        return d
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in range(1, _MAX_ID_TRIES + 1):
        d = parent / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            os.mkdir(d)
            return d
        except FileExistsError:
            continue
        except OSError as e:
            raise InputError(f"cannot create the run directory: {e.strerror or e}",
                             file=d) from None
    raise InputError(f"{_MAX_ID_TRIES} runs named {stamp}-* exist already; give a run_id",
                     file=parent)


def create_run(config: RunConfig) -> Path:
    """Make ``<output_dir>/<run_id>/`` with run.json and status.json, and return it.

    The run id defaults to a timestamp (``YYYYMMDD-HHMMSS``, with ``-2``, ``-3``, ... when
    that folder exists). The folder itself is the claim (:func:`os.mkdir`): when it
    already exists this raises :class:`InputError` and writes nothing. A failure after the
    claim removes the folder again, so nothing half-made stays.
    """
    rd = RunDir(_claim(Path(config.output_dir), config.run_id))
    try:
        cfg = config.model_copy(update={"run_id": rd.run_id})
        write_json_atomic(rd.run_json, {
            "run_id": rd.run_id,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "config": cfg.model_dump(mode="json"),
            "seed": cfg.seed,
            "versions": package_versions(),
            "hardware": hardware_summary(),
        })
        write_status(rd.path, state="created")
    except BaseException:
        shutil.rmtree(rd.path, ignore_errors=True)
        raise
    return rd.path


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config recorded in ``run.json`` (InputError when absent or invalid)."""
    p = RunDir(run_dir).run_json
    if not p.exists():
        raise InputError("not a run directory (no run.json)", file=run_dir)
    try:
        return RunConfig.model_validate(json.loads(p.read_text(encoding="utf-8"))["config"])
    except OSError as e:
        raise InputError(f"run.json cannot be read ({e.strerror or e})", file=p) from None
    except (ValidationError, ValueError, KeyError, TypeError) as e:
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
    says ``running`` but whose lock holder is gone is ``interrupted``. A stage whose
    verdict is unreadable is ``corrupt``; one whose inputs changed since it ran is
    ``stale`` (both with a ``note``, and named in the message)."""
    rd = RunDir(run_dir)
    config = load_run_config(rd.path)
    notes: list[str] = []
    try:
        st = json.loads(rd.status_json.read_text(encoding="utf-8"))
        if not isinstance(st, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        st = {}
    except (OSError, ValueError) as e:
        st = {}
        notes.append(f"status.json is unreadable ({type(e).__name__})")
    lock = read_lock(rd.path)
    state = st.get("state", "created")
    if state == "running" and not (lock and pid_alive(lock.get("pid"))):
        state = "interrupted"
    stale = rd.stale_stages(config.stages)
    stages = []
    allowed: list[str] = []
    for name in config.stages:
        note = ""
        try:
            v = rd.read_verdict(name)
        except CorruptVerdictError as e:
            v, s, note = None, "corrupt", str(e)
            notes.append(f"stage {name}: {e}")
        else:
            if v is not None:
                s = v.status
                allowed += [f"{name}:{g.name}" for g in v.gates
                            if g.status == "fail" and g.name in config.allow_gate_failures]
                if name in stale:
                    s, note = "stale", stale[name]
            elif st.get("current_stage") == name and state == "running":
                s = "running"
            else:
                s = "pending"
        stages.append(StageStatus(name=name, number=STAGES[name], status=s, verdict=v, note=note))
    if stale:
        notes.append("stale (resume reruns them): " + "; ".join(f"{k} ({why})" for k, why in stale.items()))
    message = st.get("message", "")
    message = " · ".join([message] + notes) if message and notes else message or " · ".join(notes)
    return RunStatus(run_id=rd.run_id, run_dir=str(rd.path), state=state,
                     current_stage=st.get("current_stage"), progress=st.get("progress") or {},
                     stages=stages, message=message,
                     pid=(lock or {}).get("pid") if state == "running" else None,
                     allowed_failures=allowed, stale=list(stale))


def list_runs(root: str | Path = "runs") -> list[RunStatus]:
    """Every run directory under ``root`` (newest first). A run whose ``run.json`` is
    unreadable is listed with state ``corrupt`` and the reason; one broken run never
    hides the others."""
    root = Path(root)
    if not root.is_dir():
        return []

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    out = []
    for d in sorted(root.iterdir(), key=mtime, reverse=True):
        rd = RunDir(d)
        if not rd.exists():
            continue
        try:
            out.append(run_status(d))
        except Exception as e:  # noqa: BLE001 - reported for that run, never for the list
            out.append(RunStatus(run_id=rd.run_id, run_dir=str(d), state="corrupt",
                                 message=str(e) if isinstance(e, InputError) else
                                 f"{type(e).__name__}: {e}"))
    return out
