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
from .sandbox import SandboxLimits
from .validation import validate_file, validate_rows
from .verifiers import VerifiabilityReport, verify_file, verify_rows

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


def assess_rlvr_verifiability(data: str | Path | list[dict[str, Any]], *,
                              workers: int | None = None,
                              limits: SandboxLimits | None = None,
                              threshold: float | None = None,
                              preset: str = "standard") -> VerifiabilityReport:
    """Share of rows a real verifier can check, and how: runs the verifiers on every row.

    ``data`` is a path (JSONL, JSON array, Parquet) or a list of row dicts with the row
    contract of :mod:`realign.verifiers` (``prompt``; ``response`` or ``completion``;
    ``answer``, ``tests`` or ``instructions``; optional ``verifier``). A row counts as
    verifiable when a verifier applies and its ground truth can be checked (the answer
    parses, the tests compile, every instruction id is supported); responses, when present,
    are checked too. The gate ``rlvr_verifiability`` compares the share with ``threshold``
    (default: the ``preset``'s, :data:`realign.gates.PRESETS`). Nothing is looked up by
    domain name. Raises :class:`~realign.errors.InputError` (file, line, field) on rows that
    break the contract.
    """
    kwargs: dict[str, Any] = {"workers": workers, "limits": limits, "threshold": threshold,
                              "preset": preset}
    if isinstance(data, list):
        return verify_rows(data, **kwargs)
    return verify_file(data, **kwargs)


def calculate_ifd_score(model: Any, instructions: Any, responses: Any, **kwargs: Any) -> Any:
    """IFD(Q, A) = PPL(A | Q) ÷ PPL(A) (Li et al. 2023), through the backend's log-probs.

    PPL(A | Q) = exp(−mean_t log p(a_t | Q, a_<t)) with the chat template; PPL(A) the same
    answer tokens after an instruction-free context (an empty user turn; see
    :mod:`realign.ifd`). One instruction and response → a float; lists → a list in input
    order; None for an empty answer. Keyword arguments: ``batch_size``, ``max_length``,
    ``device`` (:func:`realign.ifd.calculate_ifd_score`).
    """
    return _ifd(model, instructions, responses, **kwargs)
