"""`realign run` with no arguments (issue 15, part 5): the default run's config, its shipped
prompt set, the command line, and (e2e, ``--e2e``) the whole run on the real default model."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from realign.default_run import DEFAULT_RUN_NOTES, default_config, default_prompts_path
from realign.stages.registry import STAGES
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_runs_all_seven_stages_on_the_shipped_prompts():
    cfg = default_config()
    assert cfg.stages == list(STAGES) and len(cfg.stages) == 7
    assert cfg.model == "default" and cfg.data is None
    assert Path(cfg.prompts) == default_prompts_path() and default_prompts_path().is_file()
    assert cfg.sft.benchmarks and all(b.startswith("realign_") for b in cfg.sft.benchmarks)
    assert cfg.preset == "standard" and set(cfg.thresholds) == {"min_pairs"}
    assert any("min_pairs" in n for n in DEFAULT_RUN_NOTES)  # the override is said
    assert cfg.allow_gate_failures == ["win_rate"]
    assert any(n.startswith("win_rate") for n in DEFAULT_RUN_NOTES)
    assert default_config(run_id="x", output_dir="o").run_id == "x"


def test_shipped_prompts_are_verifiable_balanced_and_what_the_script_writes(tmp_path):
    from realign.generation import read_prompt_rows
    from realign.verifiers import verify_rows

    rows = read_prompt_rows(default_prompts_path())
    assert len(rows) == 240
    assert Counter(r.truth["answer"] for r in rows) == {"positive": 120, "negative": 120}
    assert len({r.prompt for r in rows}) == 240
    rep = verify_rows([{"prompt": r.prompt, "answer": r.truth["answer"],
                        "response": f"This review is {r.truth['answer']}."} for r in rows])
    assert rep.share_verifiable == 1.0 and rep.passed == 240
    wrong = verify_rows([{"prompt": r.prompt, "answer": r.truth["answer"],
                          "response": "positive" if r.truth["answer"] == "negative" else "negative"}
                         for r in rows[:20]])
    assert wrong.passed == 0
    # the file is the script's output (deterministic)
    import runpy

    text = default_prompts_path().read_text(encoding="utf-8")
    mod = runpy.run_path(str(ROOT / "examples" / "make_default_prompts.py"), run_name="not_main")
    mod["OUT"] = tmp_path / "x.jsonl"
    g = mod["main"].__globals__
    g["OUT"] = tmp_path / "x.jsonl"
    mod["main"]()
    assert (tmp_path / "x.jsonl").read_text(encoding="utf-8") == text


def test_shipped_prompts_are_clean_of_the_default_benchmarks(tmp_path):
    """Stage 2 checks the generated pairs; the prompts themselves hold no suite item."""
    from realign.generation import read_prompt_rows
    from realign.validation import validate_file

    rows = read_prompt_rows(default_prompts_path())
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": r.prompt, "chosen": r.truth["answer"],
                                     "rejected": "no idea"}) + "\n" for r in rows))
    v = validate_file(f, benchmarks=list(default_config().sft.benchmarks))
    assert v.gate("decontamination").value == 1.0
    assert v.findings["counts"]["contaminated"] == 0


def test_cli_run_without_config_is_the_default_run(tmp_path, monkeypatch):
    import realign.pipeline as pipeline
    from realign.cli import app
    from realign.rundir import RunStatus

    seen = {}

    def fake_run(run_dir, progress=None, **kw):
        seen["config"] = json.loads((Path(run_dir) / "run.json").read_text())["config"]
        return RunStatus(run_id=Path(run_dir).name, run_dir=str(run_dir), state="passed",
                         current_stage=None, stages=[], message="all stages complete")

    monkeypatch.setattr(pipeline, "run_stages", fake_run)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["run", "--run-id", "demo", "iterative.max_iterations=1"])
    assert r.exit_code == 0, r.output
    assert "the default run" in r.stderr and "note: min_pairs" in r.stderr
    cfg = seen["config"]
    assert cfg["prompts"].endswith("sentiment.jsonl") and cfg["iterative"]["max_iterations"] == 1
    assert (tmp_path / "runs" / "demo" / "run.json").is_file()
    r = CliRunner().invoke(app, ["run", "generation.samples=1"])
    assert r.exit_code == 2 and "generation.samples" in r.stderr


@pytest.mark.e2e
def test_the_default_run_end_to_end(tmp_path):
    """All seven stages on SmolLM2-135M-Instruct: every stage leaves a verdict (or the run
    stopped at a failed gate, which names it), the report and the per-stage wall times."""
    from realign.pipeline import create_run, run_stages

    run = create_run(default_config(output_dir=str(tmp_path / "runs"), run_id="default"))
    t0 = time.perf_counter()
    st = run_stages(run)
    wall = time.perf_counter() - t0
    by = {s.name: s for s in st.stages}
    done = [s.name for s in st.stages if s.verdict is not None]
    print(f"default run: {wall:.0f} s, state {st.state}: {st.message}")
    for s in st.stages:
        if s.verdict is not None:
            print(f"  {s.number} {s.name}: {s.verdict.status} "
                  + ", ".join(f"{g.name}={g.value if g.value is None else round(g.value, 4)} "
                              f"{g.status}" for g in s.verdict.gates))
    assert st.state in ("passed", "failed", "incomplete", "passed_with_failures")
    assert done[:5] == ["sft_baseline", "preference_data", "reference_init", "reward_model", "dpo"]
    if st.state == "failed":  # stopped at a gate: the message names it
        assert "failed" in st.message
    else:
        assert done == list(STAGES)
    g = by["preference_data"].verdict.findings["generation"]
    assert g["pairs"] > 0 and g["scorer"] == "verifier"
    if by["iterative"].verdict is not None:
        its = by["iterative"].verdict.findings["iterations"]
        assert its[0]["iteration"] == 0 and all("gates" in r for r in its)
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    # the wall time is printed, not asserted (no timed tests): benchmarks/bench_default_run.py
    # measures it and docs/iterative-training.md#the-default-run reports it
