"""Stage 6, iterative training (issue 15, part 3): the stopping rule and the selection, two
iterations on the tiny model, a kill in the middle of an iteration and the resume, and
the rollback to the best passing iteration when a gate fails."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from realign.stages.iterative import gain_includes_zero, select, stop_reason

ROOT = Path(__file__).resolve().parents[1]
CHECK = [{"id": "length_constraints:number_words", "kwargs": {"num_words": 9, "relation": "at least"}}]


def _rec(t, mean=0.5, ci=(-0.1, 0.1), failed=()):
    return {"iteration": t, "score": {"mean": mean}, "failed": list(failed),
            "gain_vs_previous": None if t == 0 else {"mean": 0.0, "ci95": list(ci) if ci else None}}


def test_stop_rule():
    rs = [_rec(0)]
    assert stop_reason(rs, max_iterations=3, patience=2) is None
    rs.append(_rec(1, ci=(0.05, 0.3)))  # a significant gain
    assert stop_reason(rs, max_iterations=3, patience=2) is None
    rs.append(_rec(2, ci=(-0.1, 0.2)))  # CI includes 0: once
    assert stop_reason(rs, max_iterations=5, patience=2) is None
    assert "no significant gain" in stop_reason(rs, max_iterations=5, patience=1)
    rs.append(_rec(3, ci=(-0.2, 0.0)))  # twice in a row (0 counts as included)
    assert "no significant gain" in stop_reason(rs, max_iterations=5, patience=2)
    assert "max_iterations" in stop_reason(rs[:2], max_iterations=1, patience=2)
    assert "failed kl_divergence" in stop_reason(
        [_rec(0), _rec(1, ci=(0.1, 0.2), failed=["kl_divergence"])], max_iterations=3, patience=2)
    # iteration 0 failing a gate (stage 5's policy) does not stop the iterations
    assert stop_reason([_rec(0, failed=["win_rate"])], max_iterations=3, patience=2) is None
    assert gain_includes_zero({"gain_vs_previous": None})
    # a failure the config allows (allow_gate_failures) does not stop the iterations
    rs = [_rec(0), _rec(1, ci=(0.1, 0.2), failed=["win_rate"])]
    assert stop_reason(rs, max_iterations=3, patience=2, allowed=["win_rate"]) is None
    assert "failed win_rate" in stop_reason(rs, max_iterations=3, patience=2)


def test_selection_keeps_the_best_passing_iteration():
    rs = [_rec(0, 0.2), _rec(1, 0.5), _rec(2, 0.5), _rec(3, 0.9, failed=["length_ratio"])]
    assert select(rs)["iteration"] == 1  # 3 failed; 1 and 2 tie: the earlier
    assert select([_rec(0, 0.2, failed=["win_rate"]), _rec(1, 0.9, failed=["kl_divergence"])]
                  )["iteration"] == 0  # none passes: stage 5's policy
    assert select([_rec(0, 0.2, failed=["win_rate"]), _rec(1, 0.9, failed=["win_rate"])],
                  allowed=["win_rate"])["iteration"] == 1


# ---------------------------------------------------------------- on the tiny model


def _config(tmp: Path, model: Path, **iterative):
    from realign.config import RunConfig

    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": f"Write a few words about object number {i}.",
                    "instructions": CHECK, "answer": f"Object {i}."}) + "\n" for i in range(60)))
    return RunConfig(
        model=str(model), prompts=str(prompts), output_dir=str(tmp / "runs"), run_id="it",
        eval_sets=[str(ROOT / "examples" / "eval.jsonl")],
        stages=["sft_baseline", "preference_data", "reference_init", "dpo", "iterative"],
        # the gates are not the subject here: let every iteration pass them
        thresholds={"min_pairs": 2, "baseline_perplexity": 1e9, "kl_divergence": 100,
                    "win_rate": -1, "length_ratio": 0, "distinct_ratio": 0, "prompt_echo": 1,
                    "reward_margin": -1e9, "length_bias": 1},
        heldout={"fraction": 0.25, "min_pairs": 4},
        generation={"samples": 4, "max_new_tokens": 12, "batch_size": 32},
        dpo={"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "max_length": 48,
             "save_every": 2},
        kl_monitor={"every": 2, "probe_size": 2, "batch_size": 4, "gate_prompts": 4,
                    "gate_max_new_tokens": 8},
        evaluation={"max_new_tokens": 12, "n_boot": 200},
        iterative={"max_iterations": 2, "patience": 5, "max_steps": 4, "eval_prompts": 12,
                   "prompts_per_iteration": 24, **iterative},
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_path, one_thread):
    """Stages 1, 2 (generation mode), 3 and 5 done; tests copy the run directory."""
    import realign.backends.trl_train as tt
    from realign.pipeline import create_run, run_stages

    tmp = tmp_path_factory.mktemp("iter")
    old = tt.ref_cache_dir
    tt.ref_cache_dir = lambda: tmp / "refcache"  # type: ignore[assignment]
    try:
        run = create_run(_config(tmp, tiny_model_path))
        st = run_stages(run, stages=["sft_baseline", "preference_data", "reference_init", "dpo"])
    finally:
        tt.ref_cache_dir = old  # type: ignore[assignment]
    assert st.state == "passed", st
    return run


def _copy(prepared: Path, tmp: Path, **iterative) -> Path:
    dst = tmp / "it"
    shutil.copytree(prepared, dst)
    if iterative:
        run = json.loads((dst / "run.json").read_text())
        run["config"]["iterative"].update(iterative)
        (dst / "run.json").write_text(json.dumps(run))
    return dst


def _verdict(status, name="iterative"):
    return next(s.verdict for s in status.stages if s.name == name)


@pytest.mark.integration
def test_two_iterations(prepared, tmp_path, ref_cache, one_thread):
    from realign.fileio import read_jsonl
    from realign.pipeline import run_stages
    from realign.stages.context import RunContext

    run = _copy(prepared, tmp_path)
    st = run_stages(run, stages=["iterative"])
    v = _verdict(st)
    its = v.findings["iterations"]
    assert [r["iteration"] for r in its] == [0, 1, 2]
    assert "max_iterations" in v.findings["stopped"]
    s5 = json.loads((run / "stages" / "5-dpo" / "verdict.json").read_text())["artifacts"]["model"]
    assert its[0]["model"] == s5
    d6 = run / "stages" / "6-iterative"
    for r in its[1:]:
        t = r["iteration"]
        assert r["model"] == str(d6 / f"iter-{t}" / "model") and Path(r["model"]).is_dir()
        assert r["dpo"]["steps"] == 4 and r["pairs"]["generation"]["prompts"] == 24
        assert r["pairs"]["gates"]["min_pairs"]["status"] == "pass"
        assert r["gain_vs_previous"]["n"] == r["score"]["n"] > 0
        assert r["win_rate_vs_previous"] is not None
        # iteration t samples from iteration t-1's policy (warm start)
        assert (d6 / f"iter-{t}" / "candidates.jsonl").exists()
    for r in its:
        names = [g["name"] for g in r["gates"]]
        assert names == ["kl_divergence", "win_rate", "capability_retention",
                         "worst_benchmark_retention", "length_ratio", "prompt_echo",
                         "distinct_ratio"]
        assert r["kl"]["sampled"]["kl"] >= 0 and r["score"]["scorer"] == "verifier"
        assert r["gain_vs_baseline"]["ci95"] is not None
    # the baseline's and iteration 1's held-out responses are on disk, paired by prompt
    rows = read_jsonl(d6 / "iter-1" / "heldout_responses.jsonl")
    assert len(rows) == its[1]["score"]["n"] and {"response", "baseline", "score"} <= set(rows[0])
    chosen = v.findings["selected_iteration"]
    assert v.artifacts["model"] == its[chosen]["model"]
    assert [g.name for g in v.gates] == [g["name"] for g in its[chosen]["gates"]]
    # the stage-6 KL gate is KL to pi0 (iteration 0 is stage 5's model: the same gate)
    assert v.gate("kl_divergence").value == pytest.approx(
        its[chosen]["kl"]["sampled"]["kl"])
    # stage 7 evaluates stage 6's model
    from realign.stages.evaluation import evaluated_policy

    ctx = RunContext(config=run_status_config(run), run_dir=run, thresholds=None)  # type: ignore[arg-type]
    assert evaluated_policy(ctx) == (v.artifacts["model"], f"stage 6 iteration {chosen}")
    # the report has one row per iteration, the kept one marked
    from realign.report import write_report

    html, md = write_report(run)
    text = md.read_text(encoding="utf-8")
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip()
            in {"0", "1", "2"}]
    assert "Iterations (" in text and len(rows) == 3, text
    assert [r.split("|")[2].strip() for r in rows] == ["yes" if t == chosen else ""
                                                       for t in range(3)]
    assert "held-out score" in html.read_text(encoding="utf-8")


def run_status_config(run: Path):
    from realign.rundir import load_run_config

    return load_run_config(run)


CHILD = r"""
import os, signal, sys
from pathlib import Path
import transformers
import realign.backends.trl_train as tt
tt.ref_cache_dir = lambda: Path(sys.argv[2])
original = transformers.Trainer._save_optimizer_and_scheduler
def killed_mid_save(self, output_dir):
    if "iter-2" in str(output_dir) and self.state.global_step >= 4:
        os.kill(os.getpid(), signal.SIGKILL)  # iteration 2, step 4: weights written, no marker
    return original(self, output_dir)
