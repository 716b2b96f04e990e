"""Rollback candidate order and selection on a hand-written run directory (assess() is
replaced by a stub: the model-level path is tested in test_stage7.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import realign.assessment as s7
from realign.errors import InputError
from realign.gates import Thresholds
from realign.rollback import deployed_model, rollback, rollback_candidates


@pytest.fixture()
def run_dir(rejected_run) -> Path:
    checks = [{"step": 0, "kl": 0.0, "heldout_margin": 0.0, "passed": True},
              {"step": 10, "kl": 0.05, "heldout_margin": 0.3, "passed": True},
              {"step": 20, "kl": 0.08, "heldout_margin": 0.5, "passed": True},
              {"step": 30, "kl": 0.2, "heldout_margin": 0.9, "passed": False},
              {"step": 40, "kl": 0.09, "heldout_margin": 0.4, "passed": True}]
    return rejected_run(checks, (20, 30, 40, 50))


def test_candidates_order(run_dir):
    c = rollback_candidates(run_dir)
    # step 20 is the selected (rejected) model, 30 failed KL, 50 has no check, 10 is not on disk
    assert [x.name for x in c] == ["dpo-step-40", "baseline"]
    assert c[0].heldout_margin == 0.4 and c[-1].source == "baseline"
    assert c[-1].path.endswith("base")


def _stub(passing: set[str], calls: list[str]):
    t = Thresholds()

    def assess(ctx, model_path, out, *, win_rate=True, progress=None):
        calls.append(Path(model_path).name)
        ok = Path(model_path).name in passing
        gates = [t.evaluate("capability_retention", 1.0 if ok else 0.5),
                 t.evaluate("worst_benchmark_retention", 1.0 if ok else 0.5),
                 t.evaluate("win_rate", 0.6 if win_rate else None)]
        out.mkdir(parents=True, exist_ok=True)
        return s7.Assessment(model=str(model_path), gates=gates)
    return assess


def test_passing_checkpoint_is_restored(run_dir, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(s7, "assess", _stub({"checkpoint-40"}, calls))
    res = rollback(run_dir)
    assert calls == ["checkpoint-40"]  # the baseline is not needed
    assert res.restored.name == "dpo-step-40"
    assert deployed_model(run_dir)["model"].endswith("checkpoint-40")
    rec = json.loads((run_dir / "rollback.json").read_text())
    assert rec["evaluated"][0]["passed"] and rec["regression"] == ["retention"]
    assert (run_dir / "stages/5-dpo/checkpoints/checkpoint-20").exists()  # nothing deleted


def test_baseline_fallback(run_dir, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(s7, "assess", _stub({"base"}, calls))
    res = rollback(run_dir)
    assert calls == ["checkpoint-40", "base"] and res.restored.source == "baseline"
    base = res.evaluated[-1]
    assert [g.status for g in base.gates] == ["pass", "pass", "unmeasured"]
    assert "baseline" in res.summary


def test_refuses_without_regression(run_dir, tmp_path):
    p = run_dir / "stages" / "7-evaluation" / "verdict.json"
    v = json.loads(p.read_text())
    v["status"] = "pass"
    p.write_text(json.dumps(v))
    with pytest.raises(InputError, match="nothing to roll back"):
        rollback(run_dir)
    p.unlink()
    with pytest.raises(InputError, match="has not run"):
        rollback(run_dir)
    from typer.testing import CliRunner

    from realign.cli import app

    assert CliRunner().invoke(app, ["rollback", str(run_dir)]).exit_code == 2


def test_corrupt_stage7_verdict_is_bad_input_naming_the_file(run_dir):
    from typer.testing import CliRunner

    from realign.cli import app

    p = run_dir / "stages" / "7-evaluation" / "verdict.json"
    p.write_bytes(b"")
    with pytest.raises(InputError, match="empty") as e:
        rollback(run_dir)
    assert str(p) in str(e.value)
    res = CliRunner().invoke(app, ["rollback", str(run_dir)])
    assert res.exit_code == 2 and "verdict.json" in res.output and "Traceback" not in res.output
    assert not (run_dir / "rollback.json").exists()


def test_a_cut_short_checkpoint_is_never_a_candidate(run_dir):
    """A checkpoint folder without stage 5's completion marker (a kill during the save)
    is left out even when its step passed the KL gate."""
    from realign.backends.trl_train import CHECKPOINT_COMPLETE

    (run_dir / "stages/5-dpo/checkpoints/checkpoint-40" / CHECKPOINT_COMPLETE).unlink()
    assert [x.name for x in rollback_candidates(run_dir)] == ["baseline"]
