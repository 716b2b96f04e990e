"""The model card of a deployed model (issue 17, item 3): written by stage 7's deploy and
by a rollback, beside the weights when they are in the run directory, else as
``<run>/model_card.md`` (never into a user's own folder); it parses with
``huggingface_hub.ModelCard.load`` and holds the gate table, retention with CIs, the data
summary, the training config and versions, and the deploy and rollback history.
``assess()`` is a stub here (the model-level path is test_stage7.py's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import realign.assessment as s7
from realign.backends.trl_train import CHECKPOINT_COMPLETE
from realign.config import RunConfig
from realign.fileio import file_digest, write_json_atomic
from realign.gates import Thresholds, make_verdict
from realign.pipeline import create_run
from realign.rundir import RunDir
from realign.stages.context import RunContext
from realign.validation import validate_file

hub = pytest.importorskip("huggingface_hub", reason="the model card needs huggingface_hub")

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "examples" / "pairs.jsonl"
EVAL = ROOT / "examples" / "eval.jsonl"
T = Thresholds()
RETENTION = {"realign_arith": s7.BenchmarkRetention(
    suite="realign_arith", metric="exact_match,none", before=0.5, after=0.49, retention=0.98,
    ci95=(0.91, 1.04), n=50)}


@pytest.fixture()
def run(tmp_path) -> Path:
    """Stages 1, 2 and 5 written by hand: the baseline is the user's folder tmp/base
    (outside the run), stage 5's model is in the run."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"user weights")
    run = create_run(RunConfig(data=str(PAIRS), model=str(base), eval_sets=[str(EVAL)],
                               output_dir=str(tmp_path / "runs"), run_id="mc",
                               sft={"benchmarks": ["realign_arith"]}))
    write_json_atomic(run / "stages" / "1-sft_baseline" / "verdict.json", make_verdict(
        "sft_baseline", [T.evaluate("baseline_perplexity", 3.1)], T,
        artifacts={"model": str(base)}))
    v2 = validate_file(PAIRS, eval_sets=[EVAL], benchmarks=["realign_arith"],
                       thresholds=Thresholds(overrides={"min_pairs": 500}))
    v2.artifacts.update(train_pairs=967, heldout_pairs=106)
    write_json_atomic(run / "stages" / "2-preference_data" / "verdict.json", v2)
    d5 = run / "stages" / "5-dpo"
    (d5 / "model").mkdir(parents=True)
    (d5 / "model" / "model.safetensors").write_bytes(b"policy")
    for step in (10, 20):
        ck = d5 / "checkpoints" / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "model.safetensors").write_bytes(b"ck")
        (ck / CHECKPOINT_COMPLETE).write_text("{}")  # a complete save
    checks = [{"step": 10, "kl": 0.05, "heldout_margin": 0.3, "passed": True},
              {"step": 20, "kl": 0.08, "heldout_margin": 0.5, "passed": True}]
    write_json_atomic(d5 / "verdict.json", make_verdict(
        "dpo", [T.evaluate("kl_divergence", 0.08), T.evaluate("reward_margin", 0.4)], T,
        findings={"checks": checks, "selected_step": 20}, artifacts={"model": str(d5 / "model")}))
    return run


def stub(monkeypatch, passing: set[str]) -> None:
    def assess(ctx, model_path, out, *, win_rate=True, progress=None):
        ok = Path(model_path).name in passing
        out.mkdir(parents=True, exist_ok=True)
        return s7.Assessment(model=str(model_path), retention=RETENTION, gates=[
            T.evaluate("capability_retention", 0.98 if ok else 0.5, ci95=(0.91, 1.04)),
            T.evaluate("worst_benchmark_retention", 0.98 if ok else 0.5),
            T.evaluate("win_rate", 0.6 if win_rate else None)])
    monkeypatch.setattr(s7, "assess", assess)


def check_card(path: Path, *gates: str) -> str:
    card = hub.ModelCard.load(path)
    assert card.data.library_name == "transformers" and "realign" in card.data.tags
    text = card.text
    assert "| stage | gate | value | threshold | status | 95% CI |" in text
    for g in gates:
        assert f"`{g}`" in text, g
    return text


