"""The seed skill's public entry points, and every metric function.

:func:`validate_dpo_pairs`, :func:`assess_rlvr_verifiability` and
:func:`calculate_ifd_score` are the names the skill documents; each delegates to the
module that implements it. The pure metric functions (gap, length bias, KL from logits,
perplexity, retention, bootstrap CI, win rate) live in :mod:`realign.metrics` and are
re-exported here, so ``from realign.training_metrics import per_token_kl`` works. No
module of the library imports this one (it is the public facade, not a dependency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .gates import StageVerdict
from .ifd import calculate_ifd_score as _ifd
from .metrics import (
    STANDARD_SCALES,
    LengthBias,
    RetentionResult,
    RunningDiff,
    WinRateResult,
    capability_retention,
    decontamination_rate,
    infer_scale,
    length_bias,
    paired_bootstrap_ci,
    parse_scale,
    per_sequence_kl,
    per_token_kl,
    perplexity,
    preference_gap,
    win_rate,
)
from .validation import validate_file, validate_rows

__all__ = [
    "assess_rlvr_verifiability",
    "calculate_ifd_score",
    "validate_dpo_pairs",
    "LengthBias",
    "RetentionResult",
    "RunningDiff",
    "STANDARD_SCALES",
    "WinRateResult",
    "capability_retention",
    "decontamination_rate",
    "infer_scale",
    "length_bias",
    "paired_bootstrap_ci",
    "parse_scale",
    "per_sequence_kl",
    "per_token_kl",
    "perplexity",
    "preference_gap",
    "win_rate",
]


def validate_dpo_pairs(pairs: str | Path | list[dict[str, Any]], **kwargs: Any) -> StageVerdict:
    """Validate preference pairs: the stage-2 gates and findings (see :mod:`realign.validation`).

    ``pairs`` is a path (JSONL, JSON, Parquet, saved dataset) or a list of row dicts.
    Keyword arguments are those of :func:`realign.validation.validate_file`.
    """
    if isinstance(pairs, list):
        return validate_rows(pairs, **kwargs)
    return validate_file(pairs, **kwargs)


def assess_rlvr_verifiability(*_: Any, **__: Any) -> Any:
    """Share of examples a real verifier can check. Not built yet: see the open issue."""
    raise NotImplementedError(
        "assess_rlvr_verifiability needs the verifiers (math equivalence, code tests, "
        "instruction constraints); it is not built yet and returns no number rather than "
        "a guess")


def calculate_ifd_score(model: Any, instructions: Any, responses: Any, **kwargs: Any) -> Any:
    """IFD(Q, A) = PPL(A | Q) ÷ PPL(A) (Li et al. 2023), through the backend's log-probs.

    PPL(A | Q) = exp(−mean_t log p(a_t | Q, a_<t)) with the chat template; PPL(A) the same
    answer tokens after an instruction-free context (an empty user turn; see
    :mod:`realign.ifd`). One instruction and response → a float; lists → a list in input
    order; None for an empty answer. Keyword arguments: ``batch_size``, ``max_length``,
    ``device`` (:func:`realign.ifd.calculate_ifd_score`).
    """
    return _ifd(model, instructions, responses, **kwargs)
