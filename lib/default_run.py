"""The run ``realign run`` makes with no arguments: all seven stages on the embedded default
model (SmolLM2-135M-Instruct), the shipped verifiable prompt set and the offline suites.

The prompts (``realign/default_data/sentiment.jsonl``, package data, written by
``examples/make_default_prompts.py``): 240 short reviews, half positive and half
negative, each asking for the label in one word, checked by the ``exact`` verifier.
Stage 2 samples 4 responses per prompt from the model and pairs a correct answer with a
wrong one; stage 6 repeats that from the trained policy. The sizes below fit a 2-core CPU
in under 15 minutes; :data:`DEFAULT_RUN_NOTES` says what they cost in rigour, and the
README reports what the run measured.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .config import RunConfig

#: The shipped verifiable prompt set of the default run.
DEFAULT_PROMPTS = "default_data/sentiment.jsonl"
#: The default run's learning rate, for LoRA adapters (:data:`DEFAULT_LORA`; chosen by
#: measurement: docs/iterative-training.md#the-default-run).
DEFAULT_LEARNING_RATE = 2e-4
#: LoRA adapters on every linear layer: full fine-tuning of the 135M model drifted past
#: the KL gate within 6 steps at every learning rate measured (2e-6 to 2e-5).
DEFAULT_LORA: dict[str, Any] = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
#: What the default run's sizes give up, shown with the run and in the README.
DEFAULT_RUN_NOTES = (
    ("min_pairs is lowered to 60 for this run (the standard preset asks for 1000): a 135M "
     "model sampled 4 times on 240 prompts on a CPU yields on the order of a hundred pairs; "
     "the override is recorded in every verdict"),
    ("benchmarks run on the first 16 items of realign_knowledge and realign_arith, so one "
     "item lost is a retention of about 0.94; realign_format is left out because the "
     "model scores 0 on its first 16 items, which leaves retention undefined"),
    ("win_rate is in allow_gate_failures: when the policy does not beat the baseline, "
     "stage 6 keeps iterating by its gain rule and the run goes on to stage 7, which "
     "rejects the policy and rolls back; the run then ends passed_with_failures (exit 4)"),
)


def default_prompts_path() -> Path:
    """The shipped prompt file (inside the installed package)."""
    return Path(str(resources.files("realign").joinpath(DEFAULT_PROMPTS)))


def default_config(*, output_dir: str = "runs", run_id: str | None = None,
                   **changes: Any) -> RunConfig:
    """The default run's config (the values are documented in docs/iterative-training.md);
    ``changes`` replace top-level fields."""
    base: dict[str, Any] = {
        "model": "default",
        "prompts": str(default_prompts_path()),
        "preset": "standard",
        "thresholds": {"min_pairs": 60},
        "allow_gate_failures": ["win_rate"],
        "seed": 0,
        "output_dir": output_dir,
        "run_id": run_id,
        "heldout": {"fraction": 0.2, "min_pairs": 16},
        "sft": {"eval_responses": 32, "benchmarks": ["realign_knowledge", "realign_arith"],
                "benchmark_limit": 16},
        "generation": {"samples": 4, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 24,
                       "batch_size": 32},
        "reward": {"max_steps": 10, "max_length": 128, "train_eval_pairs": 64},
        "dpo": {"beta": 0.1, "learning_rate": DEFAULT_LEARNING_RATE, "batch_size": 4,
                "max_steps": 12, "max_length": 128, "lora": dict(DEFAULT_LORA)},
        "kl_monitor": {"every": 6, "probe_size": 8, "on_breach": "rollback",
                       "gate_prompts": 16, "gate_max_new_tokens": 24},
        "iterative": {"max_iterations": 2, "patience": 2, "max_steps": 8,
                      "prompts_per_iteration": 96, "eval_prompts": 64},
        "evaluation": {"win_rate_prompts": 64, "max_new_tokens": 32,
                       "rollback_on_regression": True},
    }
    base.update(changes)
    return RunConfig.model_validate(base)


def default_config_with(overrides: list[str] | None = None, **changes: Any) -> RunConfig:
    """:func:`default_config` with ``KEY=VALUE`` overrides (checked by the same schema; a
    bad one raises :class:`realign.errors.InputError` naming the field). Used by
    ``realign run`` without ``--config`` and by the MCP tools without ``config_path``."""
    from pydantic import ValidationError

    from .config import apply_overrides
    from .errors import InputError

    data = apply_overrides(default_config(**changes).model_dump(mode="json"),
                           list(overrides or []))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(f"{first['msg']} (override {' '.join(overrides or [])})",
                         field=".".join(str(x) for x in first["loc"])) from None


def is_default_prompts(path: str | Path | None) -> bool:
    """Whether ``path`` is the shipped prompt file (package data: a trusted path wherever
    the package is installed, so the MCP server's root confinement lets it through)."""
    if path is None:
        return False
    try:
        return Path(path).resolve() == default_prompts_path().resolve()
    except OSError:
        return False
