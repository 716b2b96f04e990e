"""Pipeline tools over MCP: blocking run with progress, start/poll, busy run directories,
run verdict resources. Uses stage 2 only (preference data), so no model is loaded."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("mcp", reason="needs the mcp extra (pip install -e '.[mcp]')")
from mcp import Client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

pytest.importorskip("realign.pipeline")

from realign_mcp.jobs import JobManager  # noqa: E402
from realign_mcp.paths import PathPolicy  # noqa: E402
from realign_mcp.server import build_server  # noqa: E402
from mcp_helpers import call  # noqa: E402

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs.jsonl"
EVAL = REPO / "examples" / "eval.jsonl"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(tmp_path: Path, **extra: Any) -> Path:
    cfg = {"data": str(PAIRS), "eval_sets": [str(EVAL)], "stages": ["preference_data"],
           "thresholds": {"min_pairs": 500}, **extra}
    p = tmp_path / "run.yaml"
    p.write_text(json.dumps(cfg))  # JSON is YAML
    return p


async def test_run_pipeline_blocking_with_progress(tmp_path: Path) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(p: float, total: float | None, msg: str | None) -> None:
        seen.append((p, total, msg))

    server = build_server(runs_dir=tmp_path / "runs")
    async with Client(server) as c:
        st = await call(c, "run_pipeline", {"config_path": str(config(tmp_path)), "run_id": "r1"},
                        progress_callback=on_progress)
        listed = await call(c, "list_runs", {})
        verdict = json.loads((await c.read_resource(
            "realign://runs/r1/stages/preference_data/verdict.json")).contents[0].text)
        same = json.loads((await c.read_resource(
            "realign://runs/r1/stages/2-preference_data/verdict.json")).contents[0].text)
        run_json = json.loads((await c.read_resource("realign://runs/r1/run.json")).contents[0].text)
    assert st["run_id"] == "r1" and st["state"] == "passed"
    (stage,) = st["stages"]
    assert stage["name"] == "preference_data" and stage["status"] == "pass"
    gates = {g["name"]: g for g in stage["verdict"]["gates"]}
    assert gates["min_pairs"]["value"] == 1073 and gates["min_pairs"]["threshold"] == 500
    assert verdict == same and verdict["findings"]["contaminated"] == [71, 81]
    assert run_json["run_id"] == "r1"
    assert [r["run_id"] for r in listed["runs"]] == ["r1"]
    assert any("preference data" in (m or "") for _, _, m in seen), seen
    assert st["job"]["kind"] == "run" and st["job"]["running"] is False


async def test_start_then_poll(tmp_path: Path) -> None:
    server = build_server(runs_dir=tmp_path / "runs")
    async with Client(server) as c:
        t0 = time.monotonic()
        st = await call(c, "start_pipeline", {"config_path": str(config(tmp_path)),
                                              "run_id": "bg"})
        assert st["run_id"] == "bg" and st["state"] in ("created", "running", "passed")
        with anyio.fail_after(60):
            while True:
                st = await call(c, "run_status", {"run": "bg"})
                if not st["job"]["running"]:
                    break
                await anyio.sleep(0.2)
        assert time.monotonic() - t0 < 60
        by_path = await call(c, "run_status", {"run": str(tmp_path / "runs" / "bg")})
        missing = await c.call_tool("run_status", {"run": "nope"})
    assert st["state"] == "passed" and st["job"]["error"] is None
    assert st["stages"][0]["verdict"]["status"] == "pass"
    assert by_path["run_id"] == "bg"
    assert missing.is_error and "nope" in missing.content[0].text


async def test_failed_gate_stops_run_as_a_result(tmp_path: Path) -> None:
    server = build_server(runs_dir=tmp_path / "runs")
    cfg = config(tmp_path, thresholds={"min_pairs": 5000})
    async with Client(server) as c:
        st = await call(c, "run_pipeline", {"config_path": str(cfg), "run_id": "f"})
    assert st["state"] == "failed" and "min_pairs" in st["message"]
    assert st["stages"][0]["status"] == "fail"


async def test_one_job_per_run_directory(tmp_path: Path) -> None:
    jobs = JobManager()
    server = build_server(runs_dir=tmp_path / "runs", jobs=jobs)
    async with Client(server) as c:
        await call(c, "run_pipeline", {"config_path": str(config(tmp_path)), "run_id": "busy"})
        run_dir = tmp_path / "runs" / "busy"
        # a job of this server holds the run
        with jobs.claim(run_dir, "stage:dpo"):
            res = await c.call_tool("resume_run", {"run": "busy"})
            assert res.is_error
            assert "busy" in res.content[0].text and "stage:dpo" in res.content[0].text
            res = await c.call_tool("run_stage", {"run": "busy", "stage": "preference_data"})
            assert res.is_error and "stage:dpo" in res.content[0].text
        # a job of another process holds the run (lock file with a live pid)
        (run_dir / "run.lock").write_text(json.dumps(
            {"pid": os.getppid(), "job": "resume", "since": "2026-01-01T00:00:00"}))
        res = await c.call_tool("resume_run", {"run": "busy"})
        assert res.is_error and "'resume'" in res.content[0].text
        assert f"pid {os.getppid()}" in res.content[0].text
        # a stale lock (dead pid) does not block
        (run_dir / "run.lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "job": "old"}))
        st = await call(c, "run_stage", {"run": "busy", "stage": "preference_data",
                                         "force": True})
        assert st["state"] == "passed"


async def test_pipeline_paths_are_confined(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    cfg = config(root)  # names PAIRS, outside the root
    async with Client(build_server(policy=PathPolicy.confined([root]))) as c:
        res = await c.call_tool("start_pipeline", {"config_path": "run.yaml"})
        assert res.is_error and "outside the allowed roots" in res.content[0].text
        res = await c.call_tool("start_pipeline", {"config_path": str(tmp_path / "x.yaml")})
        assert res.is_error and "outside" in res.content[0].text
    assert cfg.exists() and not (root / "runs").exists()


async def test_run_resources_reject_traversal(tmp_path: Path) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "run.json").write_text("{}")
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        for uri in ("realign://runs/..%2Fsecret/run.json", "realign://runs/x/stages/..%2F..%2Fsecret/verdict.json",
                    "realign://runs/missing/run.json"):
            with pytest.raises(MCPError):
                await c.read_resource(uri)


@pytest.mark.integration
async def test_tiny_model_stage_reports_progress(tmp_path: Path, tiny_model_path: Path) -> None:
    pytest.importorskip("torch")
    seen: list[str | None] = []

    async def on_progress(p: float, total: float | None, msg: str | None) -> None:
        seen.append(msg)

    cfg = config(tmp_path, model=str(tiny_model_path), stages=["preference_data", "reference_init"],
                 device="cpu")
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        st = await call(c, "run_pipeline", {"config_path": str(cfg), "run_id": "tiny"},
                        progress_callback=on_progress)
    stages = {s["name"]: s for s in st["stages"]}
    init = {g["name"]: g for g in stages["reference_init"]["verdict"]["gates"]}["initial_kl"]
    assert init["status"] == "pass" and init["value"] < 1e-4
    assert "loading reference" in seen and "measuring initial KL" in seen
