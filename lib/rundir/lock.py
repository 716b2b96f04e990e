"""One job at a time per run directory: ``run.lock`` holds the owner's pid and job."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from ..errors import RealignError

LOCK_NAME = "run.lock"


class RunBusyError(RealignError):
    """Another job holds this run directory."""


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


def read_lock(run_dir: str | Path) -> dict[str, Any] | None:
    """The lock's ``{"pid", "job", "since"}``, or None when the run is not locked."""
    try:
        return json.loads((Path(run_dir) / LOCK_NAME).read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


class RunLock:
    """``with RunLock(run_dir, job):`` — created with O_EXCL; a lock whose process is gone
    is stale and taken over; a live holder raises :class:`RunBusyError`."""

    def __init__(self, run_dir: str | Path, job: str) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.job = job

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
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
