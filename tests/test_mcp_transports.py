"""The server over real transports: stdio in a subprocess, streamable HTTP on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mcp", reason="needs the mcp extra (pip install -e '.[mcp]')")
from mcp import Client, StdioServerParameters  # noqa: E402

from realign_mcp.skills import EXTENSION_ID  # noqa: E402

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs.jsonl"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


async def test_stdio_subprocess() -> None:
    params = StdioServerParameters(command=sys.executable, args=["-m", "realign_mcp.server"],
                                   cwd=str(REPO), env=_env())
    async with Client(params, mode="legacy") as c:
        assert c.protocol_version == "2025-11-25"
        # the skills extension is declared on the older handshake too
        assert EXTENSION_ID in (c.server_capabilities.extensions or {})
        tools = {t.name for t in (await c.list_tools()).tools}
        res = await c.call_tool("validate_preference_data", {"path": "examples/pairs.jsonl"})
    assert "validate_preference_data" in tools
    assert not res.is_error
    assert {g["name"]: g["value"] for g in res.structured_content["gates"]}["min_pairs"] == 1075
    # without eval sets the 2 contaminated pairs count as usable (1073 + 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "root"
    root.mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "realign_mcp.server", "--http", "--port", str(port),
         "--root", str(root)], cwd=str(tmp_path), env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp", root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_streamable_http_loopback_with_confinement(http_server: tuple[str, Path]) -> None:
    url, root = http_server
    (root / "p.jsonl").write_bytes(PAIRS.read_bytes())
    async with Client(url) as c:
        ok = await c.call_tool("check_decontamination",
                               {"path": "p.jsonl", "eval_sets": [str(REPO / "examples" / "eval.jsonl")]})
        inside = await c.call_tool("validate_preference_data", {"path": "p.jsonl"})
        outside = await c.call_tool("validate_preference_data", {"path": str(PAIRS)})
        dots = await c.call_tool("validate_preference_data", {"path": "../root/p.jsonl"})
        skill = await c.read_resource("skill://realign-dpo-workflow/SKILL.md")
    assert ok.is_error and "outside the allowed roots" in ok.content[0].text  # eval set outside
    assert not inside.is_error and inside.structured_content["stage"] == "preference_data"
    assert outside.is_error and "outside the allowed roots" in outside.content[0].text
    assert dots.is_error and "'..'" in dots.content[0].text
    assert skill.contents[0].text.startswith("---")


def test_http_binds_loopback_by_default() -> None:
    import typer.main

    from realign_mcp.server import cli

    params = {p.name: p for p in typer.main.get_command(cli).params}
    assert params["host"].default == "127.0.0.1"
    assert params["http"].default is False  # stdio unless asked
