"""Stage 4 (reward model), the reward-model preference gap and their statistics.

Integration tests train a reward model on a tiny random llama with a planted rule: the
chosen response always contains the word "banana", the rejected one never does, and
lengths are balanced (chosen longer, shorter or equal a third of the time each), so a
length-only predictor sits near 0.5 while the reward model can reach ~1.0.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from realign.reward import (
    accuracy_by_length,
    length_baseline_accuracy,
    pair_accuracy,
    quantiles,
    reward_gap,
    wilson_interval,
)

WORDS = ("the a of and to in is it that was for on are with as his they be at one have this "
         "from or had by word but what some we can out other were all there when up use your "
         "how said an each she which do their time if will way about many then them write "
         "would like so these her long make thing see him two has look more day could go come "
         "did number sound no most people my over know water than call first who may down "
         "side been now find").split()


# ------------------------------------------------------------------------- pure functions


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(10, 10)  # stays inside [0, 1], not degenerate at p = 1
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_accuracy_and_length_baseline():
    assert pair_accuracy([1.0, 2.0, 0.5], [0.0, 2.0, 1.0]) == pytest.approx(1 / 3)  # tie is wrong
    # longer chosen right, shorter wrong, tie half
    assert length_baseline_accuracy([5, 3, 4], [3, 5, 4]) == pytest.approx(0.5)
    assert length_baseline_accuracy([], []) is None


def test_reward_gap_is_tanh_half_margin_and_lists_negatives():
    g = reward_gap([2.0, 0.0, 1.0], [0.0, 2.0, 1.0], ids=[11, 12, 13])
    assert g.gap == pytest.approx((math.tanh(1) + math.tanh(-1) + 0) / 3)
    assert g.negative == [12]
    # shift invariance: adding a constant to every reward changes nothing
    g2 = reward_gap([12.0, 10.0, 11.0], [10.0, 12.0, 11.0], ids=[11, 12, 13])
    assert g2.gap == pytest.approx(g.gap)
    # s(c) - s(r) with s = Bradley-Terry probability
    d = 0.7
    s_c = 1 / (1 + math.exp(-d))
    assert reward_gap([d], [0.0]).gap == pytest.approx(s_c - (1 - s_c))
    assert reward_gap([], []).gap is None


def test_length_buckets_and_quantiles():
    rc, rr = [1, 1, 0, 0], [0, 0, 1, 1]
    cw, rw = [5, 5, 2, 2], [2, 2, 5, 5]
    b = accuracy_by_length(rc, rr, cw, rw)
    assert b["by_longer"]["chosen_longer"] == {"n": 2, "accuracy": 1.0}
    assert b["by_longer"]["rejected_longer"] == {"n": 2, "accuracy": 0.0}
    assert b["by_longer"]["same_length"] == {"n": 0, "accuracy": None}
    assert sum(x["n"] for x in b["by_pair_length"]) == 4
    q = quantiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert q["p50"] == 3.0 and q["min"] == 1.0 and q["max"] == 5.0 and q["mean"] == 3.0


# ------------------------------------------------------------------------- tiny-model runs


def planted_pairs(n: int, seed: int, flip: set[int] = frozenset()) -> list[dict]:
    """Pairs whose chosen contains 'banana'; indices in ``flip`` swap chosen and rejected."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(6, 14)
        c = [rng.choice(WORDS) for _ in range(k)]
        c.insert(rng.randint(0, k), "banana")
        r = [rng.choice(WORDS) for _ in range(k + 1 + rng.choice([-2, 0, 2]))]
        c_text, r_text = " ".join(c), " ".join(r)
        if i in flip:
            c_text, r_text = r_text, c_text
        rows.append({"prompt": f"Say something about item {seed}-{i}.", "chosen": c_text,
                     "rejected": r_text})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a shared, oversubscribed CPU two spinning OpenMP threads make
    these tiny models ~50x slower (measured); restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def stage4(tmp_path_factory, tiny_model_path, one_thread):
    """Stages 2 and 4 run once on the planted data."""
    from realign.config import RunConfig
    from realign.pipeline import create_run, run_stages

    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "pairs.jsonl", planted_pairs(160, 0))
    cfg = RunConfig(model=str(tiny_model_path), data=str(data), output_dir=str(tmp / "runs"),
                    run_id="rm", stages=["preference_data", "reward_model"],
                    thresholds={"min_pairs": 50},
                    heldout={"fraction": 0.25, "min_pairs": 16, "max_pairs": 64},
                    reward={"max_steps": 15, "learning_rate": 3e-3, "batch_size": 8,
                            "max_length": 96})
    status = run_stages(create_run(cfg))
    return status


