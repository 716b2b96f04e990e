"""CLI commands for stage 7's aftermath: ``realign rollback RUN`` and ``realign report RUN``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..rundir import RunDir
from ..errors import InputError, RealignError
from ._common import STATUS_STYLE, err, fail_input, out


def rollback(
    run_dir: Annotated[Path, typer.Argument(help="run directory (runs/<run-id>) whose stage 7 failed")],
    force: Annotated[bool, typer.Option("--force", help="roll back even when stage 7 passed")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print rollback.json")] = False,
) -> None:
    """Restore the best earlier model that passes every stage-7 gate; re-evaluate it; record it.

    Candidates: stage-5 checkpoints on disk that passed the KL gate, then the stage-1
    baseline. Writes rollback.json and deployed_model.json; deletes nothing. Exit 0 when
    a model was restored, 1 when none could be.
    """
    from ..pipeline import RunBusyError
    from ..report import write_report
    from ..rollback import rollback as _rollback

    try:
        result = _rollback(run_dir, force=force, trigger="cli")
    except (InputError, RunBusyError) as e:
        fail_input(str(e))
        return
    except RealignError as e:
        fail_input(str(e))
        return
    try:
        write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the rollback is recorded; the report is secondary
        err.print(f"[yellow]warning:[/] report not written: {escape(str(e))}")
    if as_json:
        sys.stdout.write(result.model_dump_json() + "\n")
    else:
        table = Table(title=f"rollback of {result.run_id}")
        for c in ("candidate", "gates", "result"):
            table.add_column(c, overflow="fold")
        for c in result.evaluated:
            gates = ", ".join(
                f"{g.name}={'—' if g.value is None else f'{g.value:.4g}'} "
                f"[{STATUS_STYLE[g.status]}]{g.status}[/]" for g in c.gates)
            table.add_row(c.candidate.name, gates, escape(c.note))
        out.print(table)
        out.print(escape(result.summary))
        out.print(f"record: {RunDir(run_dir).rollback_json}")
    raise typer.Exit(0 if result.restored is not None else 1)


def report(
    run_dir: Annotated[Path, typer.Argument(help="run directory (runs/<run-id>)")],
) -> None:
    """(Re)write report.html and report.md of a run from its run directory."""
    from ..report import write_report

    if not RunDir(run_dir).exists():
        fail_input(f"{run_dir}: not a run directory (no run.json)")
    try:
        html, md = write_report(run_dir)
    except InputError as e:
        fail_input(str(e))
        return
    out.print(f"wrote {html}")
    out.print(f"wrote {md}")


def register(app: typer.Typer) -> None:
    """Add ``rollback`` and ``report`` to ``app``."""
    app.command()(rollback)
    app.command()(report)
