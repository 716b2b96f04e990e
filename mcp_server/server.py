"""The realign MCP server: ``realign-mcp`` (stdio) or ``realign-mcp --http`` (streamable HTTP).

A thin adapter over the ``realign`` library, built on the official ``mcp`` SDK 2.x
(``MCPServer``). See README.md "MCP server" for client configuration.

Errors: every tool failure reaches the client as a tool error with its message (the
library's ``FILE:LINE: field ...`` text, or what failed and where), never only "Error
executing tool X"; an argument the tool does not take is refused; CLI commands named in
library messages are given as the MCP tools that do the same.

HTTP: loopback by default. On any other address a bearer token is required (``--token``
or ``REALIGN_MCP_TOKEN``; the server refuses to start without one), and the Host and
Origin headers are checked against the allowed hosts (DNS-rebinding protection; the
loopback names, the bind address or this machine's name, and ``--allowed-host``).
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import realign
import typer
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import (
    ResourceError,
    ToolError,
    UnexpectedResourceError,
    UnexpectedToolError,
)
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from . import (
    benchmark_tools,
    pipeline_tools,
    prompts,
    run_resources,
    training_tools,
    validators,
)
from ._util import describe, for_mcp, remedies_for_mcp
from .paths import PathPolicy, RunDirs
from .skills import ServedSkill, SkillsExtension, realign_skill

log = logging.getLogger("realign_mcp")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: The environment variable holding the HTTP bearer token (same as ``--token``).
TOKEN_ENV = "REALIGN_MCP_TOKEN"

INSTRUCTIONS = """\
realign: DPO realignment with a measured quality gate after every stage.
Read the skill first: skill://realign-dpo-workflow/SKILL.md (resources/read; skills/list
gives its manifest). Validate preference data with validate_preference_data and
check_decontamination; get_thresholds shows every gate. create_run_config writes a
commented run config for this machine. Run the pipeline with start_pipeline (returns a
run id at once) and poll run_status; verdicts are also
resources realign://runs/<id>/stages/<k>-<name>/verdict.json. After a failed stage 7,
rollback restores the best passing model; generate_report writes the run report.
cancel_run stops a running job (resume_run continues the run later).
A failed gate is a result to act on, not an error: its remedy says what to do, with
values; tool errors name the file, line and field to fix."""


class RealignMCP(MCPServer):
    """``MCPServer`` whose tool errors carry their message and whose tools take only the
    arguments they declare."""

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Any = None) -> Any:
        tool = self._tool_manager.get_tool(name)
        if tool is not None:
            known = list((tool.parameters or {}).get("properties") or {})
            unknown = [k for k in arguments if k not in known]
            if unknown:
                raise ToolError(
                    f"unknown argument{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(repr(k) for k in unknown)} for {name} (it takes: "
                    f"{', '.join(known) or 'no arguments'})")
        try:
            return await super().call_tool(name, arguments, context)
        except MCPError:
            raise
        except (UnexpectedToolError, UnexpectedResourceError) as exc:
            cause: BaseException = exc
            while isinstance(cause, (UnexpectedToolError, UnexpectedResourceError)) and \
                    cause.__cause__ is not None:
                cause = cause.__cause__
            log.error("tool %s failed", name, exc_info=cause)  # the traceback stays here
            raise ToolError(for_mcp(describe(cause))) from exc
        except (ToolError, ResourceError) as exc:
            cause = exc.__cause__
            if isinstance(cause, ValidationError):  # arguments that fail the schema
                raise ToolError(f"{name}: {describe(cause)}") from exc
            text = str(cause) if isinstance(cause, (ToolError, ResourceError)) else str(exc)
            raise ToolError(for_mcp(text)) from exc


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
    mcp: MCPServer = RealignMCP(
        "realign", title="realign: DPO with quality gates", version=realign.__version__,
        instructions=INSTRUCTIONS, extensions=[ext], log_level=log_level.upper(),  # type: ignore[arg-type]
    )
    mcp.middleware.append(_legacy_extensions_middleware(mcp))
    names = validators.register(mcp, policy)
    names += training_tools.register(mcp, policy)
    names += benchmark_tools.register(mcp, policy)
    run_dirs = RunDirs(policy, runs)  # the one resolver of run directories
    names += pipeline_tools.register(mcp, pipeline_tools.PipelineTools(policy, runs, jobs,
                                                                       run_dirs))
    run_resources.register(mcp, run_dirs)
    prompts.register(mcp, set(names))
    _clean_descriptions(mcp)
    _closed_schemas(mcp)
    _mcp_remedies(mcp)
    return mcp


def _mcp_remedies(mcp: MCPServer) -> None:
    """Every tool's result names MCP tools in its gates' remedies, not CLI commands
    (:func:`realign_mcp._util.remedies_for_mcp`)."""
    import functools

    for tool in mcp._tool_manager.list_tools():  # noqa: SLF001
        fn = tool.fn
        if tool.is_async:
            async def wrapped(*a: Any, __fn: Any = fn, **kw: Any) -> Any:
                return remedies_for_mcp(await __fn(*a, **kw))
        else:
            def wrapped(*a: Any, __fn: Any = fn, **kw: Any) -> Any:  # type: ignore[misc]
                return remedies_for_mcp(__fn(*a, **kw))
        tool.fn = functools.wraps(fn)(wrapped)


def _closed_schemas(mcp: MCPServer) -> None:
    """Each tool takes only the arguments it declares: ``additionalProperties: false`` in
    its input schema and an argument model that forbids extra keys."""
    for tool in mcp._tool_manager.list_tools():  # noqa: SLF001
        model = tool.fn_metadata.arg_model
        model.model_config = {**model.model_config, "extra": "forbid"}
        model.model_rebuild(force=True)
        tool.parameters["additionalProperties"] = False


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


def is_loopback(host: str) -> bool:
    """True for a loopback bind address (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_names(host: str, extra: list[str]) -> list[str]:
    """The Host header names this server answers to: loopback, the bind address (or, on a
    wildcard address, this machine's name) and the ones the user allowed."""
    names = ["127.0.0.1", "localhost", "[::1]"]
    bare = host.strip("[]")
    if bare in ("0.0.0.0", "::", ""):
        if not extra:
            names.append(socket.gethostname())
    elif (f"[{bare}]" if ":" in bare else bare) not in names:
        names.append(f"[{bare}]" if ":" in bare else bare)
    for h in extra:
        h = h.strip()
        if h and h not in names:
            names.append(h)
    return names


def transport_security(host: str, allowed_hosts: list[str] | None = None,
                       allowed_origins: list[str] | None = None) -> Any:
    """Host/Origin checks (DNS-rebinding protection) for ``host`` and the allowed names.

    A name without a port allows any port (``example.org`` allows ``example.org:8765``);
    a name with a port only that port. Browsers' Origin must be ``http(s)://`` one of the
    allowed names, or one of ``allowed_origins`` exactly.
    """
    from mcp.server.transport_security import TransportSecuritySettings

    hosts: list[str] = []
    origins: list[str] = []
    for name in _host_names(host, list(allowed_hosts or [])):
        has_port = name.rsplit("]", 1)[-1].count(":") == 1 if name.startswith("[") \
            else name.count(":") == 1
        hosts += [name] if has_port else [name, f"{name}:*"]
        for scheme in ("http", "https"):
            origins += [f"{scheme}://{name}"] if has_port else [f"{scheme}://{name}",
                                                                 f"{scheme}://{name}:*"]
    origins += [o.rstrip("/") for o in allowed_origins or []]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True,
                                     allowed_hosts=hosts, allowed_origins=origins)


