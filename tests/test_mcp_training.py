"""compute_kl over MCP on a tiny random llama: 0 for a model against itself, > 0 after a
perturbation, and the same number as the library's kl_on_probe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
from mcp import Client  # noqa: E402

from realign_mcp.server import build_server  # noqa: E402
from realign_mcp.training_tools import available  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.integration,
              pytest.mark.skipif(not available(), reason="TRL backend not installed")]

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs.jsonl"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def perturbed(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("perturbed")
    shutil.copytree(tiny_model_path, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_path))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(out))
    return out


async def test_compute_kl(tiny_model_path: Path, perturbed: Path) -> None:
    from realign.backends.trl import TRLBackend, kl_on_probe
    from realign.rows import read_rows, to_trl_row

    args = {"probe": str(PAIRS), "max_examples": 6, "device": "cpu"}
    progress: list[str | None] = []

    async def on_progress(p: float, total: float | None, msg: str | None) -> None:
        progress.append(msg)

    async with Client(build_server()) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        assert tools["compute_kl"].annotations.read_only_hint is True
        same = await c.call_tool("compute_kl", {**args, "policy": str(tiny_model_path),
                                                "reference": str(tiny_model_path)})
        diff = await c.call_tool("compute_kl", {**args, "policy": str(perturbed),
                                                "reference": str(tiny_model_path)},
                                 progress_callback=on_progress)
        missing = await c.call_tool("compute_kl", {**args, "policy": str(perturbed),
                                                   "reference": str(tiny_model_path),
                                                   "probe": "no-such.jsonl"})
    assert not same.is_error and not diff.is_error, (same.content, diff.content)
    s, d = same.structured_content, diff.structured_content
    assert abs(s["mean_per_token"]) < 1e-6 and s["gate"]["status"] == "pass"
    assert s["examples"] == 6 and len(s["per_sequence"]) == 6 and s["tokens"] > 0
    assert d["mean_per_token"] > 1e-3 and d["gate"]["value"] == d["mean_per_token"]
    assert d["gate"]["name"] == "kl_divergence" and d["gate"]["threshold"] == 0.1
    assert "measuring KL on 6 pairs" in progress
    assert missing.is_error and "no-such.jsonl" in missing.content[0].text
    # the same number as the library function on the same rows
    rows = [to_trl_row(r) for r in read_rows(PAIRS)][:6]
    b = TRLBackend()
    ref = b.load(tiny_model_path, device="cpu")
    lib = kl_on_probe(b.load(perturbed, device="cpu"), ref, [r["prompt"] for r in rows],
                      [r["chosen"] for r in rows])
    assert d["mean_per_token"] == pytest.approx(lib.mean, rel=1e-6)
