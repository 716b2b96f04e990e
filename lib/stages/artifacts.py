"""What each stage hands to the stages after it: one typed model per stage.

A stage's verdict stores these fields under ``artifacts`` in ``verdict.json``; later
stages read them back through :meth:`realign.stages.context.RunContext.artifacts`, which
validates them with the model below (so a renamed or missing key is an error at the
read, not a ``None`` three calls later). Paths are strings as written in the verdict;
every path a stage opens goes through :class:`realign.rundir.RunDir` first.

Extra keys are allowed (``extra="allow"``): a verdict written by a newer version stays
readable.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StageArtifacts(BaseModel):
    """Base of the per-stage artifact models."""

    model_config = ConfigDict(extra="allow")


class SFTBaselineArtifacts(StageArtifacts):
    """Stage 1: the model every later stage starts from."""

    base_model: str | None = None
    model: str | None = None  # the SFT model when SFT ran, else ``base_model``
    model_digest: str | None = None
    baseline_benchmarks: str | None = None  # benchmarks.json of the baseline


class PreferenceDataArtifacts(StageArtifacts):
    """Stage 2: the usable pairs, converted to TRL rows and split."""

    input: str | None = None
    format: str | None = None
    clean: str | None = None
    clean_digest: str | None = None
    train: str | None = None
    heldout: str | None = None
    train_pairs: int | None = None
    heldout_pairs: int | None = None
    train_digest: str | None = None
    heldout_digest: str | None = None
    # generation mode (config ``prompts``): the sampled pairs and every prompt with its
    # ground truth (stage 6 samples from the train prompts, stages 6 and 7 measure on the
    # held-out ones)
    generated: str | None = None
    train_prompts: str | None = None
    heldout_prompts: str | None = None


class ReferenceInitArtifacts(StageArtifacts):
    """Stage 3: the frozen reference and the KL probe stage 5 monitors on."""

    reference_model: str | None = None
    kl_probe: str | None = None
    # reference_probe.json, relative to the run directory (stage 5 reads it only from inside)
    reference_probe: str | None = None
    initial_kl: float | None = None
    policy: str | None = None  # "copy" or "lora"
    trainable_parameters: int | None = None


class RewardModelArtifacts(StageArtifacts):
    """Stage 4: the reward model (judge of stage 7 where no verifier applies)."""

    reward_model: str | None = None
    reward_model_digest: str | None = None
    base_model: str | None = None
    metrics: str | None = None


class DPOArtifacts(StageArtifacts):
    """Stage 5: the selected policy."""

    model: str | None = None
    model_digest: str | None = None
    metrics: str | None = None


class IterativeArtifacts(StageArtifacts):
    """Stage 6: the best passing iteration's policy (iteration 0: stage 5's model)."""

    model: str | None = None
    model_digest: str | None = None
    selected_iteration: int | None = None
    metrics: str | None = None
    state: str | None = None


class EvaluationArtifacts(StageArtifacts):
    """Stage 7: what was evaluated and what was deployed."""

    evaluated_model: str | None = None
    benchmarks: str | None = None
    winrate: str | None = None
    deployed_model: str | None = None
