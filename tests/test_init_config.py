"""``realign init`` and the MCP tool ``create_run_config`` (issue 17, item 2): a commented
run config, this machine's batch size, checked, never overwriting without --force; its
output runs stage 2 on the sample; over MCP it is confined to the roots, and an agent
creates a config, starts, polls, cancels and resumes a run with tools only."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from realign.cli import app
from realign.config import RunConfig, load_config
from typer.testing import CliRunner
from mcp_helpers import call, call_error, poll  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "examples" / "pairs.jsonl"
EVAL = ROOT / "examples" / "eval.jsonl"
runner = CliRunner()


def init(tmp_path: Path, *args: str) -> Any:
    return runner.invoke(app, ["init", *args], env={"COLUMNS": "200"}, catch_exceptions=False)


# --------------------------------------------------------------------------- the file
def test_init_writes_a_commented_config_that_loads_and_runs_stage2(tmp_path):
    from realign.pipeline import run_pipeline

    out = tmp_path / "cfg" / "run.yaml"
    r = init(tmp_path, "--data", str(PAIRS), "--output", str(out), "--preset", "standard",
             "stages=[preference_data]", f"eval_sets=[{EVAL}]", "thresholds.min_pairs=500",
             f"output_dir={tmp_path / 'runs'}")
    assert r.exit_code == 0, r.output
    assert f"next: realign run --config {out}" in " ".join(r.output.split())
    text = out.read_text()
    cfg = load_config(out)
    assert cfg.data == str(PAIRS) and cfg.stages == ["preference_data"]
    assert cfg.thresholds == {"min_pairs": 500} and cfg.eval_sets == [str(EVAL)]
    # every field of the schema is written, each under a comment from its description
    lines = text.splitlines()
    keys = [i for i, ln in enumerate(lines) if ln and not ln.lstrip().startswith("#")]
    for i in keys:
        assert lines[i - 1].lstrip().startswith("#"), f"no comment above {lines[i]!r}"
    written = yaml.safe_load(text)
    assert set(written) == set(RunConfig.model_fields)
    assert set(written["dpo"]) == set(RunConfig.model_fields["dpo"].annotation.model_fields)
    assert "# Peak learning rate (> 0)." in text  # dpo.learning_rate's description
    assert "This machine:" in text and "DPO batch: dpo.batch_size 4" in text
    # it runs: stage 2 on the sample through the library
    st = run_pipeline(cfg)
    assert st.state == "passed", st.message
    (stage,) = st.stages
    assert stage.name == "preference_data" and stage.verdict.gate("min_pairs").value == 1073


def test_init_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "run.yaml"
    out.write_text("mine: true\n")
    r = init(tmp_path, "--output", str(out))
    assert r.exit_code == 2 and "--force" in r.output
    assert out.read_text() == "mine: true\n"
    r = init(tmp_path, "--output", str(out), "--force")
    assert r.exit_code == 0, r.output
    assert load_config(out).data.endswith("pairs.jsonl")
    assert "placeholder" in r.output  # no --data: the note says to set it
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]  # no temp file left


@pytest.mark.parametrize("args, needle", [
    (["dpo.beta=-1"], "dpo.beta=-1"),
    (["nope=1"], "unknown key 'nope'"),
    (["--preset", "lax"], "unknown preset"),
])
def test_init_bad_values_are_bad_input(tmp_path, args, needle):
    out = tmp_path / "run.yaml"
    r = init(tmp_path, "--output", str(out), *args)
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not out.exists()


def test_init_uses_this_machines_cached_calibration(tmp_path, monkeypatch):
    """A calibration cached for this hardware, model and length sets dpo.batch_size and
    the accumulation (here copied from a recorded sweep and keyed to this machine)."""
    from realign.hardware_calibrator import (
        cache_path,
        detect_hardware,
        load_calibration,
    )

    monkeypatch.setenv("REALIGN_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    hw = detect_hardware()
    rec = load_calibration(ROOT / "tests" / "calibration_data" / "h200-smollm2-s256.json")
    rec = rec.model_copy(update={"hardware": hw, "fingerprint": hw.fingerprint(),
                                 "device": hw.accelerator, "model": str(model)})
    path = cache_path(hw, str(model), 256, hw.accelerator)
    path.parent.mkdir(parents=True)
    path.write_text(rec.model_dump_json(by_alias=True))
    out = tmp_path / "run.yaml"
    r = init(tmp_path, "--model", str(model), "--data", str(PAIRS), "--output", str(out),
             "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    want = rec.recommendation
    assert res["batch"]["source"] == "cached calibration"
    assert res["batch"]["batch_size"] == want.per_device_batch
    cfg = load_config(out)
    assert cfg.dpo.batch_size == want.per_device_batch
    assert cfg.dpo.gradient_accumulation_steps == want.gradient_accumulation_steps
    assert cfg.model == str(model)
    # an explicit value wins over the measurement
    r = init(tmp_path, "--model", str(model), "--output", str(out), "--force",
             "dpo.batch_size=3")
    assert r.exit_code == 0 and load_config(out).dpo.batch_size == 3


def test_init_calibrate_measures_on_this_machine(tmp_path, monkeypatch):
    """--calibrate runs the calibrator's quick sweep for the model at dpo.max_length (the
    sweep itself is realign calibrate's, tested there; here a recorded result stands in)."""
    import realign.hardware_calibrator as hc

    rec = hc.load_calibration(ROOT / "tests" / "calibration_data" / "h200-smollm2-s256.json")
    seen: dict[str, Any] = {}

    def fake(model: str, **kw: Any) -> Any:
        seen.update(kw, model=model)
        kw["progress"]("batch size 1: 1 warm-up + 2 measured steps")
        return rec

    monkeypatch.setattr(hc, "calibrate", fake)
    out = tmp_path / "run.yaml"
    r = init(tmp_path, "--output", str(out), "--calibrate", "dpo.max_length=128")
    assert r.exit_code == 0, r.output
    assert seen["model"] == "default" and seen["seq_len"] == 128 and seen["quick"] is True
    assert f"dpo.batch_size {rec.recommendation.per_device_batch}" in r.output
    assert "(calibrated)" in r.output
    assert load_config(out).dpo.batch_size == rec.recommendation.per_device_batch


