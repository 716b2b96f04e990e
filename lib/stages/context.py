"""What a stage function receives: the config, the run directory, the thresholds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..config import RunConfig
from ..gates import StageVerdict, Thresholds
from ..models import resolve_model
from ..rundir import RunDir
from .artifacts import StageArtifacts
from .registry import stage_spec

#: progress(done, total, message); total None when unknown.
ProgressFn = Callable[[float, float | None, str], None]

A = TypeVar("A", bound=StageArtifacts)


def _no_progress(done: float, total: float | None, msg: str) -> None:
    return None


@dataclass
class RunContext:
    """A stage's view of its run: ``config``, ``run_dir``, ``thresholds``, ``progress``.

    Paths come from :attr:`rundir` (:class:`realign.rundir.RunDir`); earlier stages'
    results from :meth:`artifacts` (typed, see :mod:`realign.stages.artifacts`).
    """

    config: RunConfig
    run_dir: Path
    thresholds: Thresholds
    progress: ProgressFn = field(default=_no_progress)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)

    @property
    def rundir(self) -> RunDir:
        return RunDir(self.run_dir)

    def stage_dir(self, name: str) -> Path:
        """The stage's folder, created."""
        return self.rundir.stage_dir(name, create=True)

    def verdict(self, name: str) -> StageVerdict | None:
        return self.rundir.read_verdict(name)

    def artifacts(self, name: str) -> StageArtifacts:
        """An earlier stage's artifacts (its registry model; all fields None when the stage
        has not run)."""
        got = self.rundir.artifacts(name)
        return got if got is not None else stage_spec(name).artifacts()

    def base_model(self) -> str:
        """The model the run starts from: stage 1's model when it ran, else the config's
        ``model`` (``default`` resolved to the embedded SmolLM2)."""
        model = self.artifacts("sft_baseline").model
        return str(model) if model else str(resolve_model(self.config.model))
