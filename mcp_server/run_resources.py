"""Run records as resources: ``realign://runs/<id>/...`` reads files of the runs directory.

Templates (read-only JSON):

* ``realign://runs/{run_id}/run.json``        config, seed, package versions, hardware
* ``realign://runs/{run_id}/status.json``     state, current stage, progress
* ``realign://runs/{run_id}/stages/{stage}/verdict.json``  a stage verdict; ``stage`` is
  the stage folder ``<k>-<name>`` (e.g. ``2-preference_data``) or the bare stage name
* ``realign://runs/{run_id}/report.md``        the run report (Markdown; text/markdown)
* ``realign://runs/{run_id}/rollback.json``    the last rollback's record
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from realign.rundir import RunDir
from realign.stages.registry import REGISTRY

from .paths import RunDirs


def register(mcp: MCPServer, runs: RunDirs) -> None:
    """Serve the run records of ``runs`` (the resolver the tools use)."""

    def run_file(run_id: str, pick: Callable[[RunDir], Path]) -> str:
        try:
            d = runs.entry(run_id)  # a run id: one folder of the runs directory
            if not RunDir(d).exists():
                raise FileNotFoundError(f"no run '{run_id}' (list_runs shows the runs)")
            d = runs.checked(d)
        except (ValueError, OSError) as e:
            raise ResourceError(str(e)) from None
        p = pick(RunDir(d))
        real = p.resolve()
        if not real.is_relative_to(d):
            raise ResourceError(f"{p} is outside the run directory")
        if not real.is_file():
            raise ResourceError(f"no such run file: {p} (list_runs shows the runs)")
        return real.read_text(encoding="utf-8")

    @mcp.resource("realign://runs/{run_id}/run.json", mime_type="application/json",
                  description="A run's record: config, seed, package versions, hardware")
    def run_json(run_id: str) -> str:
        return run_file(run_id, lambda rd: rd.run_json)

    @mcp.resource("realign://runs/{run_id}/status.json", mime_type="application/json",
                  description="A run's state, current stage and progress")
    def status_json(run_id: str) -> str:
        return run_file(run_id, lambda rd: rd.status_json)

    @mcp.resource("realign://runs/{run_id}/stages/{stage}/verdict.json",
                  mime_type="application/json",
                  description="A stage verdict: gates (value, threshold, op, status), findings, "
                              "artifacts. stage: '<k>-<name>' or the stage name")
    def verdict_json(run_id: str, stage: str) -> str:
        by_folder = {s.folder: n for n, s in REGISTRY.items()}
        name = by_folder.get(stage, stage)
        if name not in REGISTRY:
            raise ResourceError(f"'{stage}' is not a stage (known: {', '.join(REGISTRY)})")
        return run_file(run_id, lambda rd: rd.verdict_path(name))

    @mcp.resource("realign://runs/{run_id}/report.md", mime_type="text/markdown",
                  description="A run's report: every stage's gates, curves summarized, the "
                              "deploy/reject decision (generate_report rewrites it)")
    def report_md(run_id: str) -> str:
        return run_file(run_id, lambda rd: rd.report_md)

    @mcp.resource("realign://runs/{run_id}/rollback.json", mime_type="application/json",
                  description="The last rollback of a run: candidates re-evaluated with their "
                              "gates, what was restored")
    def rollback_json(run_id: str) -> str:
        return run_file(run_id, lambda rd: rd.rollback_json)