def test_reward_model_learns_planted_rule(stage4):
    by = {s.name: s for s in stage4.stages}
    assert [s.name for s in stage4.stages] == ["preference_data", "reward_model"]
    v2, v4 = by["preference_data"].verdict, by["reward_model"].verdict
    assert v2.gate("preference_gap").status == "unmeasured"  # no explicit scores
    acc = v4.gate("reward_accuracy")
    assert acc.status == "pass" and acc.value >= 0.9, acc
    lo, hi = acc.ci95
    assert lo < acc.value <= hi
    n = v4.findings["heldout_pairs"]
    assert n == 40
    assert acc.value * n == pytest.approx(round(acc.value * n))  # a share of 40 pairs
    # the length-only baseline is reported and is far below: the rule is not length
    base = v4.findings["length_baseline_accuracy"]
    assert 0.2 <= base <= 0.8 and base < acc.value - 0.1
    assert v4.gate("reward_overfit").value == pytest.approx(
        v4.findings["train_accuracy"] - v4.findings["heldout_accuracy"])
    buckets = v4.findings["length_buckets"]["by_longer"]
    assert sum(b["n"] for b in buckets.values()) == n
    assert v4.findings["margin_quantiles"]["p50"] > 0
    # stage 2 had no scores: stage 4 measured the gap with the reward model
    gap = v4.gate("preference_gap")
    assert gap.status == "pass" and 0 < gap.value < 1 and "stage 4" in gap.detail
    assert v4.findings["preference_gap_source"] == "stage 4 reward model"
    assert v4.status == "pass"
    assert stage4.state == "incomplete"  # stage 2 stays incomplete (decontamination unmeasured)


def test_saved_reward_model_scores_like_the_verdict(stage4):
    from realign.reward import load_reward_model, score_pairs
    from realign.fileio import read_jsonl

    v4 = next(s.verdict for s in stage4.stages if s.name == "reward_model")
    held = read_jsonl(Path(v4.artifacts["reward_model"]).parent.parent / "2-preference_data"
                      / "heldout.jsonl")
    model, tok = load_reward_model(v4.artifacts["reward_model"], device="cpu")
    rc, rr = score_pairs(model, tok, held, batch_size=3, max_length=96)
    assert pair_accuracy(rc, rr) == pytest.approx(v4.gate("reward_accuracy").value)
    # batching does not change a score
    rc1, _ = score_pairs(model, tok, held[:5], batch_size=1, max_length=96)
    assert rc1 == pytest.approx(rc[:5], abs=1e-4)


