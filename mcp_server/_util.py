"""Small adapters shared by the tool modules: errors to ToolError, threads to progress."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import ValidationError
from realign.errors import RealignError

from .paths import PathNotAllowed

T = TypeVar("T")

#: Exceptions a user's input can cause; they become ToolError with the library's message.
EXPECTED = (RealignError, PathNotAllowed, FileNotFoundError, FileExistsError, ValueError)


def tool_error(exc: BaseException) -> ToolError:
    """The agent-facing error for an expected failure (the library message, one line)."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return ToolError(f"{where}: {first['msg']}" if where else first["msg"])
    return ToolError(str(exc))


async def run_blocking(
    fn: Callable[..., T],
    *args: Any,
    ctx: Context | None = None,
    progress_kw: str | None = None,
    min_interval: float = 0.25,
    **kwargs: Any,
) -> T:
    """Run ``fn`` in a worker thread; expected errors become :class:`ToolError`.

    With ``progress_kw`` the function receives a ``(done, total)`` callback under that
    keyword, forwarded to ``ctx.report_progress``: every new message and the final step,
    and repeats of the same message at most every ``min_interval`` seconds.
    """
    if ctx is not None and progress_kw is not None:
        last: list[Any] = [0.0, object()]  # time, message of the last forwarded update

        def progress(done: float, total: float | None = None, message: str | None = None) -> None:
            now = time.monotonic()
            final = total is not None and done >= total
            if not final and message == last[1] and now - last[0] < min_interval:
                return
            last[0], last[1] = now, message
            try:
                anyio.from_thread.run(ctx.report_progress, float(done),
                                      None if total is None else float(total), message)
            except Exception:  # noqa: BLE001 - a lost progress message must not fail the work
                pass

        kwargs[progress_kw] = progress
    try:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
    except EXPECTED as exc:
        raise tool_error(exc) from exc