transformers.Trainer._save_optimizer_and_scheduler = killed_mid_save
import torch
torch.set_num_threads(1)
from realign.pipeline import run_stages
run_stages(Path(sys.argv[1]), stages=["iterative"])
"""


@pytest.mark.integration
def test_kill_mid_iteration_then_resume(prepared, tmp_path, ref_cache, one_thread, monkeypatch):
    """Killed during iteration 2's DPO: the resume keeps iterations 0-1 as measured, reuses
    iteration 2's pairs and continues its DPO from the last complete checkpoint."""
    import realign.generation as gen
    from realign.pipeline import run_stages, run_status

    run = _copy(prepared, tmp_path)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run), str(ref_cache)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    d6 = run / "stages" / "6-iterative"
    assert not (d6 / "verdict.json").exists() and run_status(run).state == "interrupted"
    state = json.loads((d6 / "state.json").read_text())
    assert [r["iteration"] for r in state["iterations"]] == [0, 1]
    assert (d6 / "iter-2" / "pairs.json").exists() and not (d6 / "iter-2" / "model").exists()
    pairs_before = (d6 / "iter-2" / "generated.jsonl").read_text()
    ck = d6 / "iter-2" / "checkpoints"
    assert (ck / "checkpoint-2").exists()

    calls = []
    orig = gen.generate_pairs
    monkeypatch.setattr(gen, "generate_pairs", lambda *a, **k: calls.append(1) or orig(*a, **k))
    st = run_stages(run)  # resume
    v = _verdict(st)
    its = v.findings["iterations"]
    assert [r["iteration"] for r in its] == [0, 1, 2]
    assert its[:2] == [{k: x for k, x in r.items() if k != "scores"} for r in state["iterations"]]
    assert calls == []  # iteration 2's pairs were reused, not sampled again
    assert (d6 / "iter-2" / "generated.jsonl").read_text() == pairs_before
    assert its[2]["dpo"]["resumed_from_step"] == 2 and its[2]["dpo"]["steps"] == 4
    assert any("removed incomplete checkpoint(s) checkpoint-4" in w for w in its[2]["dpo"]["warnings"])
    assert st.state in ("passed", "incomplete")


