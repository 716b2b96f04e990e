"""What the MCP tests share: a tool call that must succeed, one that must fail, polling
``run_status``. Imported by the test modules (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


async def call(c: Any, name: str, args: dict[str, Any], **kw: Any) -> Any:
    """The tool's structured result; fails the test when the tool returns an error."""
    res = await c.call_tool(name, args, **kw)
    assert not res.is_error, res.content
    return res.structured_content


async def call_error(c: Any, name: str, args: dict[str, Any]) -> str:
    """The tool's error text; fails the test when the tool succeeds."""
    res = await c.call_tool(name, args)
    assert res.is_error, res.structured_content
    return res.content[0].text  # type: ignore[no-any-return]


async def poll(c: Any, run: str, until: Callable[[dict[str, Any]], bool],
               timeout: float = 60) -> dict[str, Any]:
    """``run_status`` until ``until`` holds (a run not created yet is waited for too)."""
    import anyio

    with anyio.fail_after(timeout):
        while True:
            res = await c.call_tool("run_status", {"run": run})
            if not res.is_error and until(res.structured_content):
                return res.structured_content  # type: ignore[no-any-return]
            await anyio.sleep(0.05)
