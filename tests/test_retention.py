"""capability_retention, paired_bootstrap_ci and win_rate on hand-made per-item results."""

from __future__ import annotations

import numpy as np
import pytest

from realign import metrics as tm
from realign.training_metrics import capability_retention, paired_bootstrap_ci, win_rate


def _reference_ci(before, after, n_boot, seed):
    """Straight one-shot reimplementation of the documented algorithm."""
    b = np.asarray(before, float)
    a = np.asarray(after, float)
    idx = np.random.default_rng(seed).integers(0, b.size, size=(n_boot, b.size))
    bm, am = b[idx].mean(1), a[idx].mean(1)
    ratios = am[bm > 0] / bm[bm > 0]
    return tuple(np.percentile(ratios, [2.5, 97.5])), ratios.size


def test_retention_point_estimate_exact():
    r = capability_retention([1, 1, 0, 1], [1, 0, 0, 1])
    assert r.retention == pytest.approx(2 / 3, abs=1e-12)
    assert r.before_mean == 0.75 and r.after_mean == 0.5 and r.n == 4
    assert r.unmeasured_reason is None


def test_retention_above_one_and_fractional_scores():
    r = capability_retention([0.5, 0.25, 0.25], [1.0, 0.5, 0.0])
    assert r.retention == pytest.approx(1.5 / 1.0)


def test_ci_matches_reference_implementation():
    rng = np.random.default_rng(7)
    before = (rng.random(150) < 0.6).astype(float)
    after = np.where(rng.random(150) < 0.85, before, 1 - before)
    r = capability_retention(before, after, n_boot=1000, seed=3)
    ref, valid = _reference_ci(before, after, 1000, 3)
    assert r.ci95 == pytest.approx(ref, abs=1e-12)
    assert r.n_boot_valid == valid == 1000
    assert r.ci95[0] <= r.retention <= r.ci95[1]
    assert r.ci95[0] < r.ci95[1]


def test_ci_same_when_drawn_in_blocks(monkeypatch):
    # The block size must not change the resamples (one RNG stream).
    before = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    after = [1, 0, 0, 1, 0, 1, 1, 0, 0, 1]
    whole = capability_retention(before, after, n_boot=500, seed=11)
    monkeypatch.setattr(tm, "_BOOT_BLOCK", 30)  # 3 rows per block
    blocked = capability_retention(before, after, n_boot=500, seed=11)
    assert whole.ci95 == blocked.ci95
    ref, _ = _reference_ci(before, after, 500, 11)
    assert whole.ci95 == pytest.approx(ref, abs=1e-12)


def test_ci_collapses_when_nothing_changed():
    scores = [1, 0, 1, 1, 0, 0.5]
    r = capability_retention(scores, list(scores), n_boot=300)
    assert r.retention == 1.0
    assert r.ci95 == (1.0, 1.0)


def test_ci_is_deterministic_per_seed_and_varies_across_seeds():
    before = [1, 1, 0, 1, 1, 0, 1, 1] * 5 + [0.5, 0.25]
    after = [1, 0, 0, 1, 1, 0, 0, 1] * 5 + [0.25, 0.0]
    a = capability_retention(before, after, seed=1)
    assert a == capability_retention(before, after, seed=1)
    assert a.ci95 != capability_retention(before, after, seed=2).ci95
    # Ratio of means of 0/1 items with after ≤ before item-wise is in [0, 1].
    assert 0.0 <= a.ci95[0] <= a.retention <= a.ci95[1] <= 1.0


def test_pairing_by_item_id_ignores_order():
    before = {"q1": 1.0, "q2": 1.0, "q3": 0.0, "q4": 1.0}
    after = {"q4": 1.0, "q3": 0.0, "q2": 0.0, "q1": 1.0}
    r = capability_retention(before, after, n_boot=200)
    assert r.retention == pytest.approx(2 / 3)
    same = capability_retention([1, 1, 0, 1], [1, 0, 0, 1], n_boot=200)
    assert r.ci95 == same.ci95


