"""The run directory: the one package that knows where a run's files are.

* :mod:`.layout` — :class:`RunDir`: every path, verdict read/write, artifacts, the deploy
  record; :func:`metrics_log`.
* :mod:`.lock` — :class:`RunLock` (one job per run directory).
* :mod:`.records` — ``run.json`` (create, load its config) and ``status.json``
  (:func:`run_status`, :func:`list_runs`).

Atomic writes and digests come from :mod:`realign.fileio`.
"""

from .layout import CorruptVerdictError, RunDir, metrics_log
from .lock import RunBusyError, RunLock, pid_alive, read_lock
from .records import (
    RunState,
    RunStatus,
    StageStatus,
    check_run_id,
    create_run,
    list_runs,
    load_run_config,
    run_status,
    write_status,
)

__all__ = ["CorruptVerdictError", "RunBusyError", "RunDir", "RunLock", "RunState", "RunStatus",
           "StageStatus", "check_run_id", "create_run", "list_runs", "load_run_config", "metrics_log", "pid_alive",
           "read_lock", "run_status", "write_status"]