def test_paths_are_relative_to_the_config_when_below_it(tmp_path):
    from realign.init_config import write_run_config

    (tmp_path / "data").mkdir()
    data = shutil.copy(PAIRS, tmp_path / "data" / "pairs.jsonl")
    res = write_run_config(tmp_path / "run.yaml", data=str(data))
    assert yaml.safe_load(res.text)["data"] == "data/pairs.jsonl"
    assert load_config(tmp_path / "run.yaml").data == str(data)


# --------------------------------------------------------------------------- MCP
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client(server: Any) -> Any:
    pytest.importorskip("mcp", reason="needs the mcp extra (pip install -e '.[mcp]')")
    from mcp import Client

    return Client(server)


@pytest.mark.anyio
async def test_create_run_config_is_confined_to_the_roots(tmp_path):
    pytest.importorskip("mcp", reason="needs the mcp extra (pip install -e '.[mcp]')")
    from realign_mcp.paths import PathPolicy
    from realign_mcp.server import build_server

    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(PAIRS, root / "pairs.jsonl")
    server = build_server(policy=PathPolicy.confined([root]))
    async with client(server) as c:
        errs = [
            await call_error(c, "create_run_config", {"output": str(tmp_path / "out.yaml")}),
            await call_error(c, "create_run_config", {"output": "../out.yaml"}),
            await call_error(c, "create_run_config", {"output": "run.yaml",
                                                      "data": str(PAIRS)}),
            await call_error(c, "create_run_config", {"output": "run.yaml",
                                                      "overrides": [f"eval_sets=[{EVAL}]"]}),
            await call_error(c, "create_run_config", {"output": "run.yaml",
                                                      "overrides": ["output_dir=/tmp"]}),
        ]
        ok = await call(c, "create_run_config", {"output": "run.yaml", "data": "pairs.jsonl"})
        again = await call_error(c, "create_run_config", {"output": "run.yaml"})
    for e in errs:
        assert "outside the allowed roots" in e or "contains '..'" in e, e
    assert sorted(p.name for p in root.iterdir()) == ["pairs.jsonl", "run.yaml"]
    assert not (tmp_path / "out.yaml").exists()
    assert ok["path"] == str(root / "run.yaml") and ok["next"].startswith("start_pipeline(")
    assert "data: pairs.jsonl" in ok["text"]  # relative to the config, inside the root
    assert "exists" in again and "force" in again


@pytest.mark.anyio
async def test_agent_creates_starts_polls_cancels_and_resumes_with_tools_only(
        tmp_path, monkeypatch):
    """The MCP-only path of workflow.md: create_run_config, start_pipeline, run_status,
    cancel_run, resume_run. Stage 2 is made slow (progress updates for up to a minute) so
    the cancel lands mid-stage; the agent's side is tool calls only."""
    pytest.importorskip("mcp", reason="needs the mcp extra (pip install -e '.[mcp]')")
    from realign import pipeline
    from realign_mcp.paths import PathPolicy
    from realign_mcp.server import build_server

    real = pipeline._RUNNERS["preference_data"]
    slow = {"on": True}

    def stage(ctx: Any) -> Any:
        end = time.monotonic() + 60
        i = 0
        while slow["on"] and time.monotonic() < end:
            ctx.progress(i, None, "slow stage")
            i += 1
            time.sleep(0.02)
        return real(ctx)

    monkeypatch.setitem(pipeline._RUNNERS, "preference_data", stage)
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(PAIRS, root / "pairs.jsonl")
    shutil.copy(EVAL, root / "eval.jsonl")
    async with client(build_server(policy=PathPolicy.confined([root]), runs_dir="runs")) as c:
        made = await call(c, "create_run_config", {
            "output": "run.yaml", "data": "pairs.jsonl",
            "overrides": ["stages=[preference_data]", "eval_sets=[eval.jsonl]",
                          "thresholds.min_pairs=500"]})
        started = await call(c, "start_pipeline", {"config_path": made["path"],
                                                   "run_id": "agent"})
        assert started["run_id"] == "agent"
        running = await poll(c, "agent", lambda s: s["state"] == "running"
                             and s["current_stage"] == "preference_data")
        assert running["job"]["running"]
        cancelled = await call(c, "cancel_run", {"run": "agent", "wait": 30})
        assert cancelled["state"] == "cancelled", cancelled
        assert "resume_run" in cancelled["message"]
        slow["on"] = False
        await call(c, "resume_run", {"run": "agent"})
        done = await poll(c, "agent", lambda s: not s["job"]["running"])
    assert done["state"] == "passed", done
    (st,) = done["stages"]
    assert st["status"] == "pass" and st["verdict"]["gates"][0]["value"] == 1073
    assert all(g["remedy"] is None for g in st["verdict"]["gates"])  # all passed
    assert (root / "runs" / "agent" / "report.md").is_file()
