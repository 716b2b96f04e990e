"""Metric functions: pure math, no file or model I/O inside the formulas.

Public entry points kept from the original skill: :func:`validate_dpo_pairs`,
:func:`assess_rlvr_verifiability`, :func:`calculate_ifd_score` (the last two are
provided by later stages; until then they raise ``NotImplementedError`` with a reason
rather than returning made-up numbers).

Formulas (METRICS.md):

* preference gap: ``mean_i (s(chosen_i) - s(rejected_i))`` with ``s`` mapped to [0, 1]
  from the declared scale ``[lo, hi]`` by ``s = (x - lo) / (hi - lo)``.
* length bias: share of pairs with ``words(chosen) > words(rejected)`` (words are
  whitespace-separated tokens); effect size ``d_z = mean(Δ) / sd(Δ)`` with
  ``Δ = words(chosen) - words(rejected)`` (Cohen's d for paired samples).
* decontamination: ``1 - contaminated examples / all examples``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:  # pragma: no cover
    from .gates import StageVerdict

#: Score scales recognised by ``score_scale="auto"``, tried in this order; the first
#: one that contains every observed score is used (and named in the gate's detail).
STANDARD_SCALES: tuple[tuple[float, float], ...] = ((0, 1), (1, 5), (1, 10), (0, 10), (0, 100))


def parse_scale(spec: str) -> tuple[float, float] | None:
    """``"1-10"`` -> (1.0, 10.0); ``"auto"`` -> None. Raises ValueError."""
    if spec == "auto":
        return None
    lo, sep, hi = spec.partition(":") if ":" in spec else spec.partition("-")
    try:
        a, b = float(lo), float(hi)
    except ValueError:
        raise ValueError(f"score scale '{spec}' is not LO-HI (e.g. 1-10) or 'auto'") from None
    if not sep or b <= a:
        raise ValueError(f"score scale '{spec}': need LO < HI")
    return a, b


def infer_scale(lo_seen: float, hi_seen: float) -> tuple[float, float] | None:
    """The first of :data:`STANDARD_SCALES` containing ``[lo_seen, hi_seen]``, else None."""
    for lo, hi in STANDARD_SCALES:
        if lo <= lo_seen and hi_seen <= hi:
            return (lo, hi)
    return None


@dataclass
class RunningDiff:
    """Streaming mean/sd of paired differences (Welford), plus counts of signs."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    positive: int = 0
    ties: int = 0
    lo: float = math.inf
    hi: float = -math.inf

    def update(self, diffs: Sequence[float] | Any) -> None:
        import numpy as np

        d = np.asarray(diffs, dtype=np.float64)
        if d.size == 0:
            return
        n_b = d.size
        mean_b = float(d.mean())
        m2_b = float(((d - mean_b) ** 2).sum())
        delta = mean_b - self.mean
        total = self.n + n_b
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * self.n * n_b / total
        self.n = total
        self.positive += int((d > 0).sum())
        self.ties += int((d == 0).sum())

    @property
    def sd(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0

    def ci95(self) -> tuple[float, float] | None:
        """Normal-approximation 95% CI of the mean: mean ± 1.96·sd/√n."""
        if self.n < 2:
            return None
        half = 1.96 * self.sd / math.sqrt(self.n)
        return (self.mean - half, self.mean + half)


class LengthBias(BaseModel):
    """Length-bias statistics of a set of pairs (word counts)."""

    pairs: int
    chosen_longer_share: float | None
    ties_share: float | None
    mean_word_diff: float | None
    effect_size_dz: float | None


def length_bias(stats: RunningDiff) -> LengthBias:
    """share = #(Δ > 0) / n, d_z = mean(Δ) / sd(Δ), Δ = words(chosen) - words(rejected)."""
    if stats.n == 0:
        return LengthBias(pairs=0, chosen_longer_share=None, ties_share=None,
                          mean_word_diff=None, effect_size_dz=None)
    sd = stats.sd
    return LengthBias(
        pairs=stats.n,
        chosen_longer_share=stats.positive / stats.n,
        ties_share=stats.ties / stats.n,
        mean_word_diff=stats.mean,
        effect_size_dz=(stats.mean / sd) if sd > 0 else 0.0,
    )


def preference_gap(score_diff: RunningDiff, scale: tuple[float, float]) -> tuple[float, tuple[float, float] | None]:
    """gap = mean(x_c - x_r) / (hi - lo): the mean of s(c) - s(r) with s = (x - lo)/(hi - lo)."""
    width = scale[1] - scale[0]
    ci = score_diff.ci95()
    return score_diff.mean / width, (None if ci is None else (ci[0] / width, ci[1] / width))


def decontamination_rate(contaminated: int, total: int) -> float | None:
    """1 - contaminated / total; None when there are no examples."""
    if total <= 0:
        return None
    return 1.0 - contaminated / total


def validate_dpo_pairs(pairs: str | Path | list[dict[str, Any]], **kwargs: Any) -> "StageVerdict":
    """Validate preference pairs: the stage-2 gates and findings (see :mod:`realign.validation`).

    ``pairs`` is a path (JSONL, JSON, Parquet, saved dataset) or a list of row dicts.
    Keyword arguments are those of :func:`realign.validation.validate_file`.
    """
    from .validation import validate_file, validate_rows

    if isinstance(pairs, list):
        return validate_rows(pairs, **kwargs)
    return validate_file(pairs, **kwargs)


def assess_rlvr_verifiability(*_: Any, **__: Any) -> Any:
    """Share of examples a real verifier can check. Not built yet: see the open issue."""
    raise NotImplementedError(
        "assess_rlvr_verifiability needs the verifiers (math equivalence, code tests, "
        "instruction constraints); it is not built yet and returns no number rather than "
        "a guess")