@pytest.mark.integration
def test_a_failed_gate_stops_and_rolls_back(prepared, tmp_path, ref_cache, one_thread,
                                            monkeypatch):
    """Iteration 2 fails a gate: the stage stops there and keeps the best passing
    iteration, naming the failure."""
    from realign.pipeline import run_stages
    from realign.stages import iterative

    run = _copy(prepared, tmp_path, max_iterations=3)
    orig = iterative.Measurer.measure

    def measure(self, handle, t, *a, **k):
        rec = orig(self, handle, t, *a, **k)
        if t == 2:  # plant a length collapse at iteration 2
            for g in rec["gates"]:
                if g["name"] == "length_ratio":
                    g.update(value=0.05, status="fail")
            rec["failed"] = ["length_ratio"]
            rec["hacking"] = ["length collapse: length_ratio 0.05 (needs >= 0.5)"]
        return rec

    monkeypatch.setattr(iterative.Measurer, "measure", measure)
    v = _verdict(run_stages(run, stages=["iterative"]))
    its = v.findings["iterations"]
    assert [r["iteration"] for r in its] == [0, 1, 2]  # stopped at 2, not 3
    assert "iteration 2 failed length_ratio" in v.findings["stopped"]
    best = max((r for r in its if not r["failed"]), key=lambda r: (r["score"]["mean"], -r["iteration"]))
    assert v.findings["selected_iteration"] == best["iteration"] != 2
    assert any("iteration 2 failed length_ratio (length collapse" in w and
               f"rolled back to iteration {best['iteration']}" in w for w in v.warnings)
    assert v.gate("length_ratio").status != "fail"  # the kept iteration's own measurement
