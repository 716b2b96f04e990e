"""Pipeline tools: a run config, start/poll, blocking runs with progress, status, listing,
rollback, report.

Thin wrappers over :func:`realign.init_config.write_run_config` (``create_run_config``),
:mod:`realign.pipeline` (``create_run``, ``run_stages``, ``resume``,
``run_status``, ``list_runs``), :func:`realign.rollback.rollback` and
:func:`realign.report.write_report`. ``run_stage`` accepts every stage of
:data:`realign.config.STAGES`. The run directory is the record: ``run_status`` reads
``status.json`` and each stage's ``verdict.json`` from disk, so an agent whose
connection dropped loses nothing. A failed gate stops the run with its verdict; that
is a normal result (``state: failed``), not an error.

Every run directory is found through :class:`realign_mcp.paths.RunDirs` (run ids are
one folder of the runs directory; symlinks leading out are refused). ``cancel_run``
stops a job of this server at its next progress update; the run stays resumable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field
from realign import config as run_config
from realign import pipeline
from realign.config import RunConfig, load_config
from realign.default_run import default_config_with, is_default_prompts
from realign.report import write_report
from realign.rollback import RollbackResult
from realign.rundir import RunStatus, load_run_config

from ._util import check_finite, for_mcp, run_blocking, tool_error
from .jobs import JobCancelled, JobManager
from .paths import PathPolicy, RunDirs

RUNS = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                       open_world_hint=False)
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
#: rollback re-evaluates models and repoints deployed_model.json; it deletes nothing.
ROLLBACK = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                           open_world_hint=False)
#: the report files are rewritten from the run directory: same input, same files.
REPORT = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                         open_world_hint=False)
#: create_run_config writes one file (an existing one only with force).
WRITES_CONFIG = ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                idempotent_hint=False, open_world_hint=False)
#: cancel stops a job; the run keeps every finished stage and checkpoint (resume_run).
CANCEL = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                         open_world_hint=False)

RunConfigArg = Annotated[str | None, Field(
    description="YAML run config (see templates.md). Omitted: the default run, all seven "
                "stages on the embedded SmolLM2-135M-Instruct with the shipped verifiable "
                "prompts and the offline suites (as `realign run` with no arguments)")]
RunArg = Annotated[str, Field(description="run id (a folder of the runs directory) or a run "
                                          "directory path")]
OverridesListArg = Annotated[list[str], Field(
    description="config values KEY=VALUE (e.g. \"dpo.learning_rate=2.5e-06\", "
                "\"stages=[preference_data]\"), checked by the run config's schema; a run "
                "records the config it ran with in run.json")]
RunIdArg = Annotated[str | None, Field(
    description="name of the run folder: one folder name of letters, digits, '.', '_' and "
                "'-', starting with a letter or digit (default: the config's run_id or a "
                "timestamp)")]


class ReportFiles(BaseModel):
    """The run report written by :func:`realign.report.write_report`."""

    html: str
    markdown: str
    markdown_text: str = Field(description="the content of report.md")


class RunConfigFile(BaseModel):
    """The run config create_run_config wrote."""

    path: str
    text: str = Field(description="the YAML as written, with a comment on every field")
    batch_size: int = Field(description="dpo.batch_size written")
    gradient_accumulation_steps: int = Field(description="dpo.gradient_accumulation_steps")
    batch_source: str = Field(description="calibrated, cached calibration or default")
    batch_note: str
    hardware: str = Field(description="this machine, in one line")
    notes: list[str] = Field(default_factory=list, description="what to check or change")
    next: str = Field(description="the call that runs the config")


class JobInfo(BaseModel):
    """The job this server last ran on a run directory (absent when none)."""

    kind: str
    started: str
    running: bool
    error: str | None = Field(None, description="why the job stopped on an error")
    cancel_requested: str | None = Field(None, description="when cancel_run asked it to stop")
    cancelled: bool = Field(False, description="the job stopped because of cancel_run")


#: The library's run states (``RunStatus.state``) plus two this server knows from its own
#: jobs: ``error`` (the job stopped on an error; ``message`` says which) and ``cancelled``
#: (cancel_run stopped it). On disk both are ``interrupted``: resume_run continues the run.
LIBRARY_STATES: tuple[str, ...] = get_args(RunStatus.model_fields["state"].annotation)
ReportState = Literal[LIBRARY_STATES + ("error", "cancelled")]  # type: ignore[valid-type]


class RunReport(RunStatus):
    """``realign.rundir.RunStatus`` plus the job this server runs on it, if any."""

    state: ReportState  # type: ignore[assignment]
    job: JobInfo | None = None


class SkippedRun(BaseModel):
    name: str
    reason: str


class RunList(BaseModel):
    runs_dir: str
    runs: list[RunReport]
    skipped: list[SkippedRun] = Field(
        default_factory=list,
        description="entries of the runs directory left out, with the reason (a symlink "
                    "leading out of it)")


class PipelineTools:
    """State shared by the pipeline tools: path policy, run directories, job registry."""

    def __init__(self, policy: PathPolicy, runs_dir: Path, jobs: JobManager | None = None,
                 runs: RunDirs | None = None) -> None:
        self.policy = policy
        self.runs = runs or RunDirs(policy, runs_dir)
        self.runs_dir = self.runs.runs_dir
        self.jobs = jobs or JobManager()

    # -- paths -------------------------------------------------------------------------
    def path(self, raw: str, what: str) -> Path:
        try:
            return self.policy.resolve(raw, what=what)
        except ValueError as e:
            raise ToolError(str(e)) from e

    def run_dir(self, run: str) -> Path:
        """A run id under the runs directory, or a run directory path (:class:`RunDirs`)."""
        try:
            return self.runs.resolve(run)
        except (ValueError, OSError) as e:
            raise tool_error(e) from e

    def confine(self, cfg: RunConfig, source: str) -> None:
        """Refuse a config naming a file outside the roots or a threshold that is no number."""
        check_finite(cfg.thresholds, f"{source} thresholds")
        if not self.policy.is_confined:
            return
        if cfg.data is not None:
            self.path(cfg.data, f"{source} data")
        if cfg.prompts is not None and not is_default_prompts(cfg.prompts):
            self.path(cfg.prompts, f"{source} prompts")
        if cfg.generation.reward_model:
            self.path(cfg.generation.reward_model, f"{source} generation.reward_model")
        for e in cfg.eval_sets:
            self.path(e, f"{source} eval_sets")
        if cfg.sft.dataset:
            self.path(cfg.sft.dataset, f"{source} sft.dataset")
        if cfg.model != "default" and (Path(cfg.model).exists() or cfg.model.startswith(
                ("/", ".", "~"))):
            self.path(cfg.model, f"{source} model")

    def existing(self, run: str) -> Path:
        """The run directory of a run to work on (resume, a stage, rollback): its recorded
        config is confined like a new one."""
        d = self.run_dir(run)
        try:
            cfg = load_run_config(d)
        except Exception as e:  # noqa: BLE001
            raise tool_error(e) from e
        self.confine(cfg, "run.json config")
        return d

    def load(self, config_path: str | None, run_id: str | None,
             overrides: list[str] | None = None) -> tuple[RunConfig, Path | None]:
        """Load the config (with ``KEY=VALUE`` overrides; no ``config_path``: the default
        run, :func:`realign.default_run.default_config_with`); confine every path it names;
        put runs in the runs directory. Returns the config and the new run's folder (None:
        a timestamp id, chosen later)."""
        try:
            if config_path is None:
                cfg = default_config_with(list(overrides or []))
            else:
                cfg = load_config(self.path(config_path, "config_path"),
                                  overrides=list(overrides or []) or None)
        except ToolError:
            raise
        except Exception as e:  # noqa: BLE001
            raise tool_error(e) from e
        self.confine(cfg, "config")
        out = self.path(cfg.output_dir, "config output_dir") if cfg.output_dir != "runs" \
            else self.runs_dir
        rid = run_id if run_id is not None else cfg.run_id
        try:
            folder = None if rid is None else self.runs.new(out, rid)
        except ValueError as e:
            raise tool_error(e) from e
        return cfg.model_copy(update={"output_dir": str(out), "run_id": rid}), folder

    # -- reports -----------------------------------------------------------------------
    def report(self, run_dir: Path) -> RunReport:
        try:
            st = pipeline.run_status(run_dir)
        except Exception as e:  # noqa: BLE001
            raise tool_error(e) from e
        data = st.model_dump()
        data["message"] = for_mcp(st.message)
        job = self.jobs.last(run_dir)
        info = None
        if job is not None:
            running = not job.done.is_set()
            info = JobInfo(kind=job.kind, started=job.started, running=running, error=job.error,
                           cancel_requested=job.cancel_requested, cancelled=job.cancelled)
            # The record on disk says interrupted (or never got further than created);
            # this server knows why its job stopped.
            if not running and st.state in ("interrupted", "created"):
                if job.cancelled:
                    where = f" during {st.current_stage}" if st.current_stage else ""
                    data.update(state="cancelled",
                                message=f"cancelled by cancel_run{where}; finished stages and "
                                        "checkpoints are kept: resume_run continues the run")
                elif job.error:
                    data.update(state="error", message=job.error)
            elif running and job.cancel_requested:
                data["message"] = (data["message"] + "; " if data["message"] else "") + \
                    "cancel requested: the job stops at its next progress update"
        return RunReport(**data, job=info)


def register(mcp: MCPServer, tools: PipelineTools) -> list[str]:
    """Add the pipeline tools to ``mcp``; return their names."""

    async def create(config_path: str | None, run_id: str | None,
                     overrides: list[str] | None = None) -> Path:
        cfg, _ = tools.load(config_path, run_id, overrides)
        await run_blocking(pipeline.preflight, cfg, source=config_path)
        return await run_blocking(pipeline.create_run, cfg)

    async def blocking(ctx: Context, run_dir: Path, kind: str, **kw: Any) -> RunReport:
        """Run the stages in a worker thread as this run's job, with progress to ``ctx``;
        cancel_run stops it (the result then says ``cancelled``)."""
        try:
            with tools.jobs.claim(run_dir, kind) as job:
                await run_blocking(pipeline.run_stages, run_dir, ctx=ctx, progress_kw="progress",
                                   check=job.check, job=kind, **kw)
        except JobCancelled:
            pass  # recorded by the job; the report says so
        except ToolError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. the run is busy
            raise tool_error(e) from e
        return tools.report(run_dir)

    def background(run_dir: Path, kind: str, **kw: Any) -> RunReport:
        try:
            tools.jobs.start(run_dir, kind, lambda job: pipeline.run_stages(
                run_dir, job=kind, progress=job.progress, **kw))
        except Exception as e:  # noqa: BLE001 - e.g. the run is busy
            raise tool_error(e) from e
        return tools.report(run_dir)

    @mcp.tool(annotations=RUNS)
    async def start_pipeline(config_path: RunConfigArg = None, run_id: RunIdArg = None,
                             overrides: OverridesListArg = []) -> RunReport:  # noqa: B006
        """Create a run from a config and start every configured stage in the background.

        Returns at once with the run id; poll run_status(run_id) for the current stage,
        progress and each stage's verdict; cancel_run stops it. Stages run in order with
        their gates enforced: a failed gate stops the run (state 'failed') unless the
        config's allow_gate_failures lists it; each failed or unmeasured gate carries a
        `remedy` (the next step, with values). One job at a time per run directory.
        """
        return background(await create(config_path, run_id, overrides), "run")

    @mcp.tool(annotations=RUNS)
    async def run_pipeline(
        ctx: Context,
        config_path: RunConfigArg = None,
        run_id: RunIdArg = None,
        overrides: OverridesListArg = [],  # noqa: B006
    ) -> RunReport:
        """Create a run and run every configured stage, waiting for the end.

        Sends progress notifications while it runs. Long runs (training) may outlast a
        client's request timeout: prefer start_pipeline + run_status for those. If the
        connection drops the run continues; run_status shows it.
        """
        return await blocking(ctx, await create(config_path, run_id, overrides), "run")

    @mcp.tool(annotations=WRITES_CONFIG)
    async def create_run_config(
        output: Annotated[str, Field(description="the YAML file to write, e.g. run.yaml")],
        ctx: Context,
        model: Annotated[str, Field(description="starting model: 'default' "
                                                "(SmolLM2-135M-Instruct, offline), a model "
                                                "folder or a hub id")] = "default",
        data: Annotated[str | None, Field(description="preference pairs (a file, a saved "
                                                      "dataset or a hub id); null: a "
                                                      "placeholder to replace")] = None,
        preset: Literal["relaxed", "standard", "strict"] = "standard",
        overrides: OverridesListArg = [],  # noqa: B006
        force: Annotated[bool, Field(description="overwrite an existing file")] = False,
        calibrate: Annotated[bool, Field(description="measure the DPO batch size on this "
                                                     "machine now (a quick sweep, minutes, "
                                                     "with progress); default: a cached "
                                                     "calibration, else the default")] = False,
    ) -> RunConfigFile:
        """Write a commented run config (as `realign init`): every field with its meaning,
        range and default, this machine's DPO batch size, checked by the run config's schema.

        overrides set any field (KEY=VALUE, e.g. "stages=[preference_data]",
        "eval_sets=[eval.jsonl]", "dpo.learning_rate=2.5e-06"): use them to apply a gate's
        remedy. Every path (output, data, model, eval sets) must lie inside the server's
        roots. Returns the path, the YAML and next: the start_pipeline call that runs it.
        """
        from realign.init_config import write_run_config

        out = tools.path(output, "output")
        src: Path | str | None = data
        if data is not None and (Path(data).exists() or data.startswith(("/", ".", "~"))
                                 or data.endswith((".jsonl", ".json", ".parquet"))):
            src = tools.path(data, "data")  # a local file (a hub id stays as given)
        mdl = model
        if model != "default" and (Path(model).exists() or model.startswith(("/", ".", "~"))):
            mdl = str(tools.path(model, "model"))

        def check(cfg: RunConfig) -> None:
            tools.confine(cfg, "config")
            if cfg.output_dir != "runs":
                tools.path(cfg.output_dir, "config output_dir")

        def write(progress: Any = None) -> Any:
            say = (lambda msg: progress(0, None, msg)) if progress is not None else None
            return write_run_config(out, model=mdl, data=None if src is None else str(src),
                                    preset=preset, overrides=list(overrides), force=force,
                                    calibrate=calibrate, progress=say, check=check)

        res = await run_blocking(write, ctx=ctx, progress_kw="progress")
        return RunConfigFile(
            path=res.path, text=res.text, batch_size=res.batch.batch_size,
            gradient_accumulation_steps=res.batch.gradient_accumulation_steps,
            batch_source=res.batch.source, batch_note=for_mcp(res.batch.note),
            hardware=res.batch.hardware, notes=[for_mcp(n) for n in res.notes],
            next=f"start_pipeline(config_path={res.path!r})")

    @mcp.tool(annotations=RUNS)
    async def resume_run(run: RunArg) -> RunReport:
        """Continue a stopped, cancelled or killed run in the background from its first stage
        without a passing verdict (stage 5 from its last checkpoint). Poll run_status."""
        return background(tools.existing(run), "resume")

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
        d = tools.existing(run)
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

        d = tools.existing(run)
        try:
            with tools.jobs.claim(d, "rollback"):
                res = await run_blocking(rollback_run, d, force=force, trigger="cli", ctx=ctx,
                                         progress_kw="progress")
        except ToolError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. the run is busy
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
        """A run's state (created, running, passed, failed, incomplete, interrupted; and, for
        a job of this server, error with its message or cancelled), its current stage and
        progress, and the verdict of every stage that has one."""
        d = await anyio.to_thread.run_sync(tools.run_dir, run)
        return await anyio.to_thread.run_sync(tools.report, d)

    @mcp.tool(annotations=READ_ONLY)
    async def list_runs() -> RunList:
        """Every run in the server's runs directory, newest first, with its state (a run
        whose record cannot be read is listed as corrupt with the reason; entries that
        lead out of the runs directory are listed in skipped)."""

        def collect() -> RunList:
            found, skipped = tools.runs.listing()
            runs = []
            for d in found:
                try:
                    runs.append(tools.report(d))
                except ToolError as e:  # one unreadable run never hides the others
                    if "corrupt" in LIBRARY_STATES:
                        runs.append(RunReport(run_id=d.name, run_dir=str(d), state="corrupt",
                                              message=str(e)))
                    else:
                        skipped.append((d.name, str(e)))
            return RunList(runs_dir=str(tools.runs_dir), runs=runs,
                           skipped=[SkippedRun(name=n, reason=r) for n, r in skipped])

        return await anyio.to_thread.run_sync(collect)

    @mcp.tool(annotations=CANCEL)
    async def cancel_run(
        run: RunArg,
        wait: Annotated[float, Field(ge=0, le=600, allow_inf_nan=False,
                                     description="seconds to wait for the job to stop (0: "
                                                 "return at once and poll run_status)")] = 60,
    ) -> RunReport:
        """Stop the job this server runs on a run (start_pipeline, resume_run, run_stage,
        run_pipeline) cleanly.

        The job stops at its next progress update (a training step, a block of data, a
        stage start), the run is recorded as stopped and its lock released; finished
        stages and saved checkpoints are kept, so resume_run continues it later. Returns
        the run's status: state 'cancelled' once stopped (still 'running' with
        job.cancel_requested set if it did not stop within `wait` seconds). A rollback
        cannot be cancelled.
        """
        d = await anyio.to_thread.run_sync(tools.run_dir, run)
        try:
            job = tools.jobs.cancel(d)
        except ValueError as e:
            raise tool_error(e) from e
        with anyio.move_on_after(wait):
            while not job.done.is_set():
                await anyio.sleep(0.05)
        return await anyio.to_thread.run_sync(tools.report, d)

    return ["create_run_config", "start_pipeline", "run_pipeline", "resume_run", "run_stage",
            "run_status", "list_runs", "cancel_run", "rollback", "generate_report"]
