"""Metric functions: pure math, no file or model I/O inside the formulas.

Every gate number realign reports is computed by a function here (or by a model-level
wrapper that feeds it log-probs or logits). Formulas, also in docs/quality-thresholds.md:

* preference gap: ``mean_i (s(chosen_i) - s(rejected_i))`` with ``s`` mapped to [0, 1]
  from the scale ``[lo, hi]`` by ``s = (x - lo) / (hi - lo)``; the scale is declared or,
  only when the scores leave no doubt, inferred (:func:`infer_scale`).
* length bias: share of pairs with ``words(chosen) > words(rejected)`` (words are
  whitespace-separated tokens); effect size ``d_z = mean(Δ) / sd(Δ)`` with
  ``Δ = words(chosen) - words(rejected)`` (Cohen's d for paired samples).
* decontamination: ``1 - contaminated examples / all examples``.
* KL: mean per-token KL(π_θ ‖ π_ref), exact over the vocabulary (:func:`per_token_kl`).
* perplexity, capability retention (paired bootstrap CI), win rate (ties half).

The seed skill's public entry points live in :mod:`realign.training_metrics`, which
re-exports these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

#: Score scales ``score_scale="auto"`` can recognise: one is used only when the observed
#: scores leave no doubt (:func:`infer_scale`), and the gate's detail names it.
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
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"score scale '{spec}': LO and HI must be finite numbers")
    if not sep or b <= a:
        raise ValueError(f"score scale '{spec}': need LO < HI")
    return a, b


def infer_scale(lo_seen: float, hi_seen: float) -> tuple[float, float] | None:
    """The scale the observed scores leave no doubt about, else None.

    "Beyond doubt" means: the lowest observed score is the low end and the highest is the
    high end of one of :data:`STANDARD_SCALES` (``lo_seen == lo`` and ``hi_seen == hi``).
    Scores that use both ends of a scale rule out every narrower reading, and every
    other standard scale would leave an end unused. Anything else is a guess and gives
    None: 2-5 may be 1-5 or 1-10; 0.8-1.0 may be 0-1 or 0-10; 1-9 may be 1-10 or 0-10.
    (At most one scale can match: no two standard scales share both ends.)
    """
    for lo, hi in STANDARD_SCALES:
        if lo_seen == lo and hi_seen == hi:
            return (float(lo), float(hi))
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


def perplexity(token_logps: Sequence[Sequence[float]]) -> float | None:
    """PPL = exp(−Σ_i Σ_t log p_it / Σ_i T_i): token-weighted over all sequences.

    None when there are no tokens (the gate is then ``unmeasured``).
    """
    total = sum(len(x) for x in token_logps)
    if total == 0:
        return None
    nll = -sum(float(v) for x in token_logps for v in x) / total
    return math.exp(nll)


# --- KL divergence from logits (stage 3 initial_kl, stage 5/6 kl_divergence) -------------
#
# torch is imported inside the functions: validating data must not need torch.


def _check_kl_inputs(policy_logits: Any, reference_logits: Any, completion_mask: Any) -> None:
    if policy_logits.shape != reference_logits.shape:
        raise ValueError(f"policy logits {tuple(policy_logits.shape)} and reference logits "
                         f"{tuple(reference_logits.shape)} differ in shape")
    if policy_logits.dim() != 3:
        raise ValueError("logits must be shaped batch × positions × vocab")
    if tuple(completion_mask.shape) != tuple(policy_logits.shape[:2]):
        raise ValueError(f"completion mask {tuple(completion_mask.shape)} must be batch × positions "
                         f"{tuple(policy_logits.shape[:2])}")


def per_sequence_kl(policy_logits: Any, reference_logits: Any, completion_mask: Any) -> list[float]:
    """Sequence-level KL(π_θ ‖ π_ref): for each sequence i, Σ_{t: m_it=1} KL_it, in nats.

    KL_it = Σ_v p_θ(v | x_i, y_i,<t) · (log p_θ(v | ·) − log p_ref(v | ·)), exact over the
    whole vocabulary, with log p = log_softmax(logits) computed in float32. ``logits`` are
    batch × positions × vocab tensors whose position t predicts completion token t;
    ``completion_mask`` (batch × positions, bool or 0/1) selects completion tokens, so
    padding and prompt positions contribute nothing. Rows are processed one at a time so
    peak memory is one sequence's positions × vocab, not the whole batch's.
    """
    import torch

    _check_kl_inputs(policy_logits, reference_logits, completion_mask)
    mask = completion_mask.to(torch.bool)
    out: list[float] = []
    with torch.no_grad():
        for i in range(policy_logits.shape[0]):
            m = mask[i].to(policy_logits.device)
            if not bool(m.any()):
                out.append(0.0)
                continue
            lp = torch.log_softmax(policy_logits[i][m].float(), dim=-1)
            lr = torch.log_softmax(reference_logits[i][m.to(reference_logits.device)].float().to(lp.device), dim=-1)
            kl_t = (lp.exp() * (lp - lr)).sum(dim=-1)
            out.append(float(kl_t.double().sum()))
    return out


def per_token_kl(policy_logits: Any, reference_logits: Any, completion_mask: Any) -> float:
    """Mean per-token KL(π_θ ‖ π_ref) over the masked (completion) positions, in nats/token.

    KL = (Σ_i Σ_t m_it · Σ_v p_θ(v|·) (log p_θ(v|·) − log p_ref(v|·))) ÷ Σ_i Σ_t m_it,
    exact over the vocabulary (see :func:`per_sequence_kl`); each completion token weighs
    the same, whatever its sequence's length. This is the number the ``initial_kl`` and
    ``kl_divergence`` gates compare. Raises ``ValueError`` when the mask selects nothing.
    """
    import torch

    sums = per_sequence_kl(policy_logits, reference_logits, completion_mask)
    n = int(completion_mask.to(torch.bool).sum())
    if n == 0:
        raise ValueError("the completion mask selects no tokens: KL is undefined")
    return float(sum(sums) / n)


# ---------------------------------------------------------------------------------------
# Capability retention and win rate (stage 7). Pure functions over per-item results.
# ---------------------------------------------------------------------------------------

#: Largest number of resampled indices drawn at once (rows × items) by the bootstraps.
_BOOT_BLOCK = 1 << 20


def _as_paired(before: Sequence[float] | Any, after: Sequence[float] | Any) -> tuple[Any, Any]:
    """Two float arrays paired by position, or by key when both are mappings (id → score)."""
    from collections.abc import Mapping

    import numpy as np

    if isinstance(before, Mapping) or isinstance(after, Mapping):
        if not (isinstance(before, Mapping) and isinstance(after, Mapping)):
            raise ValueError("before and after must both be sequences or both be id -> score mappings")
        missing_a = [k for k in before if k not in after]
        missing_b = [k for k in after if k not in before]
        if missing_a or missing_b:
            raise ValueError(
                f"items differ between before and after: {len(missing_a)} only before "
                f"(e.g. {missing_a[:3]}), {len(missing_b)} only after (e.g. {missing_b[:3]})")
        keys = list(before)
        b = np.asarray([before[k] for k in keys], dtype=np.float64)
        a = np.asarray([after[k] for k in keys], dtype=np.float64)
    else:
        b = np.asarray(before, dtype=np.float64).ravel()
        a = np.asarray(after, dtype=np.float64).ravel()
        if b.shape != a.shape:
            raise ValueError(f"before has {b.size} items and after has {a.size}: per-item "
                             "scores must be paired item by item")
    if not (np.isfinite(b).all() and np.isfinite(a).all()):
        raise ValueError("per-item scores must be finite numbers")
    return b, a


def paired_bootstrap_ci(before: Sequence[float] | Any, after: Sequence[float] | Any,
                        statistic: Any, *, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[tuple[float, float] | None, int]:
    """Paired percentile bootstrap CI of ``statistic(before_rows, after_rows)``.

    Algorithm (exactly): ``rng = numpy.random.default_rng(seed)``;
    ``idx = rng.integers(0, n, size=(n_boot, n))`` (drawn in consecutive row blocks, the
    same stream); each row resamples the *same* item indices for before and after;
    ``stats = statistic(before[idx], after[idx])`` gives one value per row (NaN where
    undefined, those rows are dropped); the CI is
    ``numpy.percentile(stats, [100·(1−level)/2, 100·(1+level)/2])`` (linear interpolation).

    Returns ``(ci, n_valid)``; ``ci`` is None when no resample gave a defined value.
    """
    import numpy as np

    b, a = _as_paired(before, after)
    n = b.size
    if n == 0 or n_boot < 1:
        return None, 0
    rng = np.random.default_rng(seed)
    block = max(1, _BOOT_BLOCK // n)
    parts = []
    done = 0
    while done < n_boot:
        k = min(block, n_boot - done)
        idx = rng.integers(0, n, size=(k, n))
        parts.append(np.asarray(statistic(b[idx], a[idx]), dtype=np.float64))
        done += k
    stats = np.concatenate(parts)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return None, 0
    alpha = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [alpha, 100.0 - alpha])
    return (float(lo), float(hi)), int(stats.size)


def _ratio_of_means(b_rows: Any, a_rows: Any) -> Any:
    import numpy as np

    bm = b_rows.mean(axis=1)
    am = a_rows.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bm > 0, am / np.where(bm > 0, bm, 1.0), np.nan)


class RetentionResult(BaseModel):
    """Capability retention of one benchmark (docs/quality-thresholds.md#definitions)."""

    retention: float | None
    ci95: tuple[float, float] | None
    before_mean: float | None
    after_mean: float | None
    n: int
    n_boot: int
    n_boot_valid: int = 0
    seed: int
    unmeasured_reason: str | None = None

    @classmethod
    def unmeasured(cls, reason: str, *, n: int, n_boot: int, seed: int,
                   before_mean: float | None = None,
                   after_mean: float | None = None) -> "RetentionResult":
        return cls(retention=None, ci95=None, before_mean=before_mean, after_mean=after_mean,
                   n=n, n_boot=n_boot, seed=seed, unmeasured_reason=reason)


def capability_retention(before: Sequence[float] | Any, after: Sequence[float] | Any, *,
                         n_boot: int = 2000, seed: int = 0) -> RetentionResult:
    """Retention of one benchmark = mean(after) ÷ mean(before), with a paired bootstrap 95% CI.

    ``before`` and ``after`` are per-item scores of the same items: two sequences paired
    by position, or two ``{item_id: score}`` mappings paired by id. Different lengths or
    item ids raise ``ValueError``.

    * ``retention = (Σ_i after_i / n) ÷ (Σ_i before_i / n)``
    * ``ci95``: resample item indices with replacement ``n_boot`` times (the same indices
      for before and after), recompute the ratio of means on each resample, take the 2.5th
      and 97.5th percentiles (:func:`paired_bootstrap_ci`; resamples whose before-mean is
      0 have no ratio and are dropped, ``n_boot_valid`` counts the rest).

    Unmeasured (``retention=None`` with ``unmeasured_reason``) when there are no items
    or mean(before) is 0 (the ratio is undefined).
    """
    b, a = _as_paired(before, after)
    n = int(b.size)
    if n == 0:
        return RetentionResult.unmeasured("no items to compare", n=0, n_boot=n_boot, seed=seed)
    bm, am = float(b.mean()), float(a.mean())
    if bm <= 0:
        return RetentionResult.unmeasured(
            f"the score before is {bm:g}: retention (after ÷ before) is undefined",
            n=n, n_boot=n_boot, seed=seed, before_mean=bm, after_mean=am)
    ci, valid = paired_bootstrap_ci(b, a, _ratio_of_means, n_boot=n_boot, seed=seed)
    return RetentionResult(retention=am / bm, ci95=ci, before_mean=bm, after_mean=am, n=n,
                           n_boot=n_boot, n_boot_valid=valid, seed=seed)


class WinRateResult(BaseModel):
    """Win rate of a new policy against a baseline (docs/quality-thresholds.md#definitions)."""

    win_rate: float | None
    ci95: tuple[float, float] | None
    n: int
    wins: int
    ties: int
    losses: int
    n_boot: int
    seed: int
    unmeasured_reason: str | None = None


_JUDGEMENT = {"win": 1.0, "tie": 0.5, "loss": 0.0, "lose": 0.0}


def win_rate(judgements: Sequence[str | float], *, n_boot: int = 2000, seed: int = 0) -> WinRateResult:
    """Share of prompts where the new policy wins, ties counted half.

    ``judgements[i]`` is ``"win"``/``"tie"``/``"loss"`` (case-insensitive) or the number
    1, 0.5 or 0 for prompt i. ``win_rate = (wins + ties / 2) / n``.
    ``ci95``: percentile bootstrap over prompts of the mean of the per-prompt values
    (1 / 0.5 / 0), ``numpy.random.default_rng(seed)``, ``n_boot`` resamples, 2.5th and
    97.5th percentiles. No judgements → unmeasured.
    """
    import numpy as np

    values: list[float] = []
    for i, j in enumerate(judgements):
        if isinstance(j, str):
            v = _JUDGEMENT.get(j.strip().lower())
        elif isinstance(j, (int, float)) and not isinstance(j, bool) and float(j) in (0.0, 0.5, 1.0):
            v = float(j)
        else:
            v = None
        if v is None:
            raise ValueError(f"judgement {i} is {j!r}: expected 'win', 'tie', 'loss', 1, 0.5 or 0")
        values.append(v)
    x = np.asarray(values, dtype=np.float64)
    wins, ties = int((x == 1.0).sum()), int((x == 0.5).sum())
    n = int(x.size)
    if n == 0:
        return WinRateResult(win_rate=None, ci95=None, n=0, wins=0, ties=0, losses=0,
                             n_boot=n_boot, seed=seed, unmeasured_reason="no judgements")
    ci, _ = paired_bootstrap_ci(x, x, lambda _b, a: a.mean(axis=1), n_boot=n_boot, seed=seed)
    return WinRateResult(win_rate=float(x.mean()), ci95=ci, n=n, wins=wins, ties=ties,
                         losses=n - wins - ties, n_boot=n_boot, seed=seed)