def test_mismatched_items_are_errors():
    with pytest.raises(ValueError, match="paired item by item"):
        capability_retention([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="only before"):
        capability_retention({"a": 1.0, "b": 0.0}, {"a": 1.0, "c": 0.0})
    with pytest.raises(ValueError, match="both"):
        capability_retention({"a": 1.0}, [1.0])


def test_zero_before_is_unmeasured_with_reason():
    r = capability_retention([0, 0, 0], [1, 0, 0])
    assert r.retention is None and r.ci95 is None
    assert "undefined" in r.unmeasured_reason
    assert capability_retention([], []).unmeasured_reason == "no items to compare"


def test_resamples_with_zero_before_are_dropped():
    r = capability_retention([1, 0, 0, 0], [1, 0, 0, 0], n_boot=400, seed=0)
    ref, valid = _reference_ci([1, 0, 0, 0], [1, 0, 0, 0], 400, 0)
    # P(no copy of item 0 in a resample) = (3/4)^4 ≈ 0.32 → about a third dropped.
    assert r.n_boot_valid == valid and 200 < valid < 330
    assert r.ci95 == (1.0, 1.0) == ref


def test_paired_bootstrap_ci_generic_statistic():
    diff = lambda b, a: a.mean(1) - b.mean(1)  # noqa: E731
    ci, valid = paired_bootstrap_ci([0, 0, 0, 0], [1, 1, 1, 1], diff, n_boot=50)
    assert ci == (1.0, 1.0) and valid == 50
    ci, _ = paired_bootstrap_ci([0, 1, 0, 1], [1, 1, 1, 1], diff, n_boot=500, level=0.9)
    assert 0.0 <= ci[0] < 0.5 < ci[1] <= 1.0


def test_win_rate_ties_count_half():
    r = win_rate(["win", "tie", "loss", "win"])
    assert r.win_rate == pytest.approx(0.625)
    assert (r.wins, r.ties, r.losses, r.n) == (2, 1, 1, 4)
    assert r.ci95[0] <= 0.625 <= r.ci95[1]
    assert win_rate([1, 0.5, 0, 0]).win_rate == pytest.approx(0.375)
    assert win_rate(["TIE"] * 5).ci95 == (0.5, 0.5)


def test_win_rate_ci_matches_reference():
    j = ["win"] * 30 + ["tie"] * 10 + ["loss"] * 20
    r = win_rate(j, n_boot=800, seed=5)
    x = np.array([1.0] * 30 + [0.5] * 10 + [0.0] * 20)
    idx = np.random.default_rng(5).integers(0, x.size, size=(800, x.size))
    assert r.ci95 == pytest.approx(tuple(np.percentile(x[idx].mean(1), [2.5, 97.5])))
    assert r.win_rate == pytest.approx(35 / 60)


def test_win_rate_bad_input_and_empty():
    with pytest.raises(ValueError, match="judgement 1"):
        win_rate(["win", "draw"])
    with pytest.raises(ValueError):
        win_rate([0.7])
    e = win_rate([])
    assert e.win_rate is None and e.unmeasured_reason == "no judgements"


def test_retention_by_suite_names_every_suite_and_never_raises():
    from realign.evaluation import BenchmarkResults, ItemScore, SuiteResult, retention_by_suite

    def res(suites):
        return BenchmarkResults(
            suites={k: SuiteResult(suite=k, metric="acc,none", score=float(np.mean([s for _, s in v])) if v else None,
                                   n=len(v), items=[ItemScore(id=i, score=s) for i, s in v],
                                   shipped=True, apply_chat_template=False) for k, v in suites.items()},
            batch_size=1, device="cpu", seconds=0.0, lm_eval_version="test")

    before = res({"same": [("a", 1), ("b", 0)], "gone": [("a", 1)], "moved": [("a", 1), ("b", 1)],
                  "empty": []})
    after = res({"same": [("b", 0), ("a", 1)], "moved": [("a", 1), ("c", 1)], "empty": [("a", 1)],
                 "new": [("a", 1)]})
    r = retention_by_suite(before, after, n_boot=50)
    assert list(r) == ["same", "gone", "moved", "empty", "new"]
    assert r["same"].retention == 1.0
    assert "not in the evaluated model's results" in r["gone"].unmeasured_reason
    assert "items differ (1 only before, 1 only after)" in r["moved"].unmeasured_reason
    assert "no per-item scores before" in r["empty"].unmeasured_reason
    assert "not in the baseline's results" in r["new"].unmeasured_reason
    assert all(r[k].retention is None for k in ("gone", "moved", "empty", "new"))
