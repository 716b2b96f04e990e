"""What a stage function receives: the config, the run directory, the thresholds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    #: The training framework of stages 1, 3, 5 and 6, "trl" or "mlx": the config's
    #: ``backend`` resolved once per run (the pipeline sets it; None: resolved here).
    backend_name: str | None = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.backend_name is None:
            from ..backends import resolve_backend_name

            self.backend_name = resolve_backend_name(self.config.backend)

    def backend(self) -> Any:
        """An instance of the run's backend (:attr:`backend_name`): ``TRLBackend`` or
        ``MLXBackend``."""
        from ..backends import get_backend

        return get_backend(str(self.backend_name))

    def backend_findings(self, name: str | None = None) -> dict[str, Any]:
        """What a verdict records as ``findings["backend"]``: the backend's name (default
        the run's) and its packages' versions (:func:`realign.backends.backend_record`)."""
        from ..backends import backend_record

        return backend_record(name or str(self.backend_name))

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


#: Ground-truth keys whose presence makes a prompt row checkable by a verifier.
_TRUTH = ("answer", "tests", "instructions", "instruction_id_list")


def generation_scorer(ctx: RunContext, rows: Sequence[Any], *, stage: int) -> tuple[str, str | None]:
    """(scorer, reward model path) for pair generation in ``stage`` (2 or 6) over prompt
    ``rows`` (:class:`realign.generation.PromptRow`): ``generation.scorer``, with ``auto``
    meaning the verifier when any row carries ground truth, else the reward model
    (``generation.reward_model``; in stage 6 the stage-4 model when that is null). Raises
    :class:`realign.errors.InputError` naming the field when the choice cannot work."""
    from ..errors import InputError

    g = ctx.config.generation
    has_truth = any(r.truth.get(k) is not None for r in rows for k in _TRUTH)
    scorer = g.scorer if g.scorer != "auto" else ("verifier" if has_truth else "reward_model")
    if scorer == "verifier":
        if not has_truth:
            raise InputError("generation.scorer is verifier but no prompt row carries an "
                             "answer, tests or instructions to verify against",
                             field="generation.scorer")
        return scorer, None
    rm = g.reward_model
    if rm is None and stage == 6:
        rm = ctx.artifacts("reward_model").reward_model
    if not rm:
        where = ("set generation.reward_model to a trained reward model (stage 4 runs after "
                 "stage 2)" if stage == 2 else "keep reward_model in stages or set "
                 "generation.reward_model")
        raise InputError(f"the samples need a scorer: the prompts carry no ground truth for "
                         f"the verifier, and there is no reward model ({where})",
                         field="generation.reward_model")
    return scorer, str(rm)


def load_reference(ctx: RunContext, backend: Any, model: str | None = None) -> Any:
    """The frozen reference (stage 1's model unless ``model``) on the run's device, in the
    backend's dtype for that device, in eval mode, with no gradients (MLX: frozen)."""
    ref = backend.load(model or ctx.base_model(), device=ctx.config.device)
    if getattr(backend, "name", "trl") == "mlx":
        ref.model.freeze()
        ref.model.eval()
        return ref
    for p in ref.model.parameters():
        p.requires_grad_(False)
    ref.model.eval()
    return ref


def build_policy(ctx: RunContext, ref: Any) -> Any:
    """The policy stage 5 trains from the reference handle ``ref``. TRL:
    :func:`realign.backends.trl.make_policy` with the run's ``dpo.lora`` and TRL's
    ``disable_dropout`` setting (``dpo.extra``, default true), in train mode (a module).
    MLX: :func:`realign.backends.mlx.make_policy` (an ``MLXModelHandle``; mlx-lm models
    have no dropout outside LoRA's)."""
    d = ctx.config.dpo
    if ctx.backend_name == "mlx":
        from ..backends.mlx import make_policy as mlx_policy

        return mlx_policy(ref, d.lora)
    from ..backends.trl import make_policy

    return make_policy(ref.model, d.lora, disable_dropout=bool(d.extra.get("disable_dropout", True)))
