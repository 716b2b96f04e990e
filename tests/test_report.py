"""The run report on a run directory written by hand (no model): every gate of every stage,
the plots, Markdown, and rendering in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from realign.config import RunConfig
from realign.gates import Thresholds, make_verdict
from realign.fileio import write_json_atomic
from realign.pipeline import create_run
from realign.report import collect, interval_chart, line_chart, nice_ticks, Series, write_report


def _stage(run_dir: Path, k: int, name: str) -> Path:
    d = run_dir / "stages" / f"{k}-{name}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture()
def fake_run(tmp_path) -> Path:
    t = Thresholds()
    run_dir = create_run(RunConfig(data=str(tmp_path / "x.jsonl"), output_dir=str(tmp_path / "runs"),
                                   run_id="fake", stages=["sft_baseline", "dpo", "evaluation"]))
    write_json_atomic(_stage(run_dir, 1, "sft_baseline") / "verdict.json", make_verdict(
        "sft_baseline", [t.evaluate("baseline_perplexity", 12.5, detail="ppl <detail> & more")], t))
    d5 = _stage(run_dir, 5, "dpo")
    with open(d5 / "metrics.jsonl", "w") as fh:
        for step in range(1, 21):
            fh.write(json.dumps({"event": "train_log", "step": step, "loss": 0.69 - 0.01 * step,
                                 "rewards/margins": 0.02 * step, "rewards/accuracies": min(1, 0.5 + step / 40)}) + "\n")
        for step in (0, 10, 20):
            fh.write(json.dumps({"event": "kl_check", "step": step, "kl": 0.006 * step,
                                 "heldout_margin": 0.01 * step, "heldout_accuracy": 0.5 + step / 50,
                                 "passed": step < 20}) + "\n")
        fh.write('{"event": "train_log", "step": 21, "lo')  # a line cut by a kill
    write_json_atomic(d5 / "verdict.json", make_verdict("dpo", [
        t.evaluate("kl_divergence", 0.06, detail="step 10"),
        t.evaluate("reward_margin", 0.1, ci95=(0.02, 0.18))], t))
    retention = {"realign_knowledge": {"suite": "realign_knowledge", "metric": "acc,none", "before": 0.8,
                                       "after": 0.76, "retention": 0.95, "ci95": [0.9, 1.0], "n": 143},
                 "realign_arith": {"suite": "realign_arith", "metric": "exact_match,last_integer",
                                   "before": 0.4, "after": 0.2, "retention": 0.5, "ci95": [0.35, 0.66],
                                   "n": 200}}
    gates = [t.evaluate("capability_retention", 0.725, ci95=(0.64, 0.8)),
             t.evaluate("worst_benchmark_retention", 0.5, ci95=(0.35, 0.66), detail="realign_arith"),
             t.evaluate("win_rate", None, detail="unmeasured: no judge")]
    write_json_atomic(_stage(run_dir, 7, "evaluation") / "verdict.json", make_verdict(
        "evaluation", gates, t, {"decision": "reject", "reasons": ["worst_benchmark_retention 0.5 fail"],
                                 "retention": retention}))
    return run_dir


def test_report_has_every_gate_plots_and_markdown(fake_run):
    html_path, md_path = write_report(fake_run)
    html, md = html_path.read_text(), md_path.read_text()
    for name in ("baseline_perplexity", "kl_divergence", "reward_margin", "capability_retention",
                 "worst_benchmark_retention", "win_rate"):
        assert f"<code>{name}</code>" in html and f"| `{name}` |" in md
    assert "ppl &lt;detail&gt; &amp; more" in html  # escaped
    assert "Stage 7 decision: reject" in html and "**Stage 7 decision: reject**" in md
    # loss, KL, margins, accuracies, retention
    assert html.count("<svg") == 5
    for title in ("DPO training loss", "KL(π‖π_ref) per token", "Reward margins", "Reward accuracies",
                  "Retention per benchmark"):
        assert title in html
    assert "kl_divergence ≤ 0.1" in html  # the gate threshold drawn on the KL plot
    assert "realign_arith" in md and "0.35 – 0.66" in html
    data = collect(fake_run)
    assert data["n_gates"] == 6
    assert {m["metric"]: m["last"] for m in data["metrics_summary"]}["DPO loss"] == "step 20: 0.49"
    assert "http" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_report_before_stage7_and_cli(fake_run):
    shutil.rmtree(fake_run / "stages" / "7-evaluation")
    from typer.testing import CliRunner

    from realign.cli import app

    res = CliRunner().invoke(app, ["report", str(fake_run)])
    assert res.exit_code == 0, res.output
    html = (fake_run / "report.html").read_text()
    assert "stage 7 (evaluation) has not run" in html
    assert CliRunner().invoke(app, ["report", str(fake_run / "nope")]).exit_code == 2


def test_svg_helpers():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    svg = line_chart("t", [Series("s", [(0, 1.0), (1, 2.0)])], hlines=[(100.0, "far", "#f00")])
    assert "far (above the plot)" in svg and svg.startswith("<svg")
    assert "no data" in line_chart("t", [Series("s", [])])
    svg = interval_chart("r", [("a", 0.9, (0.8, 1.0)), ("b", None, None)], vlines=[(0.95, "m", "#000")])
    assert svg.count("<circle") == 1


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(fake_run, tmp_path):
    html_path, _ = write_report(fake_run)
    shot = tmp_path / "report.png"
    profile = tmp_path / "profile"
    profile.mkdir()
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2000",
           html_path.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 2000)
    assert len(data) > 50_000  # a rendered page with tables and plots, not a blank image
