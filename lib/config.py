"""The run configuration: one YAML file, validated by pydantic.

Every field has a default except ``data``; unknown keys are errors (a typo must not be
silently ignored). ``templates.md`` shows a complete example; ``load_config`` names the
file, line and field of a bad value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InputError
from .gates import GATE_SPECS, PresetName

#: Stage order of the pipeline. Stage numbers are those of the seven-stage workflow.
STAGES: dict[str, int] = {
    "sft_baseline": 1,
    "preference_data": 2,
    "reference_init": 3,
    "reward_model": 4,
    "dpo": 5,
    "evaluation": 7,
}

BreachPolicy = Literal["stop", "halve_lr", "rollback"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeldoutConfig(_Strict):
    """How the usable pairs are split into train and held-out (deterministic by seed)."""

    fraction: float = Field(0.1, gt=0, lt=1)
    min_pairs: int = Field(16, ge=2)
    max_pairs: int = Field(256, ge=2)


class SFTConfig(_Strict):
    """Stage 1. Perplexity is always measured; SFT training runs only with a dataset."""

    dataset: str | None = None  # SFT data: prompt/completion, messages, or text rows
    eval_responses: int = Field(64, ge=1, description="held-out responses used for perplexity")
    learning_rate: float = 2e-5
    max_steps: int = 50
    batch_size: int = 4
    max_length: int = 256
    benchmarks: list[str] = Field(default_factory=list,
                                  description="evaluation suites recorded as the baseline")
    benchmark_limit: int | None = None


class RewardModelConfig(_Strict):
    """Stage 4: the reward model (TRL RewardTrainer), see docs/preference-modeling.md."""

    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(30, description="-1: run num_epochs instead")
    num_epochs: float = 1.0
    max_length: int = Field(256, ge=8)
    lora: dict[str, Any] | None = Field(
        None, description="peft LoraConfig kwargs; adapters are merged into the saved model")
    eval_batch_size: int = Field(8, ge=1)
    train_eval_pairs: int = Field(256, ge=1, description="training pairs scored for reward_overfit")
    gap_pairs: Literal["heldout", "all"] = Field(
        "heldout", description="pairs scored for preference_gap when stage 2 had no scores")
    extra: dict[str, Any] = Field(default_factory=dict,
                                  description="any other trl.RewardConfig field, passed as is")


class DPOStageConfig(_Strict):
    """Stage 5: the TRL DPOConfig fields we pass through, plus the KL monitor."""

    beta: float = Field(0.1, gt=0)
    loss_type: str | list[str] = "sigmoid"
    learning_rate: float = Field(5e-6, gt=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(40, description="-1: run num_epochs instead")
    num_epochs: float = 1.0
    max_length: int = Field(256, ge=8)
    warmup_steps: float = Field(0, ge=0, description="warm-up steps, or a fraction of all steps when < 1")
    lora: dict[str, Any] | None = Field(
        None, description="peft LoraConfig kwargs (r, lora_alpha, target_modules, ...); "
                          "null = full fine-tuning")
    report_to: list[str] = Field(default_factory=list, description="TRL/transformers trackers")
    save_every: int = Field(50, ge=1, description="on-disk checkpoint interval (steps), for resume")
    extra: dict[str, Any] = Field(default_factory=dict,
                                  description="any other trl.DPOConfig field, passed as is")


class KLMonitorConfig(_Strict):
    """The live KL gate during DPO (see docs/dpo-optimization.md)."""

    every: int = Field(20, ge=1, description="measure KL every N optimizer steps (each check: two policy forward passes over the probe)")
    probe_size: int = Field(16, ge=1, description="held-out pairs in the KL probe")
    on_breach: BreachPolicy = "rollback"
    max_breaches: int = Field(3, ge=1, description="breaches tolerated before stopping")
    batch_size: int = Field(8, ge=1)


class EvaluationConfig(_Strict):
    """Stage 7: retention on the stage-1 benchmarks, win rate, rollback (docs/evaluation-monitoring.md)."""

    win_rate_prompts: int = Field(64, ge=1, description="held-out prompts judged for win_rate")
    max_new_tokens: int = Field(64, ge=1, description="greedy response length cap (tokens)")
    batch_size: int = Field(8, ge=1, description="generation and reward-model batch size")
    judge: Literal["auto", "verifier", "reward_model"] = Field(
        "auto", description="auto: the verifier for rows with a reference answer, else the "
                            "stage-4 reward model")
    n_boot: int = Field(2000, ge=1, description="bootstrap resamples for the retention CIs")
    rollback_on_regression: bool = Field(
        False, description="when stage 7 fails, restore the best earlier model that passes "
                           "(same as `realign rollback RUN`)")


class RunConfig(_Strict):
    """A whole run. ``data`` is the only required field."""

    model: str = Field("default", description="'default' (SmolLM2-135M-Instruct), a path or hub id")
    data: str
    data_split: str | None = None
    eval_sets: list[str] = Field(default_factory=list)
    eval_field: str | None = None
    score_scale: str = "auto"
    skip_bad_rows: bool = False
    preset: PresetName = "standard"
    thresholds: dict[str, float] = Field(default_factory=dict, description="per-gate overrides")
    allow_gate_failures: list[str] = Field(
        default_factory=list,
        description="gates whose failure does not stop the run (recorded in the verdict)")
    stages: list[str] = Field(default_factory=lambda: list(STAGES))
    output_dir: str = "runs"
    run_id: str | None = None
    seed: int = 0
    device: str | None = Field(None, description="cuda, mps or cpu; default: the best available")
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardModelConfig = Field(default_factory=RewardModelConfig)
    dpo: DPOStageConfig = Field(default_factory=DPOStageConfig)
    kl_monitor: KLMonitorConfig = Field(default_factory=KLMonitorConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

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
            if name not in STAGES:
                raise ValueError(f"unknown stage '{name}' (known: {', '.join(STAGES)})")
        return sorted(set(v), key=lambda s: STAGES[s])


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config; relative paths are resolved against its folder."""
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
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        raise InputError(err["msg"], file=p, line=_line_of(raw, loc),
                         field=".".join(loc) or None) from None
    base = p.resolve().parent
    cfg.data = _resolve(base, cfg.data)
    cfg.eval_sets = [_resolve(base, e) for e in cfg.eval_sets]
    if cfg.sft.dataset:
        cfg.sft.dataset = _resolve(base, cfg.sft.dataset)
    if cfg.model != "default":
        cfg.model = _resolve(base, cfg.model)
    return cfg


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
