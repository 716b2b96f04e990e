"""Where everything of a run lives. The only module that spells the layout::

    <runs>/<run-id>/run.json                        config, seed, package versions, hardware
    <runs>/<run-id>/status.json                     state, current stage, progress (pollers)
    <runs>/<run-id>/run.lock                        the running job's pid
    <runs>/<run-id>/stages/<k>-<name>/verdict.json  gate results + artifacts (stage complete)
    <runs>/<run-id>/stages/<k>-<name>/...           checkpoints, metrics.jsonl, data
    <runs>/<run-id>/report.html, report.md          the human report
    <runs>/<run-id>/deployed_model.json             the model stage 7 or a rollback deployed
    <runs>/<run-id>/rollback.json, rollback/        the last rollback and its re-evaluations

Older records are kept, never overwritten: ``deployed_model.<n>.json``, ``rollback.<n>.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..distributed import is_main_process
from ..fileio import file_digest, keep_old, write_json_atomic
from ..gates import GateResult, StageVerdict
from ..stages.artifacts import StageArtifacts
from ..stages.registry import stage_spec

A = TypeVar("A", bound=StageArtifacts)


class RunDir:
    """A run directory: its paths, its verdicts, its deploy record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def run_id(self) -> str:
        return self.path.name

    # ---------------------------------------------------------------- files
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def status_json(self) -> Path:
        return self.path / "status.json"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def deployed_json(self) -> Path:
        return self.path / "deployed_model.json"

    @property
    def rollback_json(self) -> Path:
        return self.path / "rollback.json"

    @property
    def rollback_root(self) -> Path:
        """Where rollback writes each candidate's re-evaluation."""
        return self.path / "rollback"

    def exists(self) -> bool:
        """True when this is a run directory (it has ``run.json``)."""
        return self.run_json.exists()

    # ---------------------------------------------------------------- stages
    def stage_dir(self, name: str, *, create: bool = False) -> Path:
        """``stages/<k>-<name>/`` of a registered stage (created when ``create``)."""
        d = self.path / "stages" / stage_spec(name).folder
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def verdict_path(self, name: str) -> Path:
        return self.stage_dir(name) / "verdict.json"

    def metrics_path(self, name: str) -> Path:
        """The stage's ``metrics.jsonl`` (training curves, KL checks)."""
        return self.stage_dir(name) / "metrics.jsonl"

    def read_verdict(self, name: str) -> StageVerdict | None:
        """The stage's verdict, or None when the stage has not completed."""
        p = self.verdict_path(name)
        if not p.exists():
            return None
        return StageVerdict.model_validate_json(p.read_text(encoding="utf-8"))

    def write_verdict(self, name: str, verdict: StageVerdict) -> Path:
        """Write the verdict atomically (rank 0 only): the stage is complete after this."""
        p = self.verdict_path(name)
        if is_main_process():
            write_json_atomic(p, verdict)
        return p

    def artifacts(self, name: str, model: type[A] | None = None) -> A | None:
        """The stage's artifacts, validated by its registry model (None: not run)."""
        v = self.read_verdict(name)
        if v is None:
            return None
        cls = model or stage_spec(name).artifacts
        return cls.model_validate(v.artifacts)  # type: ignore[return-value]

    def set_aside(self, name: str) -> Path | None:
        """Move a stage folder out of the way before a forced rerun (nothing is deleted)."""
        d = self.stage_dir(name)
        if not d.exists():
            return None
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = d.with_name(f".{d.name}.replaced-{stamp}")
        os.replace(d, dest)
        return dest

    # ---------------------------------------------------------------- deploy record
    def deployed(self) -> dict[str, Any] | None:
        """``deployed_model.json`` (None when nothing was deployed or restored)."""
        try:
            return json.loads(self.deployed_json.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def write_deployed(self, model: str | Path, *, source: str, decided_by: str,
                       gates: Sequence[GateResult] = ()) -> dict[str, Any]:
        """Point ``deployed_model.json`` at ``model`` (the previous pointer is kept as
        ``deployed_model.<n>.json``; nothing is deleted)."""
        keep_old(self.deployed_json)
        rec = {"model": str(model), "source": source, "decided_by": decided_by,
               "digest": file_digest(Path(model)) if Path(model).exists() else None,
               "gates": {g.name: g.status for g in gates},
               "time": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        write_json_atomic(self.deployed_json, rec)
        return rec


@contextmanager
def metrics_log(path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Append JSON lines to a ``metrics.jsonl`` (flushed per line, so a kill loses nothing;
    rank 0 only)."""
    if not is_main_process():
        yield lambda record: None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        def write(record: dict[str, Any]) -> None:
            fh.write(json.dumps(record, default=float) + "\n")
            fh.flush()

        yield write
