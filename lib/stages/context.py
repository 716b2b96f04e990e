"""What a stage function receives: the config, the run directory, the thresholds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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


def load_reference(ctx: RunContext, backend: Any, model: str | None = None) -> Any:
    """The frozen reference (stage 1's model unless ``model``) on the run's device, in the
    backend's dtype for that device, in eval mode, with no gradients."""
    ref = backend.load(model or ctx.base_model(), device=ctx.config.device)
    for p in ref.model.parameters():
        p.requires_grad_(False)
    ref.model.eval()
    return ref


def build_policy(ctx: RunContext, ref_model: Any) -> Any:
    """The policy stage 5 trains: :func:`realign.backends.trl.make_policy` with the run's
    ``dpo.lora`` and TRL's ``disable_dropout`` setting (``dpo.extra``, default true), in
    train mode."""
    from ..backends.trl import make_policy

    d = ctx.config.dpo
    return make_policy(ref_model, d.lora, disable_dropout=bool(d.extra.get("disable_dropout", True)))
