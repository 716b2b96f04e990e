"""The stage registry: one row per stage of the seven-stage workflow.

For every stage: its number, the module that runs it (``realign.stages.<module>``, whose
``run(ctx) -> StageVerdict`` is the whole stage), the earlier stages whose artifacts it
reads, and the typed model of the artifacts it writes (:mod:`realign.stages.artifacts`).
The run-directory folder of a stage is ``stages/<number>-<name>`` and is spelled only by
:meth:`realign.rundir.RunDir.stage_dir`.

This module imports no stage module (the pipeline does that), so the config, the run
directory and the report can read the table without pulling in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .artifacts import (
    DPOArtifacts,
    EvaluationArtifacts,
    IterativeArtifacts,
    PreferenceDataArtifacts,
    ReferenceInitArtifacts,
    RewardModelArtifacts,
    SFTBaselineArtifacts,
    StageArtifacts,
)


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``name`` (config and CLI), ``number`` (1-7), ``title``, ``module`` (under
    ``realign.stages``; ``None`` while the stage is not built), ``reads`` (stages whose
    artifacts it uses) and ``artifacts`` (the model of what it writes)."""

    name: str
    number: int
    title: str
    module: str | None
    reads: tuple[str, ...]
    artifacts: type[StageArtifacts]
    doc: str

    @property
    def built(self) -> bool:
        return self.module is not None

    @property
    def folder(self) -> str:
        """The stage's folder name inside ``<run>/stages/``."""
        return f"{self.number}-{self.name}"


REGISTRY: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("sft_baseline", 1, "SFT baseline", "sft_baseline", (), SFTBaselineArtifacts,
              "docs/sft-preparation.md"),
    StageSpec("preference_data", 2, "Preference data", "preference_data", ("sft_baseline",),
              PreferenceDataArtifacts, "docs/preference-data-generation.md"),
    StageSpec("reference_init", 3, "Reference init", "reference_init",
              ("sft_baseline", "preference_data"), ReferenceInitArtifacts,
              "docs/model-initialization.md"),
    StageSpec("reward_model", 4, "Reward model", "reward_model",
              ("sft_baseline", "preference_data"), RewardModelArtifacts,
              "docs/preference-modeling.md"),
    StageSpec("dpo", 5, "DPO", "dpo", ("sft_baseline", "preference_data", "reference_init"),
              DPOArtifacts, "docs/dpo-optimization.md"),
    StageSpec("iterative", 6, "Iterative training", "iterative",
              ("sft_baseline", "preference_data", "reference_init", "reward_model", "dpo"),
              IterativeArtifacts, "docs/iterative-training.md"),
    StageSpec("evaluation", 7, "Evaluation", "evaluation",
              ("sft_baseline", "preference_data", "reward_model", "dpo", "iterative"),
              EvaluationArtifacts, "docs/evaluation-monitoring.md"),
)}

#: The stages a run can execute, in order, name -> number.
STAGES: dict[str, int] = {n: s.number for n, s in REGISTRY.items() if s.built}


def stage_spec(name: str) -> StageSpec:
    """The registry row of a stage; KeyError names the known stages."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}' (known: {', '.join(REGISTRY)})") from None