def test_gap_unmeasured_without_scores_and_measured_with_reward_model(stage4, tmp_path):
    from realign.reward import apply_reward_gap
    from realign.validation import validate_file

    v4 = next(s.verdict for s in stage4.stages if s.name == "reward_model")
    flip = {3, 7}
    rows = planted_pairs(30, 5, flip=flip)
    rows.append(dict(rows[0]))  # a duplicate: not usable, not scored
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    v = validate_file(data)
    assert v.gate("preference_gap").status == "unmeasured"
    out = tmp_path / "kept.jsonl"
    v = apply_reward_gap(v, data, v4.artifacts["reward_model"], drop_negative=out, device="cpu")
    g = v.gate("preference_gap")
    assert g.status in ("pass", "fail") and g.value is not None and g.value > 0
    f = v.findings["reward_model"]
    assert f["scored_pairs"] == 30 and f["used_for_gate"]
    # flipped pairs (rejected holds the marker) have a negative gap, by line number
    assert {i + 1 for i in flip} <= set(f["negative_gap"])
    kept = out.read_text().splitlines()
    assert len(kept) == len(rows) - len(f["negative_gap"])
    for ln in f["negative_gap"]:
        assert json.dumps(rows[ln - 1]) not in kept


def test_explicit_scores_keep_precedence(stage4, tmp_path):
    from realign.reward import apply_reward_gap
    from realign.validation import validate_file

    v4 = next(s.verdict for s in stage4.stages if s.name == "reward_model")
    rows = [dict(r, score_chosen=8, score_rejected=2) for r in planted_pairs(12, 9)]
    data = write_jsonl(tmp_path / "s.jsonl", rows)
    v = apply_reward_gap(validate_file(data, score_scale="1-10"), data, v4.artifacts["reward_model"], device="cpu")
    assert v.gate("preference_gap").value == pytest.approx(6 / 9)
    assert v.findings["reward_model"]["used_for_gate"] is False


def test_validate_cli_reward_model(stage4, tmp_path, tiny_model_path):
    from typer.testing import CliRunner

    from realign.cli import app

    v4 = next(s.verdict for s in stage4.stages if s.name == "reward_model")
    rm = v4.artifacts["reward_model"]
    data = write_jsonl(tmp_path / "p.jsonl", planted_pairs(20, 7, flip={0}))
    out = tmp_path / "kept.jsonl"
    runner = CliRunner()
    r = runner.invoke(app, ["validate", str(data), "--reward-model", rm,
                            "--drop-negative-gap", str(out), "--json",
                            "--threshold", "min_pairs=10"])
    assert r.exit_code == 3, r.output  # decontamination unmeasured (no --eval)
    v = json.loads(r.stdout)
    gap = next(g for g in v["gates"] if g["name"] == "preference_gap")
    assert gap["status"] == "pass" and "reward model" in gap["detail"]
    assert 1 in v["findings"]["reward_model"]["negative_gap"]
    assert len(out.read_text().splitlines()) == 20 - len(v["findings"]["reward_model"]["negative_gap"])
    # usage errors: exit 2, one line, no traceback
    r = runner.invoke(app, ["validate", str(data), "--drop-negative-gap", str(out)])
    assert r.exit_code == 2 and "--reward-model" in r.output
    for not_rm in (tmp_path, tiny_model_path):  # not a model; a causal LM
        r = runner.invoke(app, ["validate", str(data), "--reward-model", str(not_rm)])
        assert r.exit_code == 2 and "reward model" in r.output and "Traceback" not in r.output


def test_lora_reward_model_is_merged_and_loads(tiny_model_path, tmp_path, one_thread):
    from realign.reward import load_reward_model, save_reward_model, score_pairs, train_reward_model

    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in planted_pairs(8, 3)]
    model, tok = train_reward_model(
        tiny_model_path, rows, output_dir=tmp_path / "ck", learning_rate=1e-3, max_steps=2,
        num_epochs=1, batch_size=4, gradient_accumulation_steps=1, max_length=64, seed=0,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, device="cpu")
    assert not hasattr(model, "peft_config")  # adapters merged: a plain model is saved
    before = score_pairs(model, tok, rows, max_length=64)
    path = save_reward_model(model, tok, tmp_path / "rm")
    loaded, tok2 = load_reward_model(path, device="cpu")
    after = score_pairs(loaded, tok2, rows, max_length=64)
    assert after[0] + after[1] == pytest.approx(before[0] + before[1], abs=1e-4)
