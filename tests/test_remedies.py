"""Remedies (issue 17, item 1): every failed or unmeasured gate carries the next step, with
values, from the one table in ``realign.gates``; the CLI, ``realign status``, the report
and the MCP results show it (over MCP naming tools, not CLI commands)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from realign.cli import app
from realign.config import RunConfig
from realign.gates import (
    GATE_SPECS,
    REMEDIES,
    GateResult,
    Thresholds,
    remedy_context_from_config,
    remedy_table,
    render_remedy,
)
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "examples" / "pairs.jsonl"
EVAL = ROOT / "examples" / "eval.jsonl"
runner = CliRunner()

#: Every name a remedy template may use, with a value (a run's full context).
FULL = {"run": "runs/r1", "data": "pairs.jsonl", "lr": 5e-6, "beta": 0.1, "dpo_steps": 40,
        "reward_steps": 30, "on_breach": "stop", "heldout_min": 16, "probe_size": 16,
        "coverage": 0.8, "negative_lines": [3, 7], "negative_source": "the data's",
        "contaminated_lines": [71, 81], "unchecked": ["arc_easy"], "pairs": 1000,
        "worst": "realign_arith", "undefined_benchmarks": ["realign_format"],
        "candidate": "dpo-step-40, runs/r1/stages/5-dpo/checkpoints/checkpoint-40"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the table
def test_every_gate_has_a_remedy_for_fail_and_unmeasured():
    assert set(REMEDIES) == set(GATE_SPECS)
    for name in GATE_SPECS:
        assert set(REMEDIES[name]) == {"fail", "unmeasured"}, name
        for status in ("fail", "unmeasured"):
            for ctx in ({}, FULL):  # with placeholders, and with a run's values
                text = render_remedy(name, status, 0.5, 0.7, ctx)
                assert text and len(text) > 30, (name, status)
                assert "{" + "{" not in text and "{%" not in text and "None" not in text
        assert render_remedy(name, "pass", 1.0, 0.5, FULL) is None
    assert [r[0] for r in remedy_table()] == list(GATE_SPECS)


def test_evaluate_fills_the_remedy_with_values():
    t = Thresholds().with_context(lr=5e-6, beta=0.1, dpo_steps=40, on_breach="halve_lr",
                                  run="runs/r1")
    kl = t.evaluate("kl_divergence", 0.31)
    assert kl.status == "fail"
    assert "`dpo.learning_rate` lowered to 2.5e-06" in kl.remedy
    assert "`dpo.beta` raised to 0.2" in kl.remedy
    assert "`kl_monitor.on_breach: rollback`" in kl.remedy  # not the current policy
    assert "`dpo.max_steps: 20`" in kl.remedy
    assert "`realign run --config CONFIG dpo.learning_rate=2.5e-06`" in kl.remedy
    # already rolling back on a breach: that clause is left out
    already = t.with_context(on_breach="rollback").evaluate("kl_divergence", 0.31)
    assert "on_breach" not in already.remedy
    assert t.evaluate("kl_divergence", 0.01).remedy is None  # a pass has none
    # per-call context (what the stage found) on top of the thresholds' context
    lb = t.evaluate("length_bias", 0.8, remedy_context={"pairs": 1000})
    assert "drop about 334 of the pairs" in lb.remedy  # (0.8 - 0.7) * 1000 / 0.3, rounded up
    assert "at most 0.7 of all" in lb.remedy
    mp = t.evaluate("min_pairs", 900.0)
    assert "add at least 100 usable pairs" in mp.remedy
    ret = t.with_context(candidate="dpo-step-40, x").evaluate(
        "capability_retention", 0.5, remedy_context={"worst": "realign_arith"})
    assert "`realign rollback runs/r1`" in ret.remedy and "dpo-step-40" in ret.remedy
    assert "largest loss: realign_arith" in ret.remedy
    un = t.evaluate("capability_retention", None,
                    remedy_context={"undefined_benchmarks": ["realign_format"]})
    assert un.status == "unmeasured" and "no retention for realign_format" in un.remedy


def test_without_context_placeholders_read_as_such():
    g = Thresholds().evaluate("kl_divergence", 0.5)
    assert "lowered to LR/2" in g.remedy and "raised to 2×BETA" in g.remedy


def test_a_gate_result_without_a_remedy_gets_the_generic_one():
    """verdict.json written before remedies existed, or a gate built by hand."""
    g = GateResult.model_validate({"name": "win_rate", "value": None, "threshold": 0.5,
                                   "op": ">", "status": "unmeasured"})
    assert g.remedy == render_remedy("win_rate", "unmeasured")
    assert GateResult(name="win_rate", value=0.7, threshold=0.5, op=">",
                      status="pass").remedy is None
    # an explicit remedy is kept, and the JSON round trip is stable
    g2 = Thresholds().evaluate("min_pairs", 10.0)
    assert GateResult.model_validate_json(g2.model_dump_json()) == g2


def test_remedy_context_from_config():
    cfg = RunConfig(data="d.jsonl", dpo={"learning_rate": 1e-5, "beta": 0.2, "max_steps": -1})
    ctx = remedy_context_from_config(cfg, "runs/x")
    assert ctx["lr"] == 1e-5 and ctx["beta"] == 0.2 and ctx["run"] == "runs/x"
    assert "dpo_steps" not in ctx  # -1 (epochs) is no step count to halve
    text = Thresholds().with_context(**ctx).evaluate("kl_divergence", 1.0).remedy
    assert "lowered to 5e-06" in text and "raised to 0.4" in text and "STEPS/2" in text


# --------------------------------------------------------------------------- stage 2
def test_stage2_remedies_name_the_lines(tmp_path):
    from realign.validation import validate_file

    rows = [{"prompt": f"Question {i} about {i * 3}?", "chosen": f"Good answer {i}.",
             "rejected": f"Bad answer {i}.", "score_chosen": 2 if i in (2, 5) else 9,
             "score_rejected": 8 if i in (2, 5) else 1} for i in range(1, 21)]
    rows.append({"prompt": "What is the capital of France? Tell me in one word please",
                 "chosen": "What is the capital of France? Tell me in one word please. Paris",
                 "rejected": "No idea.", "score_chosen": 9, "score_rejected": 1})
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    ev = write_jsonl(tmp_path / "eval.jsonl",
                     [{"prompt": "What is the capital of France? Tell me in one word please"}])
    t = Thresholds(overrides={"preference_gap": 0.9, "decontamination": 0.99})
    v = validate_file(data, eval_sets=[ev], thresholds=t, score_scale="1-10")
    gap, decon = v.gate("preference_gap"), v.gate("decontamination")
    assert gap.status == "fail" and "lines 2, 5 have a negative gap" in gap.remedy
    assert v.findings["preference_gap"]["negative_lines"] == [2, 5]
    assert f"`realign validate {data} --reward-model RM`" in gap.remedy
    assert decon.status == "fail" and "(lines 21)" in decon.remedy
    assert v.gate("min_pairs").status == "fail"
    assert "add at least 980 usable pairs" in v.gate("min_pairs").remedy
    unm = validate_file(data, thresholds=t).gate("decontamination")
    assert unm.status == "unmeasured" and "`eval_sets`" in unm.remedy


def test_cli_verdict_table_shows_the_remedy():
    r = runner.invoke(app, ["validate", str(PAIRS)], env={"COLUMNS": "200"})
    assert r.exit_code == 3, r.output  # decontamination unmeasured
    assert "remedy" in r.output
    assert "→ name the evaluation sets you will report on" in r.output
    r = runner.invoke(app, ["validate", str(PAIRS), "--json"])
    gates = {g["name"]: g for g in json.loads(r.output)["gates"]}
    assert gates["decontamination"]["remedy"].startswith("name the evaluation sets")
    assert gates["min_pairs"]["remedy"] is None


# --------------------------------------------------------------------------- a run
@pytest.fixture()
def failed_run(tmp_path) -> Path:
    """Stage 2 of a run whose min_pairs fails (the run stops there)."""
    from realign.pipeline import run_pipeline

    cfg = RunConfig(data=str(PAIRS), eval_sets=[str(EVAL)], stages=["preference_data"],
                    thresholds={"min_pairs": 5000}, output_dir=str(tmp_path / "runs"),
                    run_id="r", dpo={"learning_rate": 4e-6})
    st = run_pipeline(cfg)
    assert st.state == "failed"
    return Path(st.run_dir)


def test_run_status_and_report_show_remedies(failed_run):
    v = json.loads((failed_run / "stages" / "2-preference_data" / "verdict.json").read_text())
    gate = next(g for g in v["gates"] if g["name"] == "min_pairs")
    assert gate["status"] == "fail" and "add at least 3927 usable pairs" in gate["remedy"]
    r = runner.invoke(app, ["status", str(failed_run)], env={"COLUMNS": "200"})
    assert "min_pairs: add at least 3927 usable pairs" in " ".join(r.output.split())
    md = (failed_run / "report.md").read_text()
    assert "| remedy |" in md and "add at least 3927 usable pairs" in md
    html = (failed_run / "report.html").read_text()
    assert '<td class="remedy">add at least 3927 usable pairs' in html


def test_stage7_remedy_names_the_first_rollback_candidate(rejected_run):
    from realign.pipeline import _stage_remedy_context
    from realign.rundir import RunDir

    checks = [{"step": 20, "kl": 0.08, "heldout_margin": 0.5, "passed": True},
              {"step": 40, "kl": 0.09, "heldout_margin": 0.4, "passed": True}]
    run = rejected_run(checks, (20, 40))
    ctx = _stage_remedy_context(RunDir(run), "evaluation")
    assert ctx["candidate"].startswith("dpo-step-40, ") and ctx["candidate"].endswith("checkpoint-40")
    assert _stage_remedy_context(RunDir(run), "dpo") == {}


# --------------------------------------------------------------------------- MCP
def test_for_mcp_names_tools_for_the_commands_remedies_use():
    pytest.importorskip("mcp")
    from realign_mcp._util import for_mcp

    for name, fail, unmeasured in remedy_table():
        for text in (fail, unmeasured, render_remedy(name, "fail", 0.5, 0.7, FULL),
                     render_remedy(name, "unmeasured", None, 0.7, FULL)):
            assert not re.search(r"`realign [a-z]", for_mcp(text)), (name, for_mcp(text))
    assert for_mcp("`realign run --config CONFIG dpo.beta=0.2`") == \
        "`start_pipeline` with overrides ['dpo.beta=0.2']"
    assert for_mcp("`realign eval --list`") == "`list_suites`"
    assert for_mcp("`realign rollback runs/r1`") == "`rollback`"
    assert for_mcp("`realign init --calibrate`") == "`create_run_config` with calibrate: true"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_mcp_results_carry_remedies_in_mcp_words(tmp_path, anyio_backend):
    pytest.importorskip("mcp")
    from mcp import Client
    from realign_mcp.server import build_server

    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"data": str(PAIRS), "stages": ["preference_data"]}))
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        v = (await c.call_tool("validate_preference_data", {"path": str(PAIRS)})).structured_content
        st = (await c.call_tool("run_pipeline", {
            "config_path": str(cfg), "run_id": "m",
            "overrides": ["thresholds.min_pairs=5000", "thresholds.decontamination=0.999",
                          f"eval_sets=[{EVAL}]"]})).structured_content
    decon = next(g for g in v["gates"] if g["name"] == "decontamination")
    assert "`validate_preference_data` with eval_sets" in decon["remedy"]
    assert "realign validate" not in decon["remedy"]
    assert st["state"] == "failed"
    gates = {g["name"]: g for g in st["stages"][0]["verdict"]["gates"]}
    assert "add at least 3927 usable pairs" in gates["min_pairs"]["remedy"]
    # the override set eval_sets: measured (0.998), and failing the overridden 0.999
    assert gates["decontamination"]["status"] == "fail"
    assert "(lines 71, 81)" in gates["decontamination"]["remedy"]
    assert "`clean_preference_data` with eval_sets" in gates["decontamination"]["remedy"]
    # the file on disk keeps the CLI wording; only the MCP result is translated
    disk = json.loads((tmp_path / "runs" / "m" / "stages" / "2-preference_data" /
                       "verdict.json").read_text())
    on_disk = {g["name"]: g for g in disk["gates"]}
    assert "`realign validate " in on_disk["decontamination"]["remedy"]
    assert on_disk["min_pairs"]["remedy"] == gates["min_pairs"]["remedy"]
