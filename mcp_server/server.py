"""The realign MCP server: ``realign-mcp`` (stdio) or ``realign-mcp --http`` (streamable HTTP).

A thin adapter over the ``realign`` library, built on the official ``mcp`` SDK 2.x
(``MCPServer``). See README.md "MCP server" for client configuration.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import realign
import typer
from mcp.server.mcpserver import MCPServer

from . import (
    benchmark_tools,
    pipeline_tools,
    prompts,
    run_resources,
    training_tools,
    validators,
)
from .paths import PathPolicy
from .skills import ServedSkill, SkillsExtension, realign_skill

log = logging.getLogger("realign_mcp")

LOOPBACK = ("127.0.0.1", "localhost", "::1")

INSTRUCTIONS = """\
realign: DPO realignment with a measured quality gate after every stage.
Read the skill first: skill://realign-dpo-workflow/SKILL.md (resources/read; skills/list
gives its manifest). Validate preference data with validate_preference_data and
check_decontamination; get_thresholds shows every gate. Run the pipeline with
start_pipeline (returns a run id at once) and poll run_status; verdicts are also
resources realign://runs/<id>/stages/<k>-<name>/verdict.json. After a failed stage 7,
rollback restores the best passing model; generate_report writes the run report.
A failed gate is a result to act on, not an error; tool errors name the file, line
and field to fix."""


def build_server(
    *,
    policy: PathPolicy | None = None,
    runs_dir: str | Path = "runs",
    skills: list[ServedSkill] | None = None,
    jobs: Any = None,
    log_level: str = "WARNING",
) -> MCPServer:
    """The server with every tool, resource and prompt the installed library supports.

    ``policy`` confines file paths (None: unconfined, for local stdio use). ``runs_dir``
    holds the run directories (relative: against the policy's base directory).
    ``skills`` defaults to the realign skill of this installation. ``jobs`` (a
    :class:`realign_mcp.jobs.JobManager`) lets a caller share or inspect the job registry.
    """
    policy = policy or PathPolicy()
    runs = policy.resolve(runs_dir, what="runs_dir")
    ext = SkillsExtension(realign_skill() if skills is None else skills)
    mcp: MCPServer = MCPServer(
        "realign", title="realign: DPO with quality gates", version=realign.__version__,
        instructions=INSTRUCTIONS, extensions=[ext], log_level=log_level.upper(),  # type: ignore[arg-type]
    )
    mcp.middleware.append(_legacy_extensions_middleware(mcp))
    names = validators.register(mcp, policy)
    names += training_tools.register(mcp, policy)
    names += benchmark_tools.register(mcp, policy)
    names += pipeline_tools.register(mcp, pipeline_tools.PipelineTools(policy, runs, jobs))
    run_resources.register(mcp, runs)
    prompts.register(mcp, set(names))
    _clean_descriptions(mcp)
    return mcp


def _clean_descriptions(mcp: MCPServer) -> None:
    """Dedent the docstrings the SDK uses verbatim as tool and prompt descriptions."""
    for tool in mcp._tool_manager.list_tools():  # noqa: SLF001
        if tool.description:
            tool.description = inspect.cleandoc(tool.description)
    for prompt in mcp._prompt_manager.list_prompts():  # noqa: SLF001
        if prompt.description:
            prompt.description = inspect.cleandoc(prompt.description)


def _legacy_extensions_middleware(mcp: MCPServer) -> Any:
    """Advertise ``capabilities.extensions`` on the 2025-11-25 handshake too.

    The SDK declares extensions (SEP-2133) only on 2026-07-28 sessions: its 2025-11-25
    ``ServerCapabilities`` model has no ``extensions`` field and drops it. Clients on the
    older handshake (the MCP Inspector by default) look for the skills extension
    there, and ``skills/*`` are not spec methods in either era, so the declaration is
    added back to the ``initialize`` result when it is missing.
    """

    async def middleware(ctx: Any, call_next: Any) -> Any:
        result = await call_next(ctx)
        if ctx.method == "initialize" and isinstance(result, dict):
            declared = mcp._lowlevel_server.extensions  # noqa: SLF001 - the SDK's own map
            caps = result.get("capabilities")
            if declared and isinstance(caps, dict) and "extensions" not in caps:
                result = {**result, "capabilities": {**caps, "extensions": dict(declared)}}
        return result

    return middleware


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="The realign MCP server (stdio by default).")


@cli.command()
def serve(
    http: Annotated[bool, typer.Option("--http", help="serve streamable HTTP instead of stdio")] = False,
    host: Annotated[str, typer.Option(help="HTTP bind address (loopback unless you say otherwise)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    root: Annotated[Optional[list[Path]], typer.Option(
        "--root", help="directory the server may read and write (repeatable); over HTTP the "
                       "default is the current directory, over stdio paths are unconfined "
                       "unless a root is given")] = None,
    runs_dir: Annotated[str, typer.Option(help="where run directories live")] = "runs",
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "WARNING",
) -> None:
    """Serve the realign tools, the skill (SEP-2640) and run verdicts over MCP."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr)
    for r in root or []:
        if not r.is_dir():
            raise typer.BadParameter(f"{r} is not a directory", param_hint="--root")
    policy = PathPolicy.confined(root) if (http or root) else PathPolicy()
    try:
        mcp = build_server(policy=policy, runs_dir=runs_dir, log_level=log_level)
    except ValueError as e:  # --runs-dir outside the roots
        raise typer.BadParameter(str(e), param_hint="--runs-dir") from None
    if not http:
        mcp.run("stdio")
        return
    if host not in LOOPBACK:
        print(f"realign-mcp: serving on {host}:{port}, reachable beyond this machine; file "
              f"access is confined to {', '.join(map(str, policy.roots or ()))}",
              file=sys.stderr)
    mcp.run("streamable-http", host=host, port=port)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point ``realign-mcp``."""
    cli(args=argv)


if __name__ == "__main__":
    main()
