"""Conformance with the official MCP Inspector CLI (npm @modelcontextprotocol/inspector).

Needs Node 22.19+ and an installed Inspector, so it runs only when MCP_INSPECTOR names
the folder where `npm install @modelcontextprotocol/inspector` was run (and the `node`
on PATH is new enough). Checks: `skills/list --verify` (SEP-2640 conformance and digest
checks) and `tools/list --strict` (no error-severity schema portability problem).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

INSPECTOR = os.environ.get("MCP_INSPECTOR")
pytestmark = pytest.mark.skipif(not INSPECTOR or not shutil.which("npx"),
                                reason="set MCP_INSPECTOR to an Inspector install folder")
REPO = Path(__file__).resolve().parents[1]


def _inspect(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["npx", "mcp-inspector", "--cli", "--cwd", str(REPO), *args, sys.executable, "-m",
           "realign_mcp.server"]
    return subprocess.run(cmd, cwd=INSPECTOR, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_skills_verify(era: str) -> None:
    r = _inspect("--protocol-era", era, "--method", "skills/list", "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"outcome":"verified"' in r.stdout and "no conformance errors" in r.stdout + r.stderr


def test_tools_strict() -> None:
    r = _inspect("--method", "tools/list", "--strict")
    assert r.returncode == 0, r.stderr
    for name in ("validate_preference_data", "calculate_ifd_score", "evaluate_benchmarks",
                 "calibrate_hardware", "rollback", "generate_report"):
        assert f'"{name}"' in r.stdout, name
    assert "portability error" not in r.stderr, r.stderr