class BearerToken:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <token>``."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            from starlette.datastructures import Headers
            from starlette.responses import JSONResponse

            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                     self._token):
                resp = JSONResponse(
                    {"error": "invalid_token",
                     "error_description": "this server requires Authorization: Bearer <token> "
                                         f"(the token given with --token or {TOKEN_ENV})"},
                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="realign-mcp"'})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def http_app(mcp: MCPServer, *, host: str, token: str | None = None,
             allowed_hosts: list[str] | None = None,
             allowed_origins: list[str] | None = None) -> Any:
    """The streamable-HTTP ASGI app: Host/Origin checks always, the bearer token when one
    is given (required off loopback: :func:`serve` refuses to start without it)."""
    if not is_loopback(host) and not token:
        raise ValueError(f"--host {host} is not a loopback address: give a bearer token "
                         f"(--token or {TOKEN_ENV})")
    app = mcp.streamable_http_app(
        transport_security=transport_security(host, allowed_hosts, allowed_origins), host=host)
    return BearerToken(app, token) if token else app


@cli.command()
def serve(
    http: Annotated[bool, typer.Option("--http", help="serve streamable HTTP instead of stdio")] = False,
    host: Annotated[str, typer.Option(help="HTTP bind address (loopback unless you say "
                                           "otherwise; any other address needs --token)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    root: Annotated[Optional[list[Path]], typer.Option(
        "--root", help="directory the server may read and write (repeatable); over HTTP the "
                       "default is the current directory, over stdio paths are unconfined "
                       "unless a root is given")] = None,
    runs_dir: Annotated[str, typer.Option(help="where run directories live")] = "runs",
    token: Annotated[Optional[str], typer.Option(
        envvar=TOKEN_ENV, show_envvar=True,
        help="HTTP bearer token: clients send 'Authorization: Bearer TOKEN'. Required when "
             "--host is not a loopback address; prefer the environment variable (a command "
             "line is visible to other users)")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", help="a Host header the HTTP server answers to besides loopback "
                               "and the bind address (repeatable; 'name' allows any port, "
                               "'name:port' one port); others get 421")] = None,
    allowed_origin: Annotated[Optional[list[str]], typer.Option(
        "--allowed-origin", help="a browser Origin allowed besides http(s)://<allowed host> "
                                 "(repeatable); others get 403")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "WARNING",
) -> None:
    """Serve the realign tools, the skill (SEP-2640) and run verdicts over MCP."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr)
    for r in root or []:
        if not r.is_dir():
            raise typer.BadParameter(f"{r} is not a directory", param_hint="--root")
    token = (token or "").strip() or None
    if http and not is_loopback(host) and token is None:
        print(f"realign-mcp: refusing to serve on {host}, a non-loopback address, without a "
              f"bearer token: set {TOKEN_ENV} (or give --token) and send 'Authorization: "
              "Bearer <token>' from the client; or serve on 127.0.0.1", file=sys.stderr)
        raise typer.Exit(2)
    policy = PathPolicy.confined(root) if (http or root) else PathPolicy()
    try:
        mcp = build_server(policy=policy, runs_dir=runs_dir, log_level=log_level)
    except ValueError as e:  # --runs-dir outside the roots
        raise typer.BadParameter(str(e), param_hint="--runs-dir") from None
    if not http:
        mcp.run("stdio")
        return
    app = http_app(mcp, host=host, token=token, allowed_hosts=list(allowed_host or []),
                   allowed_origins=list(allowed_origin or []))
    if not is_loopback(host):
        print(f"realign-mcp: serving on {host}:{port}, reachable beyond this machine; requests "
              f"need the bearer token; Host headers allowed: "
              f"{', '.join(_host_names(host, list(allowed_host or [])))}; file access is "
              f"confined to {', '.join(map(str, policy.roots or ()))}", file=sys.stderr)
        if token is not None and len(token) < 16:
            print("realign-mcp: warning: the token is shorter than 16 characters",
                  file=sys.stderr)
    import anyio
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host.strip("[]"), port=port,
                                           log_level=log_level.lower()))
    anyio.run(server.serve)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point ``realign-mcp``."""
    cli(args=argv)


if __name__ == "__main__":
    main()
