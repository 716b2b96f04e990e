"""The run configuration: one YAML file, validated by pydantic.

Every field has a default except ``data``; unknown keys are errors (a typo must not be
silently ignored). Every field documents itself: its ``description`` states what it
means, its range, its default and the other fields it interacts with (print them with
``RunConfig.model_json_schema()``). ``templates.md`` shows a complete example;
``load_config`` names the file, line and field of a bad value.

Command-line overrides (``realign run --config run.yaml dpo.beta=0.2``) are ``KEY=VALUE``
strings applied by :func:`apply_overrides` to the parsed YAML mapping before validation,
so they pass the same schema and checks as the file.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import InputError
from .gates import GAP_MIN_COVERAGE, GATE_SPECS, PresetName
from .stages.registry import REGISTRY, STAGES

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DPO_OWNED_KEYS",
    "REWARD_OWNED_KEYS",
    "STAGES",
    "RunConfig",
    "apply_overrides",
    "load_config",
    "validate_run_id",
]

BreachPolicy = Literal["stop", "halve_lr", "rollback"]
#: ``backend``: the training framework of stages 1, 3, 5 and 6 (see RunConfig.backend).
BackendName = Literal["auto", "trl", "mlx"]

#: Tokens per sequence (prompt + response, after the chat template) when a config does not
#: say otherwise: the default of ``sft.max_length``, ``reward.max_length`` and
#: ``dpo.max_length``. Longer sequences are truncated.
DEFAULT_MAX_LENGTH = 256

#: The longest run id (a folder name; well under every filesystem's name limit).
RUN_ID_MAX_LENGTH = 128
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_run_id(value: str) -> str:
    """``value`` when it is a safe run id, else ValueError saying why (TypeError for a
    value that is not a string).

    A run id names one folder of the runs directory, so it is a single path component:
    letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit (so never
    ``.``, ``..`` or a hidden name), no separator, at most :data:`RUN_ID_MAX_LENGTH`
    characters. Anything else (``../x``, an absolute path, ``a/b``) is bad input: it
    would put the run outside its runs directory. The run config's ``run_id``, the CLI's
    ``--run-id`` and the MCP tools all use this rule.
    """
    if not isinstance(value, str):
        raise TypeError(f"run_id must be a string, got {type(value).__name__}")
    shown = value if len(value) <= 60 else value[:57] + "..."
    if not value:
        raise ValueError("run_id is empty")
    if len(value) > RUN_ID_MAX_LENGTH:
        raise ValueError(f"run_id '{shown}' is {len(value)} characters long (at most "
                         f"{RUN_ID_MAX_LENGTH})")
    if value in (".", "..") or not _RUN_ID.fullmatch(value):
        raise ValueError(f"run_id '{shown}' is not a run name: use one folder name of "
                         "letters, digits, '.', '_' and '-' that starts with a letter or "
                         "digit (no '/', '\\', '..' or absolute path)")
    return value


#: Trainer fields that send files elsewhere or read them from elsewhere: refused in
#: ``dpo.extra`` and ``reward.extra`` alike, besides the keys the stages set themselves
#: (``output_dir``, ``logging_dir``, ... in ``DPO_OWNED_KEYS`` / ``REWARD_OWNED_KEYS``).
#: Every file of a run stays in its run directory, and every file it reads is named by a
#: config field that is checked.
_WHERE_FILES_GO: dict[str, str] = {
    "push_to_hub": "a run uploads nothing; the deployed model is in the run directory",
    "hub_model_id": "a run uploads nothing; the deployed model is in the run directory",
    "hub_strategy": "a run uploads nothing; the deployed model is in the run directory",
    "hub_token": "a run uploads nothing; the deployed model is in the run directory",
    "hub_private_repo": "a run uploads nothing; the deployed model is in the run directory",
    "resume_from_checkpoint": "the stage resumes from its own checkpoints (resume the run)",
    "overwrite_output_dir": "the stage owns its output folder inside the run directory",
    "deepspeed": "set the launch up with accelerate (`realign calibrate` writes its config)",
    "fsdp_config": "set the launch up with accelerate (`realign calibrate` writes its config)",
}

#: ``trl.DPOConfig`` fields that stage 5 sets itself (``realign.backends.trl_train.dpo_config``
#: builds them from the ``dpo:`` section, the run's seed, device and folder), with the field
#: to set instead. ``dpo.extra`` may not set them: a value there would silently replace what
#: realign measures and records with (the KL monitor's beta, the probe's max length, the
#: checkpoints that resume and rollback read). The other keys that ``dpo_config`` fills in
#: (logging_steps, save_total_limit, precompute_ref_log_probs, disable_tqdm,
#: dataloader_num_workers, remove_unused_columns) are realign's defaults, and ``dpo.extra``
#: may change them. ``logging_dir`` is kept here for transformers versions that have it.
_DPO_OWNED: dict[str, str] = {
    "beta": "set dpo.beta instead; the KL monitor reads it",
    "loss_type": "set dpo.loss_type instead",
    "learning_rate": "set dpo.learning_rate instead; the KL monitor halves it on a breach",
    "per_device_train_batch_size": "set dpo.batch_size instead",
    "gradient_accumulation_steps": "set dpo.gradient_accumulation_steps instead",
    "max_steps": "set dpo.max_steps instead; the stage sizes the training set from it",
    "num_train_epochs": "set dpo.num_epochs instead",
    "max_length": "set dpo.max_length instead; stage 3 tokenizes the KL probe at it",
    "warmup_steps": "set dpo.warmup_steps instead",
    "save_steps": "set dpo.save_every instead; resume and rollback read those checkpoints",
    "save_strategy": "the stage saves by steps (set dpo.save_every); resume and rollback "
                     "read those checkpoints",
    "report_to": "set dpo.report_to instead",
    "seed": "set the run's seed (top-level `seed`) instead",
    "use_cpu": "set the run's device (top-level `device: cpu`) instead",
    "output_dir": "the stage writes its checkpoints to <run>/stages/5-dpo/checkpoints; set the "
                  "top-level output_dir or run_id instead",
    "logging_dir": "the stage logs to <run>/stages/5-dpo/metrics.jsonl; set dpo.report_to for "
                   "trackers",
}
DPO_OWNED_KEYS: frozenset[str] = frozenset(_DPO_OWNED)

#: ``trl.RewardConfig`` fields that stage 4 sets itself (``realign.reward.train_reward_model``
#: builds them from the ``reward:`` section, the run's seed, device and folder), with the
#: field to set instead. ``reward.extra`` may not set them. The other keys it fills in
#: (logging_steps, disable_tqdm, bf16, dataloader_num_workers, gradient/activation
#: checkpointing) are realign's defaults, and ``reward.extra`` may change them.
_REWARD_OWNED: dict[str, str] = {
    "learning_rate": "set reward.learning_rate instead",
    "per_device_train_batch_size": "set reward.batch_size instead",
    "gradient_accumulation_steps": "set reward.gradient_accumulation_steps instead",
    "max_steps": "set reward.max_steps instead",
    "num_train_epochs": "set reward.num_epochs instead",
    "max_length": "set reward.max_length instead; scoring and the stage-7 judge use it too",
    "seed": "set the run's seed (top-level `seed`) instead",
    "use_cpu": "set the run's device (top-level `device: cpu`) instead",
    "output_dir": "the stage trains in <run>/stages/4-reward_model/checkpoints and saves the "
                  "model to <run>/stages/4-reward_model/reward_model; set the top-level "
                  "output_dir or run_id instead",
    "logging_dir": "the stage logs to <run>/stages/4-reward_model/metrics.jsonl",
    "save_steps": "the stage saves only the final model (no checkpoints)",
    "save_strategy": "the stage saves only the final model (no checkpoints)",
    "report_to": "the stage records its training log in <run>/stages/4-reward_model/"
                 "metrics.jsonl (report_to is 'none')",
}
REWARD_OWNED_KEYS: frozenset[str] = frozenset(_REWARD_OWNED)

#: The loss types TRL 1.x's DPOTrainer accepts (``trl.DPOConfig.loss_type``), named in the
#: help text; TRL itself checks the value.
_TRL_LOSS_TYPES = ("sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, "
                   "aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm")


class _ConfigValueError(ValueError):
    """A validator's error about a key below the validated field (``at``: the extra path,
    e.g. ``("beta",)`` under ``dpo.extra``), so that the error names that key and line."""

    def __init__(self, message: str, at: tuple[str, ...] = (),
                 related: tuple[tuple[str, ...], ...] = ()) -> None:
        super().__init__(message)
        self.at = at
        self.related = related  # other paths (below the validated field) the check reads


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _refuse_owned(extra: dict[str, Any], owned: dict[str, str], section: str) -> None:
    for key in extra:
        if key in owned:
            raise _ConfigValueError(f"{section}.extra.{key}: {owned[key]}", at=(key,))


def _refuse_task_type(lora: dict[str, Any] | None, section: str, task: str) -> None:
    if lora and "task_type" in lora:
        raise _ConfigValueError(f"{section}.lora.task_type: realign sets it ({task})",
                                at=("task_type",))


class HeldoutConfig(_Strict):
    """How the usable pairs are split into train and held-out (deterministic by seed).

    Held-out size = clamp(round(fraction · N), min_pairs, max_pairs), at most N − 1, over
    the N usable pairs; every pair of one prompt lands on the same side. Stages 1, 2, 3,
    5 and 7 all use this one split.
    """

    fraction: float = Field(
        0.1, gt=0, lt=1,
        description="Share of the usable pairs held out from training (0 < fraction < 1), "
                    "before the min_pairs/max_pairs clamp. The held-out pairs feed baseline "
                    "perplexity (stage 1), the KL probe (kl_monitor.probe_size, stage 3), "
                    "reward accuracy (stage 4) and the win-rate prompts (stage 7). "
                    "Default: 0.1.")
    min_pairs: int = Field(
        16, ge=2,
        description="Fewest held-out pairs (≥ 2, ≤ max_pairs), whatever fraction gives; "
                    "never more than N − 1 of N usable pairs. Default: 16.")
    max_pairs: int = Field(
        256, ge=2,
        description="Most held-out pairs (≥ 2, ≥ min_pairs); caps the cost of the held-out "
                    "measurements on large data sets. Default: 256.")

    @model_validator(mode="after")
    def _min_le_max(self) -> HeldoutConfig:
        if self.min_pairs > self.max_pairs:
            raise _ConfigValueError(
                f"heldout.min_pairs ({self.min_pairs}) must not exceed heldout.max_pairs "
                f"({self.max_pairs})", at=("min_pairs",), related=(("max_pairs",),))
        return self


class SFTConfig(_Strict):
    """Stage 1. Perplexity is always measured; SFT training runs only with a dataset."""

    dataset: str | None = Field(
        None,
        description="SFT data (JSONL rows with messages, prompt/completion or "
                    "instruction/response); relative paths are resolved against the config's "
                    "folder. When set, stage 1 fine-tunes the model with TRL's SFTTrainer "
                    "(loss on completion tokens only) and later stages start from the result; "
                    "null: no SFT training, perplexity only. Default: null.")
    eval_responses: int = Field(
        64, ge=1,
        description="Held-out responses used for baseline_perplexity (≥ 1): the first "
                    "eval_responses chosen responses of the preference held-out split, or, "
                    "with sft.dataset, at most this many rows held out of the SFT data (10%, "
                    "at least 2). Default: 64.")
    learning_rate: float = Field(
        2e-5, gt=0,
        description="SFT learning rate (> 0); used only with sft.dataset. Default: 2.0e-5.")
    max_steps: int = Field(
        50, ge=-1,
        description="SFT optimizer steps; used only with sft.dataset. -1: TRL's default "
                    "number of epochs (3) instead. Default: 50.")
    batch_size: int = Field(
        4, ge=1,
        description="SFT per-device batch size (≥ 1); used only with sft.dataset. Default: 4.")
    max_length: int = Field(
        DEFAULT_MAX_LENGTH, ge=8,
        description="Tokens per sequence (prompt + response, ≥ 8) for SFT training and for "
                    "the baseline perplexity; longer sequences are truncated. Default: 256.")
    benchmarks: list[str] = Field(
        default_factory=list,
        description="Evaluation suites (shipped realign_* suites or lm-eval task names) "
                    "scored in stage 1 as the baseline; stage 7 re-runs the same suites and "
                    "items for capability_retention. Empty: retention is unmeasured. "
                    "Default: [].")
    benchmark_limit: int | None = Field(
        None, ge=1,
        description="First N items of each suite in sft.benchmarks (≥ 1); stage 7 uses the "
                    "same limit. null: all items. Default: null.")


class RewardModelConfig(_Strict):
    """Stage 4: the reward model (TRL RewardTrainer), see docs/preference-modeling.md."""

    learning_rate: float = Field(
        1e-4, gt=0, description="AdamW learning rate (> 0). Default: 1.0e-4.")
    batch_size: int = Field(
        4, ge=1,
        description="Pairs per device batch (≥ 1); an optimizer step sees batch_size × "
                    "gradient_accumulation_steps × processes pairs. Default: 4.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Batches per optimizer step (≥ 1). Default: 1.")
    max_steps: int = Field(
        30, ge=-1,
        description="Optimizer steps; -1: train for reward.num_epochs epochs instead. "
                    "Default: 30.")
    num_epochs: float = Field(
        1.0, gt=0,
        description="Epochs over the training split (> 0); used only when reward.max_steps "
                    "is -1. Default: 1.0.")
    max_length: int = Field(
        DEFAULT_MAX_LENGTH, ge=8,
        description="Tokens per prompt + response sequence (≥ 8; the last tokens are kept) "
                    "in training and scoring; stage 7's reward-model judge uses it too. "
                    "Default: 256.")
    lora: dict[str, Any] | None = Field(
        None,
        description="peft LoraConfig kwargs (r, lora_alpha, target_modules, ...; task_type "
                    "is set by realign, SEQ_CLS): only the adapters and the score head "
                    "train, and the adapters are merged into the saved model. null (or {}): "
                    "the whole model trains. Default: null.")
    eval_batch_size: int = Field(
        8, ge=1,
        description="Sequences per scoring batch (≥ 1) for held-out and training pairs. "
                    "Default: 8.")
    train_eval_pairs: int = Field(
        256, ge=1,
        description="First training pairs (≥ 1) scored for reward_overfit (train accuracy − "
                    "held-out accuracy). Default: 256.")
    gap_pairs: Literal["heldout", "all"] = Field(
        "heldout",
        description="Pairs scored for preference_gap when stage 2 had no explicit scores: "
                    "heldout (the held-out pairs) or all (train + held-out; slower). "
                    "Default: heldout.")
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other trl.RewardConfig field, passed as is (e.g. "
                    "gradient_checkpointing, bf16, weight_decay). Keys the stage sets itself "
                    "(learning_rate, per_device_train_batch_size, max_length, output_dir, "
                    "seed, use_cpu, report_to, ...) are refused with the field to set "
                    "instead. Default: {}.")

    @field_validator("extra")
    @classmethod
    def _extra_not_owned(cls, v: dict[str, Any]) -> dict[str, Any]:
        _refuse_owned(v, {**_REWARD_OWNED, **_WHERE_FILES_GO}, "reward")
        return v

    @field_validator("lora")
    @classmethod
    def _lora_task(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        _refuse_task_type(v, "reward", "SEQ_CLS")
        return v


class DPOStageConfig(_Strict):
    """Stage 5: the TRL DPOConfig fields we pass through, plus the KL monitor.

    ``max_length`` and ``lora`` also shape stage 3 (reference init), which builds the
    policy and the KL probe that stage 5 trains and measures.
    """

    beta: float = Field(
        0.1, gt=0,
        description="DPO β (> 0): the strength of the pull to the reference; higher stays "
                    "closer. The KL monitor's held-out margins m = β·(Δ log-ratio) use the "
                    "same β (for loss_type ipo it is TRL's τ). Default: 0.1.")
    loss_type: str | list[str] = Field(
        "sigmoid",
        description="TRL DPO loss: one of " + _TRL_LOSS_TYPES + ", or a non-empty list of "
                    "them (combined; weights in dpo.extra.loss_weights, one per loss). "
                    "TRL checks the value. Default: sigmoid.")
    learning_rate: float = Field(
        5e-6, gt=0,
        description="Peak learning rate (> 0). A KL breach under on_breach rollback or "
                    "halve_lr halves it for the rest of training. Default: 5.0e-6.")
    batch_size: int = Field(
        4, ge=1,
        description="Pairs per device batch (≥ 1); an optimizer step sees batch_size × "
                    "gradient_accumulation_steps × processes pairs. Default: 4.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Batches per optimizer step (≥ 1). Default: 1.")
    max_steps: int = Field(
        40, ge=-1,
        description="Optimizer steps. The stage trains on (and precomputes reference "
                    "log-probs for) only the pairs these steps consume, max_steps × "
                    "batch_size × gradient_accumulation_steps × processes, drawn from the "
                    "training split by seed; more steps than the split covers loop over it "
                    "again. -1: train for dpo.num_epochs epochs instead. Default: 40.")
    num_epochs: float = Field(
        1.0, gt=0,
        description="Epochs over the training split (> 0); used only when dpo.max_steps is "
                    "-1. Default: 1.0.")
    max_length: int = Field(
        DEFAULT_MAX_LENGTH, ge=8,
        description="Tokens per prompt + response sequence (≥ 8) in DPO training; also the "
                    "length at which stage 3 tokenizes the KL probe (initial_kl and the "
                    "reference statistics) and the stage-5 KL checks run. Part of the "
                    "reference log-prob cache key. Default: 256.")
    warmup_steps: float = Field(
        0, ge=0,
        description="Linear warm-up (≥ 0): a number of optimizer steps (≥ 1), or a fraction "
                    "of all steps when < 1. Default: 0.")
    lora: dict[str, Any] | None = Field(
        None,
        description="peft LoraConfig kwargs (r, lora_alpha, target_modules, ...; task_type "
                    "is set by realign, CAUSAL_LM). Stage 3 builds the policy with these "
                    "adapters (zero-initialized, so it starts at the reference) and stage 5 "
                    "trains them and merges them into the saved model. null (or {}): full "
                    "fine-tuning of a copy of the reference. Default: null.")
    report_to: list[str] = Field(
        default_factory=list,
        description="transformers trackers (wandb, tensorboard, mlflow, ...) that receive "
                    "TRL's metrics and the KL monitor's kl / heldout_margin / "
                    "heldout_accuracy. Empty: none (metrics.jsonl is always written). "
                    "Default: [].")
    save_every: int = Field(
        50, ge=1,
        description="On-disk checkpoint interval in optimizer steps (≥ 1); the last two "
                    "are kept, for `realign resume` and `realign rollback`. Default: 50.")
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other trl.DPOConfig field, passed as is (e.g. ld_alpha, "
                    "label_smoothing, loss_weights, truncation_mode). Keys the stage sets "
                    "itself (beta, max_length, loss_type, learning_rate, output_dir, seed, "
                    "save_steps, ...) are refused with the field to set instead. Default: {}.")

    @field_validator("loss_type")
    @classmethod
    def _loss_type_not_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("loss_type: give at least one loss type")
        return v

    @field_validator("extra")
    @classmethod
    def _extra_not_owned(cls, v: dict[str, Any]) -> dict[str, Any]:
        _refuse_owned(v, {**_DPO_OWNED, **_WHERE_FILES_GO}, "dpo")
        return v

    @field_validator("lora")
    @classmethod
    def _lora_task(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        _refuse_task_type(v, "dpo", "CAUSAL_LM")
        return v


class KLMonitorConfig(_Strict):
    """The live KL gate during DPO (see docs/dpo-optimization.md).

    A check measures the mean per-token KL(π_θ ‖ π_ref) and the held-out DPO margin on the
    probe; a breach is a KL above the ``kl_divergence`` threshold (preset or
    ``thresholds.kl_divergence``).
    """

    every: int = Field(
        20, ge=1,
        description="Measure KL every N optimizer steps (≥ 1), at step 0 (the policy "
                    "stage 5 starts from) and at the last step. Each check costs two policy forward passes "
                    "over the probe. Default: 20.")
    probe_size: int = Field(
        16, ge=1,
        description="Held-out pairs in the KL probe (≥ 1): the first probe_size pairs of "
                    "the held-out split (fewer when the split is smaller), written by stage 3. "
                    "Stage 7 takes its win-rate prompts from outside the probe first. "
                    "Default: 16.")
    on_breach: BreachPolicy = Field(
        "rollback",
        description="Action on a KL breach: rollback (restore the last check that passed, "
                    "reset the optimizer moments, halve the learning rate, continue), "
                    "halve_lr (halve the learning rate, continue from where it is) or stop "
                    "(stop training). The final model is the passing check with the best "
                    "held-out margin either way. Default: rollback.")
    max_breaches: int = Field(
        3, ge=1,
        description="The breach that brings the count to max_breaches (≥ 1) stops "
                    "training, whatever on_breach says; 1: stop at the first breach. "
                    "Default: 3.")
    batch_size: int = Field(
        8, ge=1,
        description="Probe sequences per forward pass (≥ 1) in stage 3 (initial_kl, "
                    "reference statistics) and in the stage-5 checks. Default: 8.")
    gate_prompts: int = Field(
        16, ge=1,
        description="Held-out prompts (≥ 1) for stage 5's kl_divergence gate: the first "
                    "gate_prompts distinct prompts of the held-out pairs after the KL probe "
                    "whose prompt is not a probe prompt (fewer when there are fewer). One "
                    "response per prompt is sampled from the selected model (temperature 1, "
                    "seeded by the run's seed) and the gate is the mean per-token KL along "
                    "those responses. None outside the probe: the gate is unmeasured. "
                    "Default: 16.")
    gate_max_new_tokens: int = Field(
        32, ge=1,
        description="Most tokens (≥ 1) of each response sampled for the kl_divergence gate; "
                    "a response ends earlier at its end-of-sequence token. The cost of the "
                    "gate grows with gate_prompts × gate_max_new_tokens. Default: 32.")
    gate_pairs: int = Field(
        32, ge=1,
        description="Held-out pairs (≥ 1) for stage 5's reward_margin gate (and the "
                    "teacher-forced KL reported beside the kl_divergence gate): the first "
                    "gate_pairs held-out pairs after the KL probe whose prompt is not a probe "
                    "prompt (fewer when there are fewer). None outside the probe: the gate is "
                    "unmeasured. Default: 32.")


class EvaluationConfig(_Strict):
    """Stage 7: retention on the stage-1 benchmarks, win rate, rollback (docs/evaluation-monitoring.md)."""

    win_rate_prompts: int = Field(
        64, ge=1,
        description="Distinct held-out prompts judged for win_rate (≥ 1; fewer when the "
                    "held-out split has fewer), those outside the KL probe first. "
                    "Default: 64.")
    max_new_tokens: int = Field(
        64, ge=1,
        description="Cap on the greedy responses of the policy and of the baseline, in "
                    "tokens (≥ 1). Default: 64.")
    batch_size: int = Field(
        8, ge=1,
        description="Prompts per generation batch and sequences per reward-model judging "
                    "batch (≥ 1). Default: 8.")
    judge: Literal["auto", "verifier", "reward_model"] = Field(
        "auto",
        description="Who judges policy vs baseline: auto (the answer verifier for rows with "
                    "a reference answer, else the stage-4 reward model, scoring at "
                    "reward.max_length), verifier (reference rows only) or reward_model "
                    "(every prompt; needs stage 4). Default: auto.")
    n_boot: int = Field(
        2000, ge=1,
        description="Bootstrap resamples (≥ 1) for the 95% CIs of the retention gates and "
                    "of win_rate. Default: 2000.")
    rollback_on_regression: bool = Field(
        False,
        description="true: when stage 7 fails, restore the best earlier model that passes "
                    "at once (same as `realign rollback RUN`); false: report only. "
                    "Default: false.")


ScorerName = Literal["auto", "verifier", "reward_model"]
PairingRule = Literal["max_min", "max_random"]
IterativeReference = Literal["initial", "previous"]


class GenerationConfig(_Strict):
    """Pairs sampled from the policy: stage 2 with ``prompts`` (generation mode) and every
    stage-6 iteration (docs/preference-data-generation.md#generating-pairs-from-the-policy)."""

    samples: int = Field(
        4, ge=2,
        description="Responses sampled per prompt (≥ 2): k of RLHFlow's best-of-k pairing. "
                    "The cost of generation grows with prompts × samples × max_new_tokens. "
                    "Default: 4.")
    temperature: float = Field(
        1.0, ge=0,
        description="Sampling temperature (≥ 0; 0: greedy, which gives k equal responses "
                    "and no pairs). Default: 1.0.")
    top_p: float = Field(
        0.95, gt=0, le=1,
        description="Nucleus sampling (0 < top_p ≤ 1): each token is drawn from the most "
                    "probable tokens that hold top_p of the probability; 1: the whole "
                    "vocabulary. Default: 0.95.")
    max_new_tokens: int = Field(
        64, ge=1,
        description="Most tokens per sampled response (≥ 1); a response ends earlier at its "
                    "end-of-sequence token. Default: 64.")
    batch_size: int = Field(
        32, ge=1,
        description="Sequences per sampling batch (≥ 1): batch_size ÷ samples prompts at a "
                    "time, whose prompt tokens go through the model once for all their "
                    "samples. Default: 32.")
    scorer: ScorerName = Field(
        "auto",
        description="Who scores the samples: verifier (the row's answer, tests or "
                    "instructions; realign verify's checks), reward_model "
                    "(generation.reward_model, or in stage 6 the stage-4 reward model) or auto "
                    "(the verifier when the prompt rows carry ground truth, else the reward "
                    "model). Default: auto.")
    reward_model: str | None = Field(
        None,
        description="A trained reward model (folder) to score samples with: needed by stage "
                    "2 in generation mode when the prompts carry no ground truth (stage 4 "
                    "runs after stage 2); stage 6 uses the stage-4 reward model when this is "
                    "null. Its chat template should be the policy's (a warning says when it "
                    "is not). Default: null.")
    pairing: PairingRule = Field(
        "max_min",
        description="Pair selection per prompt: max_min (the best-scored sample as chosen, "
                    "the worst as rejected) or max_random (the best as chosen, a random "
                    "lower-scored one as rejected). Default: max_min.")
    min_score_gap: float = Field(
        0.1, ge=0, le=1,
        description="Least score gap (0-1) between chosen and rejected: a prompt whose best "
                    "and worst samples differ by less (or not at all) gives no pair. Verifier "
                    "scores are in [0, 1]; reward-model scores count as σ(Δ) − σ(−Δ) = "
                    "tanh(Δ/2) of the reward difference Δ. Default: 0.1.")


class IterativeConfig(_Strict):
    """Stage 6: rounds of generate → validate → DPO (docs/iterative-training.md)."""

    max_iterations: int = Field(
        3, ge=1,
        description="Most iterations (≥ 1); the stage stops earlier when the gain stalls "
                    "(iterative.patience) or a gate fails. Default: 3.")
    patience: int = Field(
        2, ge=1,
        description="Stop after this many iterations in a row (≥ 1) whose held-out verifier "
                    "gain over the previous iteration has a 95% CI that includes 0. "
                    "Default: 2.")
    reference: IterativeReference = Field(
        "initial",
        description="The DPO reference of every iteration: initial (π0, the stage-3 "
                    "reference, fixed; the KL gate measures the drift from it) or previous "
                    "(the previous iteration's policy; the KL gate still measures KL to π0). "
                    "Default: initial.")
    max_steps: int = Field(
        20, ge=1,
        description="DPO optimizer steps per iteration (≥ 1), warm-started from the "
                    "previous iteration's policy; batch size, beta, loss and the KL monitor "
                    "are the dpo and kl_monitor sections'. Default: 20.")
    learning_rate: float | None = Field(
        None, gt=0,
        description="Peak learning rate of each iteration's DPO (> 0). null: "
                    "dpo.learning_rate. Default: null.")
    prompts_per_iteration: int = Field(
        256, ge=1,
        description="Training prompts (≥ 1) sampled from in each iteration: all of the "
                    "stage-2 train prompts when there are fewer, else this many drawn by the "
                    "run's seed and the iteration number. Default: 256.")
    eval_prompts: int = Field(
        64, ge=1,
        description="Held-out prompts (≥ 1) on which each iteration is measured: greedy "
                    "responses (evaluation.max_new_tokens) scored by the verifier, judged "
                    "against the baseline's (win_rate) and checked for reward hacking. "
                    "Default: 64.")


class RunConfig(_Strict):
    """A whole run: exactly one of ``data`` (preference pairs) and ``prompts`` (generation
    mode) is required; every other field has a default."""

    model: str = Field(
        "default",
        description="Starting model: 'default' (SmolLM2-135M-Instruct, available offline), "
                    "a local path (relative paths resolved against the config's folder) or a "
                    "hub id. Stage 1 may fine-tune it (sft.dataset). Default: default.")
    data: str | None = Field(
        None,
        description="Preference pairs (JSONL/JSON/Parquet file, saved dataset or hub id) with "
                    "prompt, chosen and rejected; relative paths are resolved against the "
                    "config's folder. Stage 2 validates and splits it. Exactly one of data "
                    "and prompts is required. Default: null.")
    prompts: str | None = Field(
        None,
        description="Generation mode: prompts (JSONL/JSON/Parquet file) with prompt and the "
                    "ground truth the verifiers check (answer, tests or instructions; "
                    "optional verifier). Stage 2 splits them, samples generation.samples "
                    "responses per prompt from the stage-1 model, scores and pairs them, then "
                    "validates the pairs; stage 1 measures perplexity on the held-out "
                    "prompts' answers. Relative paths are resolved against the config's "
                    "folder. Exactly one of data and prompts is required. Default: null.")
    data_split: str | None = Field(
        None,
        description="Split of a saved DatasetDict or hub dataset in data. null: the only or "
                    "the train split. Default: null.")
    eval_sets: list[str] = Field(
        default_factory=list,
        description="Evaluation sets checked for contamination in stage 2 (files or saved "
                    "datasets; relative paths resolved against the config's folder). Empty: "
                    "the decontamination gate is unmeasured. Default: [].")
    eval_field: str | None = Field(
        None,
        description="Text field of the eval_sets rows. null: the first present of prompt, "
                    "question, text, input, problem, instruction, ... Default: null.")
    score_scale: str = Field(
        "auto",
        description="Scale of score_chosen/score_rejected in data, for preference_gap: LO-HI "
                    "(e.g. 1-10, LO < HI; a score outside it is bad input) or auto: a scale is "
                    "read from the scores only when they leave no doubt (their lowest and "
                    "highest values are the two ends of one of 0-1, 1-5, 1-10, 0-10, 0-100), "
                    "else preference_gap is unmeasured until you declare it. Default: auto.")
    gap_min_coverage: float = Field(
        GAP_MIN_COVERAGE, gt=0, le=1,
        description="Least share of the usable pairs (0 < share ≤ 1) that must carry both "
                    "scores for stage 2 to measure preference_gap from them; below it the gate "
                    "is unmeasured (stage 4 then measures it with the reward model). Default: "
                    f"{GAP_MIN_COVERAGE}.")
    skip_bad_rows: bool = Field(
        False,
        description="true: skip malformed rows of data and list them in the findings; "
                    "false: the first malformed row stops the run (exit 2). Default: false.")
    preset: PresetName = Field(
        "standard",
        description="Gate threshold preset: relaxed, standard or strict (`realign thresholds "
                    "--json` lists them). Default: standard.")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Per-gate overrides of the preset, gate name → threshold (e.g. "
                    "{min_pairs: 300}); recorded in every verdict. kl_divergence is also the "
                    "KL monitor's breach level. Default: {}.")
    allow_gate_failures: list[str] = Field(
        default_factory=list,
        description="Gates whose failure does not stop the run; the failure is still "
                    "recorded in the verdict. Default: [].")
    stages: list[str] = Field(
        default_factory=lambda: list(STAGES),
        description="Stages to run, by name, always in stage order; a stage reads the "
                    "artifacts of the earlier stages in the same run directory. Default: ["
                    + ", ".join(STAGES) + "].")
    output_dir: str = Field(
        "runs",
        description="Parent folder of the run directories (<output_dir>/<run_id>/), relative "
                    "to where realign runs, not to the config. Default: runs.")
    run_id: str | None = Field(
        None,
        description="Name of the run directory: one folder name of letters, digits, '.', '_' "
                    "and '-', starting with a letter or digit, at most 128 characters (no "
                    "'/', '..' or absolute path). An existing run is refused (use `realign "
                    "resume`). null: a timestamp (YYYYMMDD-HHMMSS). Default: null.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1,
        description="Seed (0 … 2³²−1) of the held-out split, of every training stage and of "
                    "the bootstrap CIs. Default: 0.")
    device: str | None = Field(
        None,
        description="torch device for every stage: cuda, cuda:N, mps or cpu. null: the best "
                    "available (cuda, then mps, then cpu). With backend mlx, stages 1, 3, 5 "
                    "and 6 read it as MLX's device: cpu, or gpu/mps/cuda for MLX's GPU. "
                    "Default: null.")
    backend: BackendName = Field(
        "auto",
        description="Training framework of stages 1, 3, 5 and 6 (perplexity, initial KL and "
                    "the KL probe, DPO with the KL monitor and its held-out gates, the "
                    "iterative DPO rounds): trl (PyTorch: transformers + TRL + PEFT), mlx "
                    "(mlx + mlx-lm; install with pip install -e '.[mlx]') or auto: mlx on "
                    "Apple Silicon (macOS on arm64) when mlx and mlx-lm are installed, else "
                    "trl (realign.backends.default_backend_name), resolved once when a job (run "
                    "or resume) starts. Stages 2, 4 and 7 (generation, reward model, benchmarks) always "
                    "run on PyTorch; a model saved by MLX is a safetensors folder they load. "
                    "Default: auto.")
    heldout: HeldoutConfig = Field(
        default_factory=HeldoutConfig,
        description="The train / held-out split of the usable pairs (see its fields).")
    sft: SFTConfig = Field(
        default_factory=SFTConfig,
        description="Stage 1: optional SFT, baseline perplexity and baseline benchmarks.")
    reward: RewardModelConfig = Field(
        default_factory=RewardModelConfig,
        description="Stage 4: the reward model (TRL RewardTrainer).")
    dpo: DPOStageConfig = Field(
        default_factory=DPOStageConfig,
        description="Stage 5: DPO training (TRL DPOTrainer); max_length and lora also "
                    "shape stage 3.")
    kl_monitor: KLMonitorConfig = Field(
        default_factory=KLMonitorConfig,
        description="The live KL gate of stage 5, on the probe written by stage 3.")
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig,
        description="Pairs sampled from the policy: stage 2 with prompts, and stage 6.")
    iterative: IterativeConfig = Field(
        default_factory=IterativeConfig,
        description="Stage 6: iterations of generate → validate → DPO.")
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig,
        description="Stage 7: capability retention, win rate and rollback.")

    @model_validator(mode="after")
    def _one_source(self) -> RunConfig:
        if (self.data is None) == (self.prompts is None):
            raise ValueError("give exactly one of data (preference pairs: stage 2 validates "
                             "them) and prompts (generation mode: stage 2 samples pairs from "
                             "the model)" + ("" if self.data is None else ", not both"))
        return self

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        return None if v is None else validate_run_id(v)

    @field_validator("thresholds", "allow_gate_failures")
    @classmethod
    def _known_gates(cls, v: Any) -> Any:
        for name in v:  # dict keys or list items
            if name not in GATE_SPECS:
                raise ValueError(f"unknown gate '{name}' (known: {', '.join(GATE_SPECS)})")
        return v

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        for name in v:
            if name in REGISTRY and name not in STAGES:
                raise ValueError(f"stage '{name}' (stage {REGISTRY[name].number}) is not built "
                                 f"yet (runnable: {', '.join(STAGES)})")
            if name not in STAGES:
                raise ValueError(f"unknown stage '{name}' (known: {', '.join(STAGES)})")
        return sorted(set(v), key=lambda s: STAGES[s])

    @field_validator("score_scale")
    @classmethod
    def _scale(cls, v: str) -> str:
        from .metrics import parse_scale

        parse_scale(v)  # ValueError names the bad scale
        return v


