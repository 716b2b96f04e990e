"""Background pipeline jobs: start returns at once, the run directory is the record.

One job at a time per run directory. Inside this server a registry answers at once;
across processes the library's ``RunLock`` (``run.lock`` holding the owner's pid and
job) does, and a lock whose process is alive is reported with its job name. A job runs
in a daemon thread: if the server exits the run stops and ``resume_run`` continues it
from its last complete stage or checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realign.rundir import RunBusyError, pid_alive, read_lock


@dataclass
class Job:
    run_dir: Path
    kind: str
    started: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def describe(self) -> str:
        return f"job '{self.kind}' on {self.run_dir} (started {self.started})"


class JobManager:
    """Tracks the jobs this server started, keyed by resolved run directory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[Path, Job] = {}

    def running(self, run_dir: Path) -> Job | None:
        with self._lock:
            job = self._jobs.get(run_dir.resolve())
            return job if job is not None and not job.done.is_set() else None

    def last(self, run_dir: Path) -> Job | None:
        with self._lock:
            return self._jobs.get(run_dir.resolve())

    def _check_free(self, key: Path) -> None:
        job = self._jobs.get(key)
        if job is not None and not job.done.is_set():
            raise RunBusyError(f"{key} is busy: {job.describe()} is still running; poll "
                               f"run_status('{key.name}') and start again when it has finished")
        holder = read_lock(key)
        if holder and pid_alive(holder.get("pid")):
            raise RunBusyError(f"{key} is busy: job '{holder.get('job')}' (pid {holder.get('pid')}, "
                               f"since {holder.get('since')}) is running on it")

    @contextmanager
    def claim(self, run_dir: Path, kind: str) -> Iterator[Job]:
        """Register a job for the duration of the block (RunBusyError if one is running)."""
        key = run_dir.resolve()
        with self._lock:
            self._check_free(key)
            job = Job(run_dir=key, kind=kind)
            self._jobs[key] = job
        try:
            yield job
        except BaseException as e:
            job.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            job.done.set()

    def start(self, run_dir: Path, kind: str, fn: Callable[[], Any]) -> Job:
        """Run ``fn`` in a daemon thread as the job on ``run_dir``; return at once."""
        key = run_dir.resolve()
        with self._lock:
            self._check_free(key)
            job = Job(run_dir=key, kind=kind)
            self._jobs[key] = job

        def target() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - recorded for run_status
                job.error = f"{type(e).__name__}: {e}"
            finally:
                job.done.set()

        job.thread = threading.Thread(target=target, name=f"realign-{kind}-{key.name}", daemon=True)
        job.thread.start()
        return job
