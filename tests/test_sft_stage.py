"""Stage 1 with an SFT dataset: TRL's SFTTrainer runs, the trained model becomes the base,
and perplexity is measured before and after on the SFT set's held-out part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from realign.config import RunConfig
from realign.pipeline import create_run, run_stages

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_sft_training_lowers_heldout_perplexity(tmp_path, tiny_model_path):
    sft = tmp_path / "sft.jsonl"
    # one repeated, learnable answer: SFT must lower its perplexity on held-out rows
    sft.write_text("".join(json.dumps({"prompt": f"Say the code word ({i}).",
                                       "completion": "The code word is banana."}) + "\n"
                           for i in range(60)))
    cfg = RunConfig(model=str(tiny_model_path), data=str(ROOT / "examples" / "pairs.jsonl"),
                    output_dir=str(tmp_path / "runs"), run_id="sft", stages=["sft_baseline"],
                    thresholds={"baseline_perplexity": 1e9},
                    sft={"dataset": str(sft), "max_steps": 30, "learning_rate": 3e-3,
                         "batch_size": 4, "max_length": 64})
    status = run_stages(create_run(cfg))
    v = status.stages[0].verdict
    before = v.findings["perplexity_before_sft"]
    after = v.gate("baseline_perplexity").value
    assert after < before / 10, (before, after)
    model_dir = Path(v.artifacts["model"])
    assert model_dir.parent.name == "1-sft_baseline" and (model_dir / "model.safetensors").exists()
    assert v.artifacts["model_digest"].startswith("sha256:")
