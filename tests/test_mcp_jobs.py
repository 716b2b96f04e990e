"""Tool errors, background job errors and cancel_run over MCP (issue 14, item 6).

* a tool's failure reaches the client with its message (the SDK alone says only
  "Error executing tool X" for anything but a ToolError);
* a background job's error shows in run_status (state ``error`` and the message), not as
  a bare ``interrupted``;
* NaN thresholds and unknown arguments are bad input;
* ``cancel_run`` stops a running job at its next progress update; the run stays
  resumable and ``resume_run`` finishes it;
* messages name MCP tools, not CLI commands.

Stage 2 (preference data) only, so no model is loaded; a slow or failing stage is the
real one wrapped through the pipeline's stage table.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("mcp", reason="needs the mcp extra (pip install -e '.[mcp]')")
from mcp import Client  # noqa: E402
from mcp.server.mcpserver.exceptions import ToolError  # noqa: E402

pytest.importorskip("realign.pipeline")

from realign import pipeline  # noqa: E402
from realign_mcp.jobs import JobManager  # noqa: E402
from realign_mcp.server import build_server  # noqa: E402
from mcp_helpers import call, call_error, poll  # noqa: E402

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs.jsonl"
EVAL = REPO / "examples" / "eval.jsonl"
REAL_STAGE2 = pipeline._RUNNERS["preference_data"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(tmp_path: Path, **extra: Any) -> Path:
    cfg = {"data": str(PAIRS), "eval_sets": [str(EVAL)], "stages": ["preference_data"],
           "thresholds": {"min_pairs": 500}, **extra}
    p = tmp_path / "run.yaml"
    p.write_text(json.dumps(cfg))
    return p


def raising(exc: BaseException) -> Callable[[Any], Any]:
    def stage(ctx: Any) -> Any:
        ctx.progress(0, None, "about to fail")
        raise exc

    return stage


def slow(seconds: float = 60) -> Callable[[Any], Any]:
    """Stage 2, after ``seconds`` of progress updates (or until the job is cancelled)."""
    def stage(ctx: Any) -> Any:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            ctx.progress(i, None, "slow stage")
            i += 1
            time.sleep(0.02)
        return REAL_STAGE2(ctx)

    return stage


# --------------------------------------------------------------------------- errors
STAGE5 = "stage 5 needs stages 2 (train split) and 3 (KL probe) to have run"


@pytest.mark.parametrize("exc,expected", [
    (RuntimeError(STAGE5), STAGE5),
    (IsADirectoryError(21, "Is a directory", "/data/pairs"), "/data/pairs: is a folder"),
    (KeyError("chosen"), "KeyError: 'chosen'"),
])
async def test_tool_errors_carry_their_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               exc: BaseException, expected: str) -> None:
    monkeypatch.setitem(pipeline._RUNNERS, "preference_data", raising(exc))
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        err = await call_error(c, "run_pipeline", {"config_path": str(config(tmp_path)),
                                                   "run_id": "r"})
        again = await call_error(c, "run_stage", {"run": "r", "stage": "preference_data"})
    assert expected in err and expected in again
    assert not err.startswith("Error executing tool")


async def test_unexpected_os_error_of_a_tool_names_the_path(tmp_path: Path) -> None:
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        await call(c, "run_pipeline", {"config_path": str(config(tmp_path)), "run_id": "r"})
        report = tmp_path / "runs" / "r" / "report.md"
        report.unlink()
        report.mkdir()  # the report cannot be written
        err = await call_error(c, "generate_report", {"run": "r"})
    assert "report.md" in err and "folder" in err, err


async def test_background_job_error_shows_in_run_status(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(pipeline._RUNNERS, "preference_data", raising(RuntimeError(STAGE5)))
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        await call(c, "start_pipeline", {"config_path": str(config(tmp_path)), "run_id": "bg"})
        st = await poll(c, "bg", lambda s: not s["job"]["running"])
        listed = await call(c, "list_runs", {})
    assert st["state"] == "error" and STAGE5 in st["message"], st
    assert STAGE5 in st["job"]["error"] and st["job"]["cancelled"] is False
    assert listed["runs"][0]["state"] == "error"
    # on disk the run is interrupted, so resume_run (and the CLI) can continue it
    assert json.loads((tmp_path / "runs" / "bg" / "status.json").read_text())["state"] == "interrupted"


async def test_nan_thresholds_are_bad_input(tmp_path: Path) -> None:
    server = build_server(runs_dir=tmp_path / "runs")
    nan = {"min_pairs": math.nan}
    for tool, args in (("validate_preference_data", {"path": str(PAIRS), "thresholds": nan}),
                       ("check_decontamination", {"path": str(PAIRS), "eval_sets": [str(EVAL)],
                                                  "thresholds": {"decontamination": math.inf}})):
        with pytest.raises(ToolError, match="finite"):
            await server.call_tool(tool, args)  # NaN as a JSON client may send it
    cfg = tmp_path / "nan.yaml"
    cfg.write_text(f"data: {PAIRS}\nstages: [preference_data]\nthresholds:\n  min_pairs: .nan\n")
    async with Client(server) as c:
        err = await call_error(c, "start_pipeline", {"config_path": str(cfg), "run_id": "n"})
    assert "min_pairs" in err and "finite" in err
    assert not (tmp_path / "runs" / "n").exists()


async def test_unknown_arguments_are_refused(tmp_path: Path) -> None:
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        err = await call_error(c, "get_thresholds", {"preset": "strict", "presets": "x"})
        err2 = await call_error(c, "start_pipeline", {"config_path": str(config(tmp_path)),
                                                      "runid": "typo"})
    assert "unknown argument 'presets'" in err and "preset" in err
    assert "'runid'" in err2 and "run_id" in err2
    assert not (tmp_path / "runs").exists()
    assert all(t.input_schema.get("additionalProperties") is False for t in tools.values())


async def test_messages_name_mcp_tools_not_cli_commands(tmp_path: Path) -> None:
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        await call(c, "run_pipeline", {"config_path": str(config(tmp_path)), "run_id": "dup"})
        err = await call_error(c, "start_pipeline", {"config_path": str(config(tmp_path)),
                                                     "run_id": "dup"})
    assert "already exists" in err and "resume_run" in err and "realign resume" not in err


def test_for_mcp_translates_cli_commands() -> None:
    from realign_mcp._util import for_mcp

    assert for_mcp("use `realign resume` or another run_id") == \
        "use `resume_run` or another run_id"
    assert for_mcp("run `realign stage evaluation --run RUN` first") == \
        "run `run_stage` with stage 'evaluation' first"
    assert for_mcp("same as `realign rollback RUN`; then realign report RUN") == \
        "same as `rollback`; then `generate_report`"
    assert for_mcp("relative to where realign runs") == "relative to where realign runs"


# --------------------------------------------------------------------------- cancel_run
async def test_cancel_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(pipeline._RUNNERS, "preference_data", slow(120))
    run_dir = tmp_path / "runs" / "c"
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        await call(c, "start_pipeline", {"config_path": str(config(tmp_path)), "run_id": "c"})
        await poll(c, "c", lambda s: s["state"] == "running" and s["progress"])
        assert (run_dir / "run.lock").exists()
        t0 = time.monotonic()
        st = await call(c, "cancel_run", {"run": "c"})
        assert time.monotonic() - t0 < 10
        assert st["state"] == "cancelled" and "resume_run" in st["message"], st
        assert st["job"]["cancelled"] and st["job"]["cancel_requested"]
        assert not (run_dir / "run.lock").exists()  # the lock is released
        assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
        assert not any(run_dir.glob("stages/*/verdict.json"))
        again = await call_error(c, "cancel_run", {"run": "c"})
        assert "nothing to cancel" in again
        # resumable: the real stage now, and the run finishes
        monkeypatch.setitem(pipeline._RUNNERS, "preference_data", REAL_STAGE2)
        await call(c, "resume_run", {"run": "c"})
        st = await poll(c, "c", lambda s: not s["job"]["running"])
    assert st["state"] == "passed" and st["job"]["kind"] == "resume", st
    assert st["stages"][0]["status"] == "pass"


async def test_cancel_a_waiting_run_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(pipeline._RUNNERS, "preference_data", slow(120))
    jobs = JobManager()
    result: dict[str, Any] = {}
    async with Client(build_server(runs_dir=tmp_path / "runs", jobs=jobs)) as c:
        async def run() -> None:
            result.update(await call(c, "run_pipeline", {"config_path": str(config(tmp_path)),
                                                         "run_id": "w"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await poll(c, "w", lambda s: s["state"] == "running" and s["progress"])
            st = await call(c, "cancel_run", {"run": "w", "wait": 30})
        assert st["state"] == "cancelled"
    assert result["state"] == "cancelled" and result["job"]["cancelled"]


async def test_cancel_without_a_job(tmp_path: Path) -> None:
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        await call(c, "run_pipeline", {"config_path": str(config(tmp_path)), "run_id": "done"})
        err = await call_error(c, "cancel_run", {"run": "done"})
        missing = await call_error(c, "cancel_run", {"run": "nope"})
    assert "nothing to cancel" in err and "nope" in missing
