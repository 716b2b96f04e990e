"""``realign kl``: KL of a model with itself is 0 (gate passes), the JSON equals the library's
kl_between, and bad input exits 2 naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from realign.cli import app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs.jsonl"


def test_kl_cli(tiny_model_path: Path, tmp_path: Path) -> None:
    from realign.backends.trl import kl_between
    from realign.gates import Thresholds

    runner = CliRunner()
    args = ["kl", str(tiny_model_path), "--probe", str(PAIRS), "--reference", str(tiny_model_path),
            "--max-examples", "3", "--device", "cpu"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert abs(got["mean_per_token"]) < 1e-6 and got["examples"] == 3 and got["tokens"] > 0
    assert got["gate"]["name"] == "kl_divergence" and got["gate"]["status"] == "pass"
    # a threshold below the measured value fails the gate: exit 1
    r = runner.invoke(app, [*args, "--threshold", "kl_divergence=-1", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["gate"]["status"] == "fail"
    lib = kl_between(tiny_model_path, PAIRS, tiny_model_path, max_examples=3, device="cpu",
                     thresholds=Thresholds(overrides={"kl_divergence": -1}))
    assert json.loads(r.stdout)["tokens"] == lib.tokens
    r = runner.invoke(app, ["kl", str(tiny_model_path), "--probe", str(tmp_path / "no.jsonl")])
    assert r.exit_code == 2 and "no.jsonl" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, [*args, "--completion", "both"])
    assert r.exit_code == 2 and "--completion" in r.output
