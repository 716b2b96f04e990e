"""Streamable HTTP beyond loopback (issue 14, item 5), and run ids over HTTP (item 1).

``--host`` other than loopback needs a bearer token (``--token`` or REALIGN_MCP_TOKEN)
and the server refuses to start without one; Host and Origin headers are checked
against the allowed hosts (DNS-rebinding protection, ``--allowed-host`` adds names).
The server binds 0.0.0.0 here, but every request goes to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="needs the mcp extra (pip install -e '.[mcp]')")
httpx2 = pytest.importorskip("httpx2")
from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs.jsonl"
TOKEN = "test-token-0123456789abcdef"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "test", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REALIGN_MCP_TOKEN"}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "realign_mcp.server", "--http", *args],
                            cwd=str(cwd), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_non_loopback_without_token_refuses_to_start(tmp_path: Path, host: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "realign_mcp.server", "--http", "--host", host, "--port",
         str(_free_port())], cwd=str(tmp_path), env=_env(), capture_output=True, timeout=60,
        check=False)
    assert proc.returncode == 2, proc.stderr.decode()
    err = proc.stderr.decode()
    assert "REALIGN_MCP_TOKEN" in err and "token" in err and "Traceback" not in err


@pytest.fixture
def public_server(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    """realign-mcp --http --host 0.0.0.0 with a token from the environment and one extra
    allowed host; yields (url on 127.0.0.1, port, root)."""
    root = tmp_path / "root"
    root.mkdir()
    port = _free_port()
    proc = _serve(["--host", "0.0.0.0", "--port", str(port), "--root", str(root),
                   "--allowed-host", "proxy.example"], tmp_path, _env(REALIGN_MCP_TOKEN=TOKEN))
    try:
        _wait_listening(proc, port)
        yield f"http://127.0.0.1:{port}/mcp", port, root
    finally:
        _stop(proc)


def _post(url: str, headers: dict[str, str]) -> Any:
    with httpx2.Client(timeout=30) as h:
        return h.post(url, content=json.dumps(INIT), headers={**MCP_HEADERS, **headers})


def test_public_bind_requires_the_token_and_checks_host_and_origin(
        public_server: tuple[str, int, Path]) -> None:
    url, port, _ = public_server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert _post(url, {}).status_code == 401
    assert _post(url, {"Authorization": "Bearer wrong"}).status_code == 401
    assert _post(url, {"Authorization": TOKEN}).status_code == 401  # no scheme
    assert _post(url, {**auth, "Host": f"evil.example:{port}"}).status_code == 421
    assert _post(url, {**auth, "Origin": "http://evil.example"}).status_code == 403
    assert _post(url, auth).status_code == 200
    assert _post(url, {**auth, "Origin": f"http://127.0.0.1:{port}"}).status_code == 200
    assert _post(url, {**auth, "Host": f"proxy.example:{port}"}).status_code == 200
    assert _post(url, {**auth, "Host": "proxy.example"}).status_code == 200


async def test_public_bind_serves_tools_with_the_token_and_confines_run_ids(
        public_server: tuple[str, int, Path]) -> None:
    url, _, root = public_server
    (root / "p.jsonl").write_bytes(PAIRS.read_bytes())
    (root / "run.yaml").write_text("data: p.jsonl\nstages: [preference_data]\n")
    (root / "esc.yaml").write_text("data: p.jsonl\nstages: [preference_data]\nrun_id: ../../y\n")
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=httpx2.Timeout(30, read=300))
    async with http, Client(streamable_http_client(url, http_client=http)) as c:
        ok = await c.call_tool("validate_preference_data", {"path": "p.jsonl"})
        errs = [await c.call_tool("start_pipeline", {"config_path": "run.yaml", "run_id": bad})
                for bad in ("../../x", "/tmp/x", ".", "..")]
        esc = await c.call_tool("start_pipeline", {"config_path": "esc.yaml"})
    assert not ok.is_error
    for e in errs:
        assert e.is_error and "not a run name" in e.content[0].text, e.content
    assert esc.is_error and "esc.yaml:3" in esc.content[0].text
    assert sorted(p.name for p in root.parent.iterdir()) == ["root"]
    assert not (root / "runs").exists() or not any((root / "runs").iterdir())


def test_loopback_with_a_token_enforces_it(tmp_path: Path) -> None:
    port = _free_port()
    proc = _serve(["--port", str(port), "--token", TOKEN], tmp_path, _env())
    try:
        _wait_listening(proc, port)
        url = f"http://127.0.0.1:{port}/mcp"
        assert _post(url, {}).status_code == 401
        assert _post(url, {"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert _post(url, {"Authorization": f"Bearer {TOKEN}",
                           "Host": "evil.example"}).status_code == 421
    finally:
        _stop(proc)


def test_security_settings() -> None:
    from realign_mcp.server import is_loopback, transport_security

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.2")
    ts = transport_security("10.0.0.2", ["mcp.example.org:443"], ["https://app.example"])
    assert ts.enable_dns_rebinding_protection
    assert {"10.0.0.2", "10.0.0.2:*", "127.0.0.1:*", "mcp.example.org:443"} <= set(ts.allowed_hosts)
    assert "mcp.example.org:*" not in ts.allowed_hosts
    assert {"https://app.example", "http://10.0.0.2:*"} <= set(ts.allowed_origins)
