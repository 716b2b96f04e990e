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


def _sharp_model(tmp: Path) -> Path:
    """The tiny model with logits as large as a trained model's (final norm weight × 30):
    the tiny random model's near-uniform logits hide a bf16 rounding (step-0 KL 4e-7 at
    ×1, 1e-4 at ×50 through a bf16 autocast), SmolLM2-135M's do not (6.5e-4)."""
    from safetensors.torch import load_file, save_file

    from realign.testing import tiny_model

    model = tiny_model(tmp / "sharp-model", seed=0)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 30.0
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("lora", [{"r": 8, "target_modules": "all-linear"}, None],
                         ids=["lora", "full"])
def test_stage5_starts_at_the_reference_on_a_float32_model(tmp_path, monkeypatch, lora):
    """TRL's DPOConfig turns bf16 on by default, on every device; with the float32 model
    realign loads on a CPU, accelerate then ran the policy's forward under bf16 autocast, so
    the trainer's policy read KL 6.5e-4 at step 0 against its float32 reference on
    SmolLM2-135M (8e-5 on this model, in both cases). The trainer now runs a float32 model
    in float32, and the monitor measures the policy's own forward."""
    import math

    import realign.backends.trl_train as tt
    from realign.pipeline import create_run, run_stages

    monkeypatch.setattr(tt, "ref_cache_dir", lambda: tmp_path)
    model = _sharp_model(tmp_path)
    dpo_cfg = {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-6, "lora": lora}
    run = create_run(_config(tmp_path, model, "sharp", dpo=dpo_cfg))
    status = run_stages(run)
    v = next(s.verdict for s in status.stages if s.name == "dpo")
    step0 = v.findings["checks"][0]
    assert step0["step"] == 0
    assert step0["kl"] < 1e-7, step0  # was 8.2e-5 under bf16 autocast
    assert abs(step0["heldout_margin"]) < 1e-5, step0
    assert not any("not the reference" in w for w in v.warnings), v.warnings
    events = [json.loads(x) for x in (run / "stages" / "5-dpo" / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(e["loss"] for e in events if e.get("event") == "train_log" and "loss" in e)
    # the reference log-probs are the policy's own at step 0: every margin is 0, loss ln 2
    assert abs(first_loss - math.log(2)) < 1e-5, first_loss


def test_own_forward_measures_a_mixed_precision_policy_as_the_reference(tmp_path):
    """A trainer in bf16 mixed precision (dpo.extra: {bf16: true}, or a bf16 model on a GPU)
    leaves accelerate's autocast wrapper on the policy's forward. The monitor measures the
    policy's own forward inside ``own_forward``, and the wrapper is back on exit."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from realign.backends.encoding import encode_pair
    from realign.backends.trl import (
        TRLBackend,
        kl_on_probe,
        make_policy,
        own_forward,
        reference_distributions,
    )

    h = TRLBackend().load(_sharp_model(tmp_path), device="cpu")
    rows = [json.loads(x) for x in (ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:6]]
    enc = [encode_pair(h.tokenizer, r["prompt"], r["chosen"], 48) for r in rows]
    ref = reference_distributions(h, enc, batch_size=3)
    # a trainer earlier in the process left accelerate's (singleton) state without mixed
    # precision; reset it as transformers' TrainingArguments do, before and after
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        policy = Accelerator(cpu=True, mixed_precision="bf16").prepare_model(
            make_policy(h.model, None))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    wrapped = policy.forward

    def kl() -> float:
        return kl_on_probe(policy, ref, encoded=enc, tokenizer=h.tokenizer, batch_size=3).mean

    assert kl() > 1e-5  # through the autocast wrapper: bf16, not the float32 reference
    with own_forward(policy, ref, None):
        assert kl() < 1e-7
    assert policy.forward is wrapped and kl() > 1e-5
    with torch.no_grad():  # a model without a wrapper is left as it is
        plain = make_policy(h.model, None)
        with own_forward(plain):
            assert "forward" not in plain.__dict__
