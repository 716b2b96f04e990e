"""initial_kl measures the policy stage 5 actually starts from (issue 13, item 9): one
construction for both stages, measured as the trainer runs it; and stage 5 measures its
own step 0 instead of copying stage 3's number."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def _config(tmp: Path, model: Path, run_id: str, **extra):
    from realign.config import RunConfig

    data = tmp / "pairs.jsonl"
    data.write_text("\n".join((ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:200]) + "\n")
    return RunConfig(
        model=str(model), data=str(data), output_dir=str(tmp / "runs"), run_id=run_id,
        eval_sets=[str(ROOT / "examples" / "eval.jsonl")],
        stages=extra.pop("stages", ["preference_data", "reference_init", "dpo"]),
        thresholds={"min_pairs": 100},
        dpo={"max_steps": 2, "batch_size": 2, "learning_rate": 1e-4, "max_length": 48,
             "save_every": 100, **extra.pop("dpo", {})},
        kl_monitor={"every": 2, "probe_size": 4, "batch_size": 4, "gate_prompts": 2,
                    "gate_max_new_tokens": 4, "gate_pairs": 4},
        **extra)


def test_stages_3_and_5_build_the_policy_with_one_function():
    from realign.stages import dpo, reference_init

    assert dpo.build_policy is reference_init.build_policy
    assert dpo.load_reference is reference_init.load_reference


def test_dropout_left_on_in_training_fails_initial_kl(tiny_model_path, tmp_path):
    """A model whose attention dropout stays on in train mode (TRL's disable_dropout only
    zeroes nn.Dropout modules) trains from a policy that is not the reference: stage 3
    measures the policy in train mode, as the trainer runs it, and the gate fails. Measured
    in eval mode (a copy that is not what stage 5 trains) it read 0 and passed."""
    from realign.pipeline import create_run, run_stages

    model = tmp_path / "dropout-model"
    shutil.copytree(tiny_model_path, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["attention_dropout"] = 0.5
    (model / "config.json").write_text(json.dumps(cfg))
    run = create_run(_config(tmp_path, model, "dropout", stages=["preference_data", "reference_init"]))
    status = run_stages(run)
    v = next(s.verdict for s in status.stages if s.name == "reference_init")
    gate = v.gate("initial_kl")
    assert gate.status == "fail" and gate.value > 1e-3
    assert "train mode" in gate.detail
    assert v.findings["policy_build"]["mode"] == "train"

    # the same model with its dropout off passes: the gate measures the difference, not the model
    cfg["attention_dropout"] = 0.0
    (model / "config.json").write_text(json.dumps(cfg))
    run2 = create_run(_config(tmp_path, model, "no-dropout", stages=["preference_data", "reference_init"]))
    v2 = next(s.verdict for s in run_stages(run2).stages if s.name == "reference_init")
    assert v2.gate("initial_kl").status == "pass" and v2.gate("initial_kl").value == 0.0


def test_stage5_measures_its_own_starting_policy(tiny_model_path, tmp_path, monkeypatch):
    """A difference planted in stage 5's policy only (stage 3 measured a clean one) is
    caught at step 0: the check is measured on the trainer's policy, not copied."""
    import torch

    import realign.backends.trl_train as tt
    from realign.pipeline import create_run, run_stages
    from realign.stages import dpo

    monkeypatch.setattr(tt, "ref_cache_dir", lambda: tmp_path)
    run = create_run(_config(tmp_path, tiny_model_path, "planted"))
    assert run_stages(run, stages=["preference_data", "reference_init"]).stages[1].verdict \
        .gate("initial_kl").value == 0.0
    real = dpo.build_policy

    def planted(ctx, ref_model):
        policy = real(ctx, ref_model)
        with torch.no_grad():
            policy.model.norm.weight.mul_(3.0)
        return policy

    monkeypatch.setattr(dpo, "build_policy", planted)
    status = run_stages(run, stages=["dpo"])
    v = next(s.verdict for s in status.stages if s.name == "dpo")
    step0 = v.findings["checks"][0]
    assert step0["step"] == 0 and step0["source"] == "measured at the start of stage 5"
    assert step0["kl"] > 1e-3
    assert any("the policy stage 5 starts from is not the reference" in w for w in v.warnings)
