"""Pipeline tools: start/poll, blocking runs with progress, status and listing.

Thin wrappers over :mod:`realign.pipeline` (``create_run``, ``run_stages``, ``resume``,
``run_status``, ``list_runs``). The run directory is the record: ``run_status`` reads
``status.json`` and each stage's ``verdict.json`` from disk, so an agent whose
connection dropped loses nothing. A failed gate stops the run with its verdict; that
is a normal result (``state: failed``), not an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from realign import pipeline
from realign.config import STAGES, RunConfig, load_config
from realign.pipeline import RunStatus

from ._util import EXPECTED, run_blocking, tool_error
from .jobs import JobManager
from .paths import PathPolicy

RUNS = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                       open_world_hint=False)
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)

ConfigArg = Annotated[str, Field(description="YAML run config (see templates.md)")]
StageName = Literal[tuple(STAGES)]  # type: ignore[valid-type]  # the pipeline's stage names
RunArg = Annotated[str, Field(description="run id (a folder of the runs directory) or a run "
                                          "directory path")]


class RunList(BaseModel):
    runs_dir: str
    runs: list[RunStatus]


class JobInfo(BaseModel):
    """The job this server last ran on a run directory (absent when none)."""

    kind: str
    started: str
    running: bool
    error: str | None = None


class RunReport(RunStatus):
    """``realign.pipeline.RunStatus`` plus the job this server runs on it, if any."""

    job: JobInfo | None = None


class PipelineTools:
    """State shared by the pipeline tools: path policy, runs directory, job registry."""

    def __init__(self, policy: PathPolicy, runs_dir: Path, jobs: JobManager | None = None) -> None:
        self.policy = policy
        self.runs_dir = runs_dir
        self.jobs = jobs or JobManager()

    # -- paths -------------------------------------------------------------------------
    def path(self, raw: str, what: str) -> Path:
        try:
            return self.policy.resolve(raw, what=what)
        except ValueError as e:
            raise ToolError(str(e)) from e

    def run_dir(self, run: str) -> Path:
        """A run id under the runs directory, or a run directory path."""
        if run and "/" not in run and "\\" not in run and run not in (".", ".."):
            cand = self.runs_dir / run
            if (cand / "run.json").exists():
                return cand
        d = self.path(run, "run")
        if not (d / "run.json").exists():
            raise ToolError(f"no run '{run}': neither {self.runs_dir / run} nor {d} holds a "
                            "run.json (list_runs shows the runs)")
        return d

    def load(self, config_path: str, run_id: str | None) -> RunConfig:
        """Load the config; confine every path it names; put runs in the runs directory."""
        cfg_file = self.path(config_path, "config_path")
        try:
            cfg = load_config(cfg_file)
        except EXPECTED as e:
            raise tool_error(e) from e
        if self.policy.is_confined:
            self.path(cfg.data, "config data")
            for e in cfg.eval_sets:
                self.path(e, "config eval_sets")
            if cfg.sft.dataset:
                self.path(cfg.sft.dataset, "config sft.dataset")
            if cfg.model != "default" and (Path(cfg.model).exists() or cfg.model.startswith(
                    ("/", ".", "~"))):
                self.path(cfg.model, "config model")
        out = self.path(cfg.output_dir, "config output_dir") if cfg.output_dir != "runs" \
            else self.runs_dir
        return cfg.model_copy(update={"output_dir": str(out), "run_id": run_id or cfg.run_id})

    # -- reports -----------------------------------------------------------------------
    def report(self, run_dir: Path) -> RunReport:
        try:
            st = pipeline.run_status(run_dir)
        except EXPECTED as e:
            raise tool_error(e) from e
        job = self.jobs.last(run_dir)
        info = None if job is None else JobInfo(kind=job.kind, started=job.started,
                                                running=not job.done.is_set(), error=job.error)
        return RunReport(**st.model_dump(), job=info)


def register(mcp: MCPServer, tools: PipelineTools) -> list[str]:
    """Add the pipeline tools to ``mcp``; return their names."""

    async def create(config_path: str, run_id: str | None) -> Path:
        cfg = tools.load(config_path, run_id)
        return await run_blocking(pipeline.create_run, cfg)

    async def blocking(ctx: Context, run_dir: Path, kind: str, **kw: Any) -> RunReport:
        """Run the stages in a worker thread as this run's job, with progress to ``ctx``."""
        try:
            with tools.jobs.claim(run_dir, kind):
                await run_blocking(pipeline.run_stages, run_dir, ctx=ctx, progress_kw="progress",
                                   job=kind, **kw)
        except EXPECTED as e:
            raise tool_error(e) from e
        return tools.report(run_dir)

    def background(run_dir: Path, kind: str, **kw: Any) -> RunReport:
        try:
            tools.jobs.start(run_dir, kind, lambda: pipeline.run_stages(run_dir, job=kind, **kw))
        except EXPECTED as e:
            raise tool_error(e) from e
        return tools.report(run_dir)

    @mcp.tool(annotations=RUNS)
    async def start_pipeline(
        config_path: ConfigArg,
        run_id: Annotated[str | None, Field(description="name of the run folder (default: "
                                                        "the config's run_id or a timestamp)")] = None,
    ) -> RunReport:
        """Create a run from a config and start every configured stage in the background.

        Returns at once with the run id; poll run_status(run_id) for the current stage,
        progress and each stage's verdict. Stages run in order with their gates enforced:
        a failed gate stops the run (state 'failed') unless the config's
        allow_gate_failures lists it. One job at a time per run directory.
        """
        return background(await create(config_path, run_id), "run")

    @mcp.tool(annotations=RUNS)
    async def run_pipeline(
        config_path: ConfigArg,
        ctx: Context,
        run_id: Annotated[str | None, Field(description="name of the run folder")] = None,
    ) -> RunReport:
        """Create a run and run every configured stage, waiting for the end.

        Sends progress notifications while it runs. Long runs (training) may outlast a
        client's request timeout: prefer start_pipeline + run_status for those. If the
        connection drops the run continues; run_status shows it.
        """
        return await blocking(ctx, await create(config_path, run_id), "run")

    @mcp.tool(annotations=RUNS)
    async def resume_run(run: RunArg) -> RunReport:
        """Continue a stopped or killed run in the background from its first stage without a
        passing verdict (stage 5 from its last checkpoint). Poll run_status."""
        return background(tools.run_dir(run), "resume")

    @mcp.tool(annotations=RUNS)
    async def run_stage(
        run: RunArg,
        stage: Annotated[StageName, Field(description="the stage to run")],
        ctx: Context,
        force: Annotated[bool, Field(description="rerun even if the stage has a verdict")] = False,
        wait: Annotated[bool, Field(description="wait for the end (with progress "
                                                "notifications); false: start in the background "
                                                "and poll run_status")] = True,
    ) -> RunReport:
        """Run one stage of an existing run (its earlier stages' artifacts must exist)."""
        if stage not in STAGES:
            raise ToolError(f"unknown stage '{stage}' (known: {', '.join(STAGES)})")
        d = tools.run_dir(run)
        if wait:
            return await blocking(ctx, d, f"stage:{stage}", stages=[stage], force=force)
        return background(d, f"stage:{stage}", stages=[stage], force=force)

    @mcp.tool(annotations=READ_ONLY)
    async def run_status(run: RunArg) -> RunReport:
        """A run's state (created, running, passed, failed, incomplete, interrupted), its
        current stage and progress, and the verdict of every stage that has one."""
        return await anyio.to_thread.run_sync(tools.report, tools.run_dir(run))

    @mcp.tool(annotations=READ_ONLY)
    async def list_runs() -> RunList:
        """Every run in the server's runs directory, newest first, with its state."""
        runs = await anyio.to_thread.run_sync(pipeline.list_runs, tools.runs_dir)
        return RunList(runs_dir=str(tools.runs_dir), runs=runs)

    return ["start_pipeline", "run_pipeline", "resume_run", "run_stage", "run_status", "list_runs"]
