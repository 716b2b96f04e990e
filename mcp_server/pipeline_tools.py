"""Pipeline tools: start/poll, blocking runs with progress, status, listing, rollback, report.

Thin wrappers over :mod:`realign.pipeline` (``create_run``, ``run_stages``, ``resume``,
``run_status``, ``list_runs``), :func:`realign.rollback.rollback` and
:func:`realign.report.write_report`. ``run_stage`` accepts every stage of
:data:`realign.config.STAGES`. The run directory is the record: ``run_status`` reads
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
from realign import config as run_config
from realign import pipeline
from realign.config import RunConfig, load_config
from realign.report import write_report
from realign.rollback import RollbackResult
from realign.rundir import RunDir, RunStatus

from ._util import EXPECTED, run_blocking, tool_error
from .jobs import JobManager
from .paths import PathPolicy

RUNS = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                       open_world_hint=False)
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
#: rollback re-evaluates models and repoints deployed_model.json; it deletes nothing.
ROLLBACK = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                           open_world_hint=False)
#: the report files are rewritten from the run directory: same input, same files.
REPORT = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                         open_world_hint=False)

ConfigArg = Annotated[str, Field(description="YAML run config (see templates.md)")]
RunArg = Annotated[str, Field(description="run id (a folder of the runs directory) or a run "
                                          "directory path")]


class ReportFiles(BaseModel):
    """The run report written by :func:`realign.report.write_report`."""

    html: str
    markdown: str
    markdown_text: str = Field(description="the content of report.md")


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
    """``realign.rundir.RunStatus`` plus the job this server runs on it, if any."""

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
            if RunDir(cand).exists():
                return cand
        d = self.path(run, "run")
        if not RunDir(d).exists():
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

    async def run_stage(
        run: RunArg,
        stage: str,
        ctx: Context,
        force: Annotated[bool, Field(description="rerun even if the stage has a verdict")] = False,
        wait: Annotated[bool, Field(description="wait for the end (with progress "
                                                "notifications); false: start in the background "
                                                "and poll run_status")] = True,
    ) -> RunReport:
        """Run one stage of an existing run (its earlier stages' artifacts must exist)."""
        stages = run_config.STAGES  # read at call time: a stage added to the library is accepted
        if stage not in stages:
            raise ToolError(f"unknown stage '{stage}' (known: {', '.join(stages)})")
        d = tools.run_dir(run)
        if wait:
            return await blocking(ctx, d, f"stage:{stage}", stages=[stage], force=force)
        return background(d, f"stage:{stage}", stages=[stage], force=force)

    # The schema lists the library's stages as this server is built (STAGES, in order).
    run_stage.__annotations__["stage"] = Annotated[
        Literal[tuple(run_config.STAGES)],  # type: ignore[valid-type]
        Field(description="the stage to run: " + ", ".join(
            f"{n} ({k})" for n, k in run_config.STAGES.items()))]
    mcp.tool(annotations=RUNS)(run_stage)

    @mcp.tool(annotations=ROLLBACK)
    async def rollback(
        run: RunArg,
        ctx: Context,
        force: Annotated[bool, Field(description="roll back even when stage 7 passed")] = False,
    ) -> RollbackResult:
        """Stage 7 failed: restore the best earlier model that passes every stage-7 gate.

        Candidates: the stage-5 checkpoints on disk that passed the KL gate (best held-out
        margin first, the rejected step left out), then the stage-1 baseline. Each is
        re-evaluated with stage 7's gates (retention, win rate); the first that passes is
        restored (deployed_model.json points at it); else the baseline. Records
        rollback.json, rewrites the report, deletes nothing. Waits for the end, with
        progress notifications (one re-evaluation per candidate: minutes).
        """
        from realign.rollback import rollback as rollback_run

        d = tools.run_dir(run)
        try:
            with tools.jobs.claim(d, "rollback"):
                res = await run_blocking(rollback_run, d, force=force, trigger="cli", ctx=ctx,
                                         progress_kw="progress")
        except EXPECTED as e:
            raise tool_error(e) from e
        try:  # as `realign rollback`: the report shows the rollback
            await run_blocking(write_report, d)
        except Exception as e:  # noqa: BLE001 - the rollback is recorded; the report is secondary
            await ctx.warning(f"report not written: {e}")
        return res

    @mcp.tool(annotations=REPORT)
    async def generate_report(run: RunArg) -> ReportFiles:
        """(Re)write report.html (plots as inline SVG) and report.md of a run from its run
        directory: every stage's gates, the KL and reward curves, retention with CIs, the
        deploy/reject decision and any rollback. Returns the paths and the Markdown."""
        d = tools.run_dir(run)
        html, md = await run_blocking(write_report, d)
        text = await anyio.to_thread.run_sync(md.read_text, "utf-8")
        return ReportFiles(html=str(html), markdown=str(md), markdown_text=text)

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

    return ["start_pipeline", "run_pipeline", "resume_run", "run_stage", "run_status", "list_runs",
            "rollback", "generate_report"]
