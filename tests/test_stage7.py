"""Stage 7 (evaluation): verifier, retention gates, decision; a tiny-model run through the
pipeline with a planted regression, rollback and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from realign.evaluation import BenchmarkResults, ItemScore, SuiteResult
from realign.gates import PRESETS, Thresholds
from realign.assessment import decide, mean_retention_ci, retention_gates, winrate_prompts
from realign.verifiers import final_number, judge_by_reward, judge_by_verifier, verify_answer

ROOT = Path(__file__).resolve().parents[1]
STD = PRESETS["standard"]


# ----------------------------------------------------------------------------- unit


@pytest.mark.parametrize("response,reference,ok", [
    ("89 - 44 = 45", "45", True),
    ("The answer is 45.", "45", True),
    ("45, no wait, 46", "45", False),
    ("It is 1,200 meters", "1200", True),
    ("1200.0", "1,200", True),
    ("about 3/4", "0.75", True),
    ("no number here", "7", False),
    ("The capital of Egypt is Cairo.", "Cairo", True),
    ("Cairorama", "Cairo", False),
    ("it is NEW DELHI!", "New Delhi", True),
    ("anything", "", False),
    # issue 13.11: the final answer is compared, never "the reference occurs somewhere"
    ("It is not Paris. Maybe Tokyo", "Paris", False),
    ("Paris is the capital of France, not Tokyo", "Paris", False),
    ("The answer is not 45.", "45", False),
    ("Answer: Paris", "Paris", True),
])
def test_verify_answer(response, reference, ok):
    assert verify_answer(response, reference) is ok


def test_final_number_exact():
    from fractions import Fraction

    assert final_number("x -3 then 2.5") == Fraction(5, 2)
    assert final_number("none") is None


def test_judges():
    assert judge_by_verifier("45", "44", "45") == "win"
    assert judge_by_verifier("44", "45", "45") == "loss"
    assert judge_by_verifier("45", "45.0", "45") == "tie"  # both right
    assert judge_by_verifier("1", "2", "45") == "tie"  # both wrong
    assert judge_by_reward(1.0, 0.5, False) == "win"
    assert judge_by_reward(0.1, 0.5, False) == "loss"
    assert judge_by_reward(1.0, 0.5, True) == "tie"  # same text
    assert judge_by_reward(0.5, 0.5, False) == "tie"


def _results(scores: dict[str, list[float]]) -> BenchmarkResults:
    return BenchmarkResults(
        suites={k: SuiteResult(suite=k, metric="acc,none", score=float(np.mean(v)) if v else None,
                               n=len(v), items=[ItemScore(id=f"{k}-{i}", score=s) for i, s in enumerate(v)],
                               shipped=True, apply_chat_template=False) for k, v in scores.items()},
        batch_size=16, device="cpu", seconds=0.0, lm_eval_version="test")


def test_retention_gates_exact_values():
    before = _results({"a": [1, 1, 1, 1], "b": [1, 1, 0, 0]})
    after = _results({"a": [1, 1, 1, 0], "b": [1, 1, 0, 0]})
    gates, table = retention_gates(Thresholds(), before, after, n_boot=500, seed=1)
    mean, worst = gates
    assert table["a"].retention == pytest.approx(0.75) and table["b"].retention == pytest.approx(1.0)
    assert mean.name == "capability_retention" and mean.value == pytest.approx(0.875)
    assert 0.875 < STD["capability_retention"] and mean.status == "fail"
    assert worst.value == pytest.approx(0.75) and worst.status == "fail"
    assert worst.ci95 == table["a"].ci95 and "a:" in worst.detail
    lo, hi = mean.ci95
    assert lo <= 0.875 <= hi


def _with(results: BenchmarkResults, name: str, suite: SuiteResult) -> BenchmarkResults:
    return results.model_copy(update={"suites": {**results.suites, name: suite}})


def _suite(name: str, scores: list[float], ids: list[str] | None = None) -> SuiteResult:
    ids = ids or [f"{name}-{i}" for i in range(len(scores))]
    return SuiteResult(suite=name, metric="acc,none", score=float(np.mean(scores)) if scores else None,
                       n=len(scores), items=[ItemScore(id=i, score=s) for i, s in zip(ids, scores)],
                       shipped=True, apply_chat_template=False)


# Each case adds one benchmark whose retention is undefined to two that retain fully
# (retention 1.0: both gates would pass on them alone).
@pytest.mark.parametrize("case,reason", [
    ("zero_baseline", "undefined"),
    ("missing_from_policy", "not in the evaluated model's results"),
    ("missing_from_baseline", "not in the baseline's results"),
    ("no_items_before", "no per-item scores"),
    ("no_items_after", "no per-item scores"),
    ("different_items", "the items differ"),
])
def test_retention_gates_never_pass_on_a_subset(case, reason):
    good = {"a": [1, 1, 1, 0], "b": [1, 0, 1, 1]}
    before, after = _results(good), _results(good)
    ok, _ = retention_gates(Thresholds(), before, after, n_boot=50, seed=0)
    assert [g.status for g in ok] == ["pass", "pass"]  # the rest alone would pass
    if case == "zero_baseline":
        before, after = _with(before, "c", _suite("c", [0, 0, 0])), _with(after, "c", _suite("c", [1, 0, 0]))
    elif case == "missing_from_policy":
        before = _with(before, "c", _suite("c", [1, 1, 0]))
    elif case == "missing_from_baseline":
        after = _with(after, "c", _suite("c", [1, 1, 0]))
    elif case == "no_items_before":
        before = _with(before, "c", _suite("c", [1, 1, 0]).model_copy(update={"items": []}))
        after = _with(after, "c", _suite("c", [1, 1, 0]))
    elif case == "no_items_after":
        before = _with(before, "c", _suite("c", [1, 1, 0]))
        after = _with(after, "c", _suite("c", [1, 1, 0]).model_copy(update={"items": []}))
    else:
        before = _with(before, "c", _suite("c", [1, 1, 0], ["x", "y", "z"]))
        after = _with(after, "c", _suite("c", [1, 1, 0], ["x", "y", "w"]))
    gates, table = retention_gates(Thresholds(), before, after, n_boot=50, seed=0)
    assert [g.name for g in gates] == ["capability_retention", "worst_benchmark_retention"]
    for g in gates:
        assert g.status == "unmeasured" and g.value is None
        assert "c:" in g.detail and reason in g.detail  # the benchmark and why, by name
        assert "a 1.000" in g.detail and "b 1.000" in g.detail  # what was measured is shown
    assert table["c"].retention is None and reason in table["c"].unmeasured_reason
    assert table["a"].retention == 1.0 and table["b"].retention == 1.0


def test_mean_retention_ci_matches_reference():
    rng = np.random.default_rng(0)
    b1, a1 = (rng.random(40) < 0.7).astype(float), (rng.random(40) < 0.6).astype(float)
    b2, a2 = (rng.random(30) < 0.5).astype(float), (rng.random(30) < 0.5).astype(float)
    ci = mean_retention_ci([(b1, a1), (b2, a2)], n_boot=300, seed=4)
    r = np.random.default_rng(4)
    cols = []
    for b, a in ((b1, a1), (b2, a2)):
        idx = r.integers(0, b.size, size=(300, b.size))
        bm, am = b[idx].mean(1), a[idx].mean(1)
        cols.append(np.where(bm > 0, am / np.where(bm > 0, bm, 1), np.nan))
    m = np.mean(cols, axis=0)
    ref = np.percentile(m[np.isfinite(m)], [2.5, 97.5])
    assert ci == pytest.approx(tuple(ref), abs=1e-12)


def test_no_defined_retention_is_unmeasured():
    before = _results({"zero": [0, 0]})
    after = _results({"zero": [1, 1]})
    gates, _ = retention_gates(Thresholds(), before, after, n_boot=10, seed=0)
    assert [g.status for g in gates] == ["unmeasured", "unmeasured"]
    empty = _results({})
    gates, table = retention_gates(Thresholds(), empty, empty, n_boot=10, seed=0)
    assert [g.status for g in gates] == ["unmeasured", "unmeasured"] and table == {}


def test_decide():
    t = Thresholds()
    ok = [t.evaluate("capability_retention", 0.99), t.evaluate("win_rate", 0.7)]
    assert decide(ok)[0] == "deploy"
    bad = ok + [t.evaluate("worst_benchmark_retention", 0.5, detail="arith")]
    d, reasons = decide(bad)
    assert d == "reject" and len(reasons) == 1 and "worst_benchmark_retention 0.5" in reasons[0]
    d, reasons = decide(ok + [t.evaluate("worst_benchmark_retention", None, detail="why")])
    assert d == "reject" and "unmeasured" in reasons[0]  # unmeasured never deploys
    d, reasons = decide([t.evaluate("win_rate", None, detail="unmeasured: no judge")])
    assert reasons == ["win_rate unmeasured (needs > 0.5) unmeasured: no judge"]


def test_winrate_prompts_order_and_dedupe():
    rows = [{"prompt": [{"role": "user", "content": f"p{i % 5}"}], "reference": None if i else "7"}
            for i in range(8)]
    got = winrate_prompts(rows, probe_size=2, limit=10)
    # outside the probe first (rows 2..7 -> p2, p3, p4, p0, p1), then the probe rows (p0, p1: seen)
    assert [g["prompt"][0]["content"] for g in got] == ["p2", "p3", "p4", "p0", "p1"]
    assert got[3]["reference"] == "7"  # a duplicate's reference is kept
    assert [g["in_probe"] for g in got] == [False] * 5
    assert len(winrate_prompts(rows, probe_size=2, limit=2)) == 2


@pytest.mark.needs("torch")
def test_baseline_response_cache_keys_every_input(tmp_path):
    """Stage 7's stored baseline responses are reused only for the same prompts, model
    (path and digest), token cap, batch size, device, dtype and versions."""
    from realign.assessment import baseline_cache_key, baseline_responses
    from realign.config import RunConfig
    from realign.fileio import write_json_atomic, write_jsonl_atomic
    from realign.gates import make_verdict
    from realign.pipeline import create_run
    from realign.stages.context import RunContext

    class Backend:
        def __init__(self):
            self.loaded: list[str] = []

        def load(self, model, device=None):
            self.loaded.append(str(model))
            return object()

        def generate(self, handle, prompts, *, max_new_tokens, batch_size):
            return [f"fresh {batch_size}"] * len(prompts)

    t = Thresholds()
    (tmp_path / "base").mkdir()
    run = create_run(RunConfig(data=str(tmp_path / "x.jsonl"), model=str(tmp_path / "base"),
                               output_dir=str(tmp_path / "runs"), run_id="cache"))

    def stage1(digest: str) -> None:
        write_json_atomic(run / "stages" / "1-sft_baseline" / "verdict.json", make_verdict(
            "sft_baseline", [], t, artifacts={"model": str(tmp_path / "base"), "model_digest": digest}))

    def ctx(**evaluation) -> RunContext:
        from realign.pipeline import load_run_config

        cfg = load_run_config(run)
        cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update=evaluation)})
        return RunContext(config=cfg, run_dir=run, thresholds=t)

    stage1("sha256:aaa")
    prompts = [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    key = baseline_cache_key(ctx())
    assert key["model"] == str(tmp_path / "base") and key["model_digest"] == "sha256:aaa"
    assert {"max_new_tokens", "batch_size", "device", "dtype", "torch", "transformers"} <= set(key)
    write_jsonl_atomic(run / "stages" / "7-evaluation" / "winrate.jsonl",
                       [{"prompt": p["prompt"], "baseline": f"cached {i}", "baseline_key": key}
                        for i, p in enumerate(prompts)])
    b = Backend()
    assert baseline_responses(ctx(), prompts, backend=b) == ["cached 0", "cached 1", "cached 2"]
    assert b.loaded == []
    # a different batch size, token cap, model digest or prompt list: generated again
    assert baseline_responses(ctx(batch_size=3), prompts, backend=b) == ["fresh 3"] * 3
    assert baseline_responses(ctx(max_new_tokens=5), prompts, backend=b)[0].startswith("fresh")
    assert baseline_responses(ctx(), prompts[:2], backend=b)[0].startswith("fresh")
    stage1("sha256:bbb")  # stage 1 rerun: another model behind the same path
    assert baseline_responses(ctx(), prompts, backend=b)[0].startswith("fresh")
    assert len(b.loaded) == 4


# ----------------------------------------------------------------------------- tiny model


def _config(tmp: Path, model: Path, **changes):
    from realign.config import RunConfig

    rows = [json.loads(x) for x in (ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:300]]
    for r in rows:  # no reference answers: this run exercises the reward-model judge
        r.pop("reference", None)
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(
        model=str(model), data=str(data), eval_sets=[str(ROOT / "examples" / "eval.jsonl")],
        output_dir=str(tmp / "runs"), run_id="s7",
        stages=["sft_baseline", "preference_data", "reference_init", "reward_model", "dpo",
                "evaluation"],  # stage 6: tests/test_iterative.py
        thresholds={"min_pairs": 100, "baseline_perplexity": 1e9, "kl_divergence": 10},
        sft={"eval_responses": 8, "benchmarks": ["realign_knowledge"], "benchmark_limit": 12},
        reward={"max_steps": 4, "batch_size": 4, "max_length": 64},
        dpo={"max_steps": 8, "batch_size": 2, "learning_rate": 1e-3, "max_length": 48, "save_every": 4},
        kl_monitor={"every": 4, "probe_size": 4, "batch_size": 4},
        evaluation={"win_rate_prompts": 10, "max_new_tokens": 12},
        allow_gate_failures=["reward_accuracy", "reward_overfit", "reward_margin", "preference_gap",
                             "win_rate"])
    base.update(changes)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_path, one_thread):
    """Stages 1-5 and 7 on the tiny model (win_rate failures allowed so the run completes)."""
    import realign.backends.trl_train as tt
    from realign.pipeline import create_run, run_stages

    tmp = tmp_path_factory.mktemp("s7")
    old = tt.ref_cache_dir
    tt.ref_cache_dir = lambda: tmp  # type: ignore[assignment]
    try:
        status = run_stages(create_run(_config(tmp, tiny_model_path)))
    finally:
        tt.ref_cache_dir = old  # type: ignore[assignment]
    return Path(status.run_dir), status


@pytest.mark.integration
def test_stage7_gates_on_tiny_run(tiny_run):
    from realign.evaluation import BenchmarkResults as BR

    run_dir, status = tiny_run
    v = next(s.verdict for s in status.stages if s.name == "evaluation")
    assert [g.name for g in v.gates] == ["capability_retention", "worst_benchmark_retention",
                                         "win_rate", "length_ratio", "prompt_echo",
                                         "distinct_ratio"]
    # retention recomputed from the two files on disk
    before = BR.model_validate_json((run_dir / "stages/1-sft_baseline/baseline_benchmarks.json").read_text())
    after = BR.model_validate_json(Path(v.artifacts["benchmarks"]).read_text())
    b, a = before.suites["realign_knowledge"], after.suites["realign_knowledge"]
    assert [i.id for i in a.items] == [i.id for i in b.items] and a.n == 12  # same items
    assert b.score > 0  # the tiny model is above 0 on these items: retention is defined
    assert v.gate("worst_benchmark_retention").value == pytest.approx(a.score / b.score)
    assert v.gate("capability_retention").value == pytest.approx(a.score / b.score)  # one benchmark
    # win_rate fails (near-identical greedy answers tie: 0.5 is not > 0.5) and is allowed:
    # the run is not `passed`
    assert v.gate("win_rate").status == "fail"
    assert status.state == "passed_with_failures" and "evaluation:win_rate" in status.allowed_failures
    # its remedy names this run (the pipeline gives the stages the run's context)
    assert f"`realign rollback {run_dir}`" in v.gate("win_rate").remedy
    # win rate: one judgement per prompt by the stage-4 reward model (no references here)
    recs = [json.loads(x) for x in Path(v.artifacts["winrate"]).read_text().splitlines()]
    assert 0 < len(recs) <= 10 and {r["judge"] for r in recs} == {"reward_model"}
    vals = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    assert v.gate("win_rate").value == pytest.approx(np.mean([vals[r["judgement"]] for r in recs]))
    for r in recs:
        if r["policy"].strip() != r["baseline"].strip():
            assert r["judgement"] == judge_by_reward(r["r_policy"], r["r_baseline"], False)
    wr = v.findings["win_rate"]
    assert wr["wins"] + wr["ties"] + wr["losses"] == len(recs)
    assert v.findings["decision"] == decide(v.gates)[0]
    # the report holds every gate of every stage that ran
    html = (run_dir / "report.html").read_text()
    md = (run_dir / "report.md").read_text()
    for s in status.stages:
        for g in s.verdict.gates:
            assert f"<code>{g.name}</code>" in html and f"`{g.name}`" in md
    assert html.count("<svg") >= 5  # loss, KL, margins, accuracies, retention (+ stage-4 loss)


@pytest.mark.integration
def test_planted_regression_is_rejected_and_rolled_back(tiny_run, tmp_path, one_thread):
    """The stage-1 baseline is replaced by per-item results of a perfect model: the policy
    (scoring near chance) has regressed; stage 7 rejects it and the pipeline rolls back."""
    from realign.pipeline import run_stages
    from realign.rollback import deployed_model

    src, _ = tiny_run
    run_dir = tmp_path / "planted"
    shutil.copytree(src, run_dir)
    # point the copied verdicts at the copy (artifacts hold absolute paths)
    for vp in run_dir.glob("stages/*/verdict.json"):
        vp.write_text(vp.read_text().replace(str(src), str(run_dir)))
    run = json.loads((run_dir / "run.json").read_text())
    run["config"]["evaluation"]["rollback_on_regression"] = True
    run["config"]["allow_gate_failures"].remove("win_rate")
    (run_dir / "run.json").write_text(json.dumps(run))
    for p in (run_dir / "deployed_model.json", run_dir / "rollback.json"):
        p.unlink(missing_ok=True)
    bpath = run_dir / "stages/1-sft_baseline/baseline_benchmarks.json"
    base = json.loads(bpath.read_text())
    for item in base["suites"]["realign_knowledge"]["items"]:
        item["score"] = 1.0
    base["suites"]["realign_knowledge"]["score"] = 1.0
    bpath.write_text(json.dumps(base))

    status = run_stages(run_dir, stages=["evaluation"], force=True)
    assert status.state == "failed"
    v = next(s.verdict for s in status.stages if s.name == "evaluation")
    worst = v.gate("worst_benchmark_retention")
    assert worst.status == "fail" and worst.value < STD["worst_benchmark_retention"]
    assert v.findings["decision"] == "reject"
    assert any("worst_benchmark_retention" in r for r in v.findings["reasons"])
    # rollback ran in the pipeline: checkpoints re-evaluated, then the baseline restored
    rb = json.loads((run_dir / "rollback.json").read_text())
    assert rb["trigger"] == "pipeline" and rb["restored"]["source"] == "baseline"
    names = [c["candidate"]["name"] for c in rb["evaluated"]]
    assert names[-1] == "baseline"
    dpo = next(s.verdict for s in status.stages if s.name == "dpo")
    selected = dpo.findings["selected_step"]
    assert f"dpo-step-{selected}" not in names  # the rejected model is not a candidate
    for c in rb["evaluated"][:-1]:  # on-disk checkpoints that passed KL, re-evaluated
        assert c["candidate"]["source"] == "dpo_checkpoint" and not c["passed"]
        assert (Path(c["candidate"]["path"]) / "model.safetensors").exists()
    base_eval = rb["evaluated"][-1]
    assert Path(base_eval["benchmarks"]).is_file()  # the baseline was re-evaluated
    assert deployed_model(run_dir)["model"] == rb["restored"]["path"]
    assert Path(dpo.artifacts["model"]).is_dir()  # nothing deleted
    # the restored baseline is the user's folder: its model card goes into the run directory
    from huggingface_hub import ModelCard

    assert rb["model_card"] == str(run_dir / "model_card.md")
    card = ModelCard.load(run_dir / "model_card.md")
    assert "| stage | gate | value | threshold | status | 95% CI |" in card.text
    assert "`worst_benchmark_retention`" in card.text and "| pipeline |" in card.text
    assert not (Path(rb["restored"]["path"]) / "README.md").exists()
    # the failed gate's remedy names the checkpoint rollback tries first (or the baseline)
    assert "`realign rollback " in worst.remedy and "first candidate:" in worst.remedy
    # a second rollback from the CLI keeps the first record
    from typer.testing import CliRunner

    from realign.cli import app

    res = CliRunner().invoke(app, ["rollback", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert (run_dir / "rollback.1.json").exists() and (run_dir / "deployed_model.1.json").exists()
    html = (run_dir / "report.html").read_text()
    assert "Rollback" in html and "restored the stage-1 baseline" in html