# ---------------------------------------------------------------------------- overrides
_CLI = "from the command line"


def _mapping_type(annotation: Any) -> bool:
    """True when a field's type is a free-form mapping (dict, optionally None)."""
    origin = typing.get_origin(annotation)
    if origin is dict or annotation is dict:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_mapping_type(a) for a in typing.get_args(annotation))
    return False


def _model_type(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=VALUE`` -> (["a", "b"], yaml.safe_load(VALUE)), with the path checked against
    the schema: each key must be a field, and only sections and mapping fields (thresholds,
    lora, extra) have keys below them."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"override '{item}' is not KEY=VALUE ({_CLI}; e.g. dpo.beta=0.2)",
                         field=key or None)
    path = key.split(".")
    if any(not part.strip() or part != part.strip() for part in path):
        raise InputError(f"override '{item}': empty or padded key in '{key}' ({_CLI})",
                         field=key)
    model: type[BaseModel] | None = RunConfig
    for i, part in enumerate(path):
        where = ".".join(path[:i]) or "the run config"
        if model is None:  # inside a free-form mapping: any key
            continue
        fields = model.model_fields
        if part not in fields:
            raise InputError(f"unknown key '{part}' in {where} (known: {', '.join(fields)}) "
                             f"(override '{item}' {_CLI})", field=".".join(path[:i + 1]))
        ann = fields[part].annotation
        sub = _model_type(ann)
        if sub is not None:
            model = sub
        elif _mapping_type(ann):
            model = None
        elif i < len(path) - 1:
            raise InputError(f"'{'.'.join(path[:i + 1])}' is a single value, not a section: "
                             f"'{key}' cannot be set (override '{item}' {_CLI})", field=key)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise InputError(f"value '{raw}' is not valid YAML: {getattr(e, 'problem', e)} "
                         f"(override '{item}' {_CLI})", field=key) from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the parsed config mapping ``data`` with ``KEY=VALUE`` overrides applied.

    ``KEY`` is a dotted path of config fields (``dpo.beta``, ``kl_monitor.on_breach``,
    ``thresholds.min_pairs``, ``dpo.extra.ld_alpha``); ``VALUE`` is read as YAML
    (``0.2``, ``stop``, ``[dpo,evaluation]``, ``[]``, ``null``, ``{r: 8}``), so it gets
    exactly the types the same text would get in the file. Later overrides win. Raises
    :class:`InputError` naming the override for a missing ``=``, an unknown key, a path
    through a single value, or a value that is not YAML. The values themselves are checked
    when the result is validated (``RunConfig.model_validate``, as :func:`load_config` does).
    """
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node: dict[str, Any] = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise InputError(f"'{'.'.join(path[:i + 1])}' is {nxt!r} in the config, not a "
                                 f"mapping: '{'.'.join(path)}' cannot be set (override "
                                 f"'{item}' {_CLI})", field=".".join(path))
            node = nxt
        node[path[-1]] = value
    return out


# ---------------------------------------------------------------------------- loading
def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a YAML run config; relative paths are resolved against its folder.

    ``overrides`` (``["dpo.beta=0.2", ...]``, see :func:`apply_overrides`) are applied to
    the parsed mapping before validation. A bad value is an :class:`InputError` naming the
    file, line and field, or, when an override set it, the override.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("config file not found", file=p)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError("config is not UTF-8", file=p) from None
    try:
        raw = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise InputError(f"invalid YAML: {getattr(e, 'problem', e)}", file=p,
                         line=None if line is None else line + 1) from None
    if not isinstance(data, dict):
        raise InputError("config must be a YAML mapping", file=p)
    overrides = list(overrides or [])
    data = apply_overrides(data, overrides)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, p, raw, data, overrides) from None
    base = p.resolve().parent
    if cfg.data is not None:
        cfg.data = _resolve(base, cfg.data)
    if cfg.prompts is not None:
        cfg.prompts = _resolve(base, cfg.prompts)
    if cfg.generation.reward_model:
        cfg.generation.reward_model = _resolve(base, cfg.generation.reward_model)
    cfg.eval_sets = [_resolve(base, e) for e in cfg.eval_sets]
    if cfg.sft.dataset:
        cfg.sft.dataset = _resolve(base, cfg.sft.dataset)
    if cfg.model != "default":
        cfg.model = _resolve(base, cfg.model)
    return cfg


def _validation_error(e: ValidationError, p: Path, raw: Any, data: dict[str, Any],
                      overrides: list[str]) -> InputError:
    """The first error of ``e`` as an InputError: blamed on the last override whose path
    and the error's field are one inside the other, else on the file's line."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    base = list(loc)
    cause = (err.get("ctx") or {}).get("error")
    msg = err["msg"]
    if err["type"] == "value_error" and isinstance(cause, ValueError):
        msg = str(cause)  # without pydantic's "Value error, " prefix
    candidates = [loc]
    if isinstance(cause, _ConfigValueError):
        loc = loc + list(cause.at)
        candidates = [loc] + [base + list(r) for r in cause.related]
    loc = _trim_loc(data, loc)
    field = ".".join(loc) or None
    for item in reversed(overrides):
        opath = item.partition("=")[0].strip().split(".")
        if any(opath[:n] == c[:n] for c in candidates for n in [min(len(opath), len(c))]):
            return InputError(f"{msg} (override '{item}' {_CLI})", field=field)
    return InputError(msg, file=p, line=_line_of(raw, loc), field=field)


def _trim_loc(data: Any, loc: list[str]) -> list[str]:
    """``loc`` without pydantic's type tags (``dpo.loss_type.str``): kept while it follows
    keys and list indexes of the data, plus one missing key of a mapping (an unknown or
    missing field)."""
    out: list[str] = []
    node = data
    for key in loc:
        if isinstance(node, dict):
            out.append(key)
            if key not in node:
                break
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            out.append(key)
            node = node[int(key)]
        else:
            break
    return out


def _resolve(base: Path, value: str) -> str:
    """A relative path that exists next to the config wins; hub ids are kept as is."""
    cand = base / value
    return str(cand) if not Path(value).is_absolute() and cand.exists() else value


def _line_of(node: Any, loc: list[str]) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of its closest existing parent)."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == key:
                    line, nxt = k.start_mark.line + 1, v
                    break
            if nxt is None:
                break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
            line = node.start_mark.line + 1
        else:
            break
    if line is None and node is not None and hasattr(node, "start_mark"):
        line = node.start_mark.line + 1
    return line
