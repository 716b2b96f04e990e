"""Small adapters shared by the tool modules: errors to ToolError, threads to progress,
library messages to MCP wording."""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field, ValidationError
from realign.errors import RealignError

from .paths import PathNotAllowed

T = TypeVar("T")
log = logging.getLogger("realign_mcp")

#: Exceptions a user's input can cause; they become ToolError with the library's message.
EXPECTED = (RealignError, PathNotAllowed, OSError, ValueError)

#: Gate threshold overrides as tool arguments: finite numbers only (NaN or infinity would
#: make every comparison false and break the verdict's JSON).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
OverridesArg = Annotated[dict[str, FiniteFloat], Field(
    description="override gate thresholds (finite numbers), e.g. {\"min_pairs\": 500}; "
                "call get_thresholds for names")]


def check_finite(overrides: Mapping[str, Any], what: str = "thresholds") -> None:
    """ToolError for a threshold override that is not a finite number."""
    for name, value in overrides.items():
        try:
            ok = math.isfinite(float(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ToolError(f"{what}.{name}: {value!r} is not a finite number")


# ------------------------------------------------------------------ CLI words to MCP tools
#: ``realign <command>`` (as library messages name it) -> the MCP tool that does the same.
CLI_TOOLS: dict[str, str] = {
    "run": "start_pipeline",
    "resume": "resume_run",
    "stage": "run_stage",
    "status": "run_status",
    "runs": "list_runs",
    "rollback": "rollback",
    "report": "generate_report",
    "validate": "validate_preference_data",
    "thresholds": "get_thresholds",
    "calibrate": "calibrate_hardware",
    "eval": "evaluate_benchmarks",
    "ifd": "calculate_ifd_score",
    "kl": "compute_kl",
    "init": "create_run_config",
    "verify": "assess_rlvr_verifiability",
}
#: Commands also translated without backticks (the others are common words after
#: "realign", e.g. "where realign runs").
_BARE = ("resume", "rollback", "report", "stage", "status", "validate", "thresholds",
         "calibrate", "init")
_QUOTED = re.compile(r"`+realign ([a-z][a-z-]*)((?: [^`]*)?)`+")
_BARE_RE = re.compile(r"\brealign (?:stage ([a-z_]+)|(" + "|".join(_BARE) + r"))\b"
                      r"((?: (?:RUN|--run RUN|--[a-z-]+(?: [A-Z][A-Z_.]*)?)\b)*)")


def _tool_for(command: str, rest: str) -> str | None:
    words = rest.split()
    if command == "validate" and "--reward-model" in words:
        return "`score_preference_gap`"
    if command == "validate" and "--write-clean" in words:
        return "`clean_preference_data`" + (" with eval_sets" if "--eval" in words else "")
    if command == "validate" and "--eval" in words:
        return "`validate_preference_data` with eval_sets"
    if command == "init" and "--calibrate" in words:
        return "`create_run_config` with calibrate: true"
    if command == "eval" and "--list" in words:
        return "`list_suites`"
    if command == "run" and any("=" in w for w in words):
        sets = [w for w in words if "=" in w and not w.startswith("-")]
        return f"`start_pipeline` with overrides {sets!r}"
    if command == "stage" and words and not words[0].startswith("-"):
        return f"`run_stage` with stage '{words[0]}'"
    tool = CLI_TOOLS.get(command)
    return None if tool is None else f"`{tool}`"


def for_mcp(text: str) -> str:
    """``text`` with the CLI commands it names replaced by the MCP tools that do the same
    (``use `realign resume``` -> ``use `resume_run```): an agent over MCP has no shell."""

    def quoted(m: re.Match[str]) -> str:
        return _tool_for(m.group(1), m.group(2)) or m.group(0)

    def bare(m: re.Match[str]) -> str:
        if m.group(1):
            return _tool_for("stage", m.group(1)) or m.group(0)
        return _tool_for(m.group(2), m.group(3)) or m.group(0)

    return _BARE_RE.sub(bare, _QUOTED.sub(quoted, text))


def remedies_for_mcp(result: T) -> T:
    """``result`` with the remedy of every gate result in it (at any depth of pydantic
    models, lists and dicts) in MCP wording (:func:`for_mcp`). Changes ``result`` in
    place and returns it."""
    from pydantic import BaseModel
    from realign.gates import GateResult

    def walk(obj: Any) -> None:
        if isinstance(obj, GateResult):
            if obj.remedy:
                obj.remedy = for_mcp(obj.remedy)
        elif isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                walk(getattr(obj, name, None))
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                if isinstance(x, (BaseModel, list, tuple, dict)):
                    walk(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                if isinstance(x, (BaseModel, list, tuple, dict)):
                    walk(x)

    walk(result)
    return result


# ------------------------------------------------------------------ errors
def describe(exc: BaseException) -> str:
    """One line for the agent: the library's message, or what went wrong and where."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown argument"
            parts.append(f"{where}: {msg}" if where else msg)
        return "; ".join(parts)
    if isinstance(exc, ToolError):
        return str(exc)
    if isinstance(exc, OSError) and not isinstance(exc, RealignError) and exc.filename:
        what = {IsADirectoryError: "is a folder, not a file",
                NotADirectoryError: "is not a folder",
                FileNotFoundError: "no such file or folder",
                PermissionError: "permission denied"}.get(type(exc), exc.strerror or str(exc))
        return f"{exc.filename}: {what}"
    if isinstance(exc, (RealignError, ValueError, OSError)):
        return str(exc) or type(exc).__name__
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def tool_error(exc: BaseException) -> ToolError:
    """The agent-facing error for a failure (the library message, one line, MCP wording)."""
    if not isinstance(exc, (*EXPECTED, ValidationError, ToolError)):
        log.error("unexpected error", exc_info=exc)  # the traceback stays in the server log
    return ToolError(for_mcp(describe(exc)))


async def run_blocking(
    fn: Callable[..., T],
    *args: Any,
    ctx: Context | None = None,
    progress_kw: str | None = None,
    min_interval: float = 0.25,
    check: Callable[[], None] | None = None,
    **kwargs: Any,
) -> T:
    """Run ``fn`` in a worker thread; its errors become :class:`ToolError` with their message.

    With ``progress_kw`` the function receives a ``(done, total)`` callback under that
    keyword, forwarded to ``ctx.report_progress``: every new message and the final step,
    and repeats of the same message at most every ``min_interval`` seconds. ``check`` is
    called at every progress update, in the worker thread, before anything is forwarded:
    it may raise to stop the work (a cancelled job).
    """
    if progress_kw is not None and (ctx is not None or check is not None):
        last: list[Any] = [0.0, object()]  # time, message of the last forwarded update

        def progress(done: float, total: float | None = None, message: str | None = None) -> None:
            if check is not None:
                check()
            if ctx is None:
                return
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
    except Exception as exc:  # noqa: BLE001 - every error reaches the agent with its message
        raise tool_error(exc) from exc
