"""Background pipeline jobs: start returns at once, the run directory is the record.

One job at a time per run directory. Inside this server a registry answers at once;
across processes the library's ``RunLock`` (``run.lock`` holding the owner's pid and
job) does, and a lock whose process is alive is reported with its job name. A job runs
in a daemon thread: if the server exits the run stops and ``resume_run`` continues it
from its last complete stage or checkpoint.

Cancelling is cooperative: :meth:`JobManager.cancel` sets the job's flag, and the
progress callback the job passes to the pipeline (:meth:`Job.check`) raises
:class:`JobCancelled` at the pipeline's next progress update (every training step,
every validated block, every stage start). The pipeline records the run as
interrupted, releases ``run.lock`` and leaves every finished stage and checkpoint in
place, so ``resume_run`` continues it like a run that was stopped with Ctrl-C.
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

#: Job kinds that can be cancelled (pipeline stages; a rollback restores in one step).
CANCELLABLE = ("run", "resume", "stage:")


class JobCancelled(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """Raised inside a job's thread at its next progress update after cancel_run.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` of a stage
    swallows it; the pipeline records the run as interrupted and re-raises it.
    """


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


@dataclass
class Job:
    run_dir: Path
    kind: str
    started: str = field(default_factory=_now)
    error: str | None = None
    cancel_requested: str | None = None  # when cancel_run asked
    cancelled: bool = False  # the job stopped because of it
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def describe(self) -> str:
        return f"job '{self.kind}' on {self.run_dir} (started {self.started})"

    @property
    def cancellable(self) -> bool:
        return self.kind.startswith(CANCELLABLE)

    def check(self) -> None:
        """Raise :class:`JobCancelled` once a cancel was requested (the job's thread)."""
        if self._cancel.is_set():
            raise JobCancelled(f"cancelled by cancel_run at {self.cancel_requested}")

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """A pipeline progress callback that only checks for a cancel."""
        self.check()

    def request_cancel(self) -> None:
        if not self._cancel.is_set():
            self.cancel_requested = _now()
            self._cancel.set()

    def finish(self, exc: BaseException | None) -> None:
        """Record how the job ended (called once, in its thread)."""
        if isinstance(exc, JobCancelled):
            self.cancelled = True
        elif exc is not None:
            from ._util import describe, for_mcp

            self.error = for_mcp(describe(exc))
        self.done.set()


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
                               f"run_status('{key.name}') and start again when it has finished"
                               + (" (a cancel was requested; it stops at its next progress "
                                  "update)" if job.cancel_requested else ""))
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
        exc: BaseException | None = None
        try:
            yield job
        except BaseException as e:
            exc = e
            raise
        finally:
            job.finish(exc)

    def start(self, run_dir: Path, kind: str, fn: Callable[[Job], Any]) -> Job:
        """Run ``fn(job)`` in a daemon thread as the job on ``run_dir``; return at once.

        ``fn`` passes :meth:`Job.progress` (or a callback calling :meth:`Job.check`) to
        the pipeline so that :meth:`cancel` can stop it.
        """
        key = run_dir.resolve()
        with self._lock:
            self._check_free(key)
            job = Job(run_dir=key, kind=kind)
            self._jobs[key] = job

        def target() -> None:
            exc: BaseException | None = None
            try:
                fn(job)
            except BaseException as e:  # noqa: BLE001 - recorded for run_status
                exc = e
            finally:
                job.finish(exc)

        job.thread = threading.Thread(target=target, name=f"realign-{kind}-{key.name}", daemon=True)
        job.thread.start()
        return job

    def cancel(self, run_dir: Path) -> Job:
        """Ask the job running on ``run_dir`` to stop; return it (ValueError when none)."""
        key = run_dir.resolve()
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.done.is_set():
                holder = read_lock(key)
                if holder and pid_alive(holder.get("pid")):
                    raise ValueError(
                        f"the job on {key.name} ('{holder.get('job')}', pid {holder.get('pid')}) "
                        "was not started by this server; stop that process (Ctrl-C) to "
                        "interrupt it")
                raise ValueError(f"no job is running on run '{key.name}'; nothing to cancel "
                                 "(run_status shows its state)")
            if not job.cancellable:
                raise ValueError(f"{job.describe()} cannot be cancelled (it restores a model "
                                 "in one step); wait for it to finish")
            job.request_cancel()
            return job