def test_stage7_deploy_writes_the_card_beside_the_weights(run, monkeypatch):
    from realign.stages import evaluation

    stub(monkeypatch, {"model"})
    cfg = RunDir(run)
    from realign.rundir import load_run_config

    ctx = RunContext(config=load_run_config(run), run_dir=run, thresholds=T)
    v = evaluation.run(ctx)
    assert v.findings["decision"] == "deploy" and v.status == "pass"
    model = run / "stages" / "5-dpo" / "model"
    card = model / "README.md"
    assert v.artifacts["model_card"] == str(card) and cfg.model_card == card
    text = check_card(card, "baseline_perplexity", "min_pairs", "decontamination",
                      "kl_divergence", "capability_retention", "win_rate")
    assert "Stage 7 decision: **deploy**" in text
    # retention per benchmark with its CI
    assert "| `realign_arith` | exact_match,none | 0.5 | 0.49 | 0.98 | 0.910 – 1.040 | 50 |" in text
    # the data summary: pairs, usable, split, decontamination against which sets
    assert "1200 rows, 1073 usable" in text and "967 training pairs, 106 held-out" in text
    assert "Decontaminated against: " in text and "eval.jsonl (file" in text
    assert "realign_arith (benchmark" in text  # sft.benchmarks were checked too
    # training config and versions
    assert "beta 0.1" in text and "selected step 20" in text and "realign 0." in text
    # the deploy record's digest covers the card (written first)
    rec = json.loads((run / "deployed_model.json").read_text())
    assert rec["model"] == str(model) and rec["digest"] == file_digest(model)


def test_rollback_to_a_checkpoint_writes_its_card_there(run, monkeypatch):
    from realign.rollback import rollback

    t = Thresholds()
    write_json_atomic(run / "stages" / "7-evaluation" / "verdict.json", make_verdict(
        "evaluation", [t.evaluate("capability_retention", 0.5)], t,
        findings={"decision": "reject", "reasons": ["capability_retention 0.5 < 0.95"],
                  "evaluated_model": str(run / "stages/5-dpo/model")}))
    stub(monkeypatch, {"checkpoint-10"})
    res = rollback(run)
    card = run / "stages" / "5-dpo" / "checkpoints" / "checkpoint-10" / "README.md"
    assert res.restored.name == "dpo-step-10" and res.model_card == str(card)
    text = check_card(card, "capability_retention")
    assert "The restored model, re-evaluated with stage 7's gates" in text
    assert "| dpo-step-10 | `capability_retention` | 0.98 |" in text
    assert "| rollback | trigger | restored | summary |" in text and "`dpo-step-10`" in text
    assert json.loads((run / "rollback.json").read_text())["model_card"] == str(card)


def test_rollback_to_the_users_baseline_never_writes_into_it(run, monkeypatch):
    from realign.rollback import rollback

    t = Thresholds()
    write_json_atomic(run / "stages" / "7-evaluation" / "verdict.json", make_verdict(
        "evaluation", [t.evaluate("capability_retention", 0.5)], t,
        findings={"decision": "reject", "reasons": ["retention"],
                  "evaluated_model": str(run / "stages/5-dpo/model")}))
    stub(monkeypatch, set())
    base = run.parent.parent / "base"
    before = sorted(p.name for p in base.iterdir())
    res = rollback(run)
    assert res.restored.source == "baseline"
    assert res.model_card == str(run / "model_card.md") == str(RunDir(run).model_card)
    assert sorted(p.name for p in base.iterdir()) == before  # the user's folder untouched
    text = check_card(run / "model_card.md", "capability_retention")
    assert "rollback (cli)" in text and "restored the stage-1 baseline" in text
    # a second rollback keeps the history of both
    res2 = rollback(run, force=True)
    text = check_card(Path(res2.model_card))
    assert text.count("| cli |") == 2


def test_model_card_path(tmp_path):
    rd = RunDir(tmp_path / "run")
    (rd.path / "stages" / "5-dpo" / "model").mkdir(parents=True)
    inside = rd.path / "stages" / "5-dpo" / "model"
    outside = tmp_path / "mine"
    outside.mkdir()
    link = rd.path / "link"
    link.symlink_to(outside, target_is_directory=True)
    assert rd.model_card_for(inside) == inside / "README.md"
    assert rd.model_card_for(outside) == rd.path / "model_card.md"
    assert rd.model_card_for(link) == rd.path / "model_card.md"  # leads out of the run
    assert rd.model_card_for("default") == rd.path / "model_card.md"
    assert rd.model_card is None  # nothing deployed
