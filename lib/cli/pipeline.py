"""Pipeline commands: ``run``, ``resume``, ``stage``, ``status``, ``runs``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ..config import STAGES as _STAGES
from ..errors import InputError, RealignError
from ..gates import EXIT_CODES, RUN_EXIT
from ._common import STATUS_STYLE, err, fail_input, out, print_verdict, remedy_text

_STAGE_NAMES = list(_STAGES)
#: Colours of the states and stage statuses beyond the gate statuses of ``STATUS_STYLE``.
_STYLE = {**STATUS_STYLE, "passed": "green", "failed": "bold red",
          "passed_with_failures": "bold yellow", "stale": "magenta", "corrupt": "bold red"}


@contextmanager
def stage_progress(enabled: bool) -> Iterator[Callable[[float, float | None, str], None] | None]:
    """One Rich progress bar on stderr that follows the current stage's (done, total, message)."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as bar:
        task = bar.add_task("starting", total=None)
        state = {"msg": ""}

        def update(done: float, total: float | None, msg: str) -> None:
            if msg != state["msg"]:
                state["msg"] = msg
                bar.reset(task, total=total, description=msg)
            bar.update(task, completed=done, total=total, description=msg)

        yield update


def _finish(status: object, as_json: bool) -> None:
    from ..pipeline import RunStatus

    assert isinstance(status, RunStatus)
    if as_json:
        sys.stdout.write(status.model_dump_json() + "\n")
    else:
        _print_status(status)
    raise typer.Exit(RUN_EXIT.get(status.state, 1))


def _print_status(status: object, verbose: bool = True) -> None:
    from ..pipeline import RunStatus

    assert isinstance(status, RunStatus)
    state_style = _STYLE.get(status.state, "")
    table = Table(title=f"run {escape(status.run_id)} — "
                        + (f"[{state_style}]{status.state}[/]" if state_style else status.state))
    for c in ("stage", "status", "gates"):
        table.add_column(c, overflow="fold")
    for s in status.stages:
        gates = ""
        if s.verdict:
            gates = ", ".join(
                f"{g.name}={'—' if g.value is None else f'{g.value:.4g}'} [{STATUS_STYLE[g.status]}]{g.status}[/]"
                for g in s.verdict.gates)
            gates += "".join(remedy_text(f"{g.name}: {g.remedy}") for g in s.verdict.gates
                             if g.remedy and g.status != "pass")
        if s.note:
            gates = (gates + "\n" if gates else "") + escape(s.note)
        style = _STYLE.get(s.status, "")
        table.add_row(f"{s.number} {s.name}", f"[{style}]{s.status}[/]" if style else s.status, gates)
    out.print(table)
    if status.message:
        out.print(escape(status.message))
    if status.allowed_failures:
        out.print(f"[yellow]allowed gate failures:[/] {', '.join(status.allowed_failures)}")
    if verbose:
        for s in status.stages:
            for w in (s.verdict.warnings if s.verdict else []):
                out.print(f"[yellow]warning ({s.name}):[/] {escape(w)}")
    out.print(f"run directory: {status.run_dir}")
    from ..rundir import RunDir

    rd = RunDir(status.run_dir)
    if rd.report_html.exists():
        out.print(f"report: {rd.report_html} (and {rd.report_md.name})")


def _guard(fn: Callable[[], object]) -> object:
    from ..pipeline import RunBusyError

    try:
        return fn()
    except (InputError, RunBusyError) as e:
        fail_input(str(e))
    except RealignError as e:
        fail_input(str(e))
    return None


def run(
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c",
        help="run config (YAML; see templates.md). Without it: the default run, all seven "
             "stages on the embedded SmolLM2-135M-Instruct with the shipped verifiable "
             "prompts and the offline suites")] = None,
    run_id: Annotated[Optional[str], typer.Option(
        help="name of the run directory: one folder name (letters, digits, '.', '_', '-')")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the final run status as JSON")] = False,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="config overrides KEY=VALUE (e.g. dpo.beta=0.2), checked by the same schema",
        metavar="KEY=VALUE", show_default=False)] = None,
) -> None:
    """Run the pipeline stages of a config, gate by gate, in a new run directory.

    With no --config, the default run: all seven stages on the embedded default model,
    the shipped verifiable prompt set (stage 2 generates the pairs) and the offline
    suites, sized for a 2-core CPU (docs/iterative-training.md#the-default-run).
    The config is checked first (model, data and eval paths, every data row, step
    counts); bad input exits 2 before the run directory exists.
    """
    from ..config import load_config
    from ..pipeline import create_run, preflight, run_stages
    from ..rundir import check_run_id

    if config is None:
        from ..default_run import DEFAULT_RUN_NOTES, default_config_with

        cfg = _guard(lambda: default_config_with(list(overrides or [])))

        err.print("the default run: all seven stages on SmolLM2-135M-Instruct with the "
                  "shipped sentiment prompts (realign run --help; "
                  "docs/iterative-training.md#the-default-run)")
        for note in DEFAULT_RUN_NOTES:
            err.print(f"  note: {escape(note)}")
    else:
        cfg = _guard(lambda: load_config(config, overrides=list(overrides) if overrides else None))
    if run_id is not None:
        _guard(lambda: check_run_id(run_id))
        cfg = cfg.model_copy(update={"run_id": run_id})  # type: ignore[union-attr]
    _guard(lambda: preflight(cfg, source=config))  # type: ignore[arg-type]
    run_dir = _guard(lambda: create_run(cfg))  # type: ignore[arg-type]
    err.print(f"run directory: {run_dir}")
    with stage_progress(err.is_terminal or not as_json) as cb:
        status = _guard(lambda: run_stages(run_dir, progress=cb))  # type: ignore[arg-type]
    _finish(status, as_json)


def resume(
    run_dir: Annotated[Path, typer.Argument(help="run directory (runs/<run-id>)")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Continue a run from its last completed stage (stage 5 from its last checkpoint)."""
    from ..pipeline import resume as _resume

    with stage_progress(err.is_terminal or not as_json) as cb:
        status = _guard(lambda: _resume(run_dir, progress=cb))
    _finish(status, as_json)


def stage(
    name: Annotated[str, typer.Argument(help="stage name: " + ", ".join(_STAGE_NAMES))],
    run_dir: Annotated[Optional[Path], typer.Option("--run", help="existing run directory")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="config for a new run")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run (or rerun) one stage; earlier stages it needs must have run in the same run dir."""
    from ..config import STAGES, load_config
    from ..pipeline import create_run, preflight, run_stages

    if name not in STAGES:
        fail_input(f"unknown stage '{name}' (choose from {', '.join(STAGES)})")
    if (run_dir is None) == (config is None):
        fail_input("give exactly one of --run RUN_DIR or --config FILE")
    if run_dir is None:
        cfg = _guard(lambda: load_config(config))  # type: ignore[arg-type]
        _guard(lambda: preflight(cfg, stages=[name], source=config))  # type: ignore[arg-type]
        run_dir = _guard(lambda: create_run(cfg))  # type: ignore[arg-type]
    with stage_progress(err.is_terminal or not as_json) as cb:
        status = _guard(lambda: run_stages(run_dir, stages=[name], force=True, progress=cb))  # type: ignore[arg-type]
    from ..pipeline import RunStatus

    assert isinstance(status, RunStatus)
    st = next((s for s in status.stages if s.name == name), None)
    if as_json:
        sys.stdout.write((st.verdict.model_dump_json() if st and st.verdict else "{}") + "\n")
    elif st and st.verdict:
        print_verdict(st.verdict)
    code = EXIT_CODES.get(st.verdict.status if st and st.verdict else "", 1)
    raise typer.Exit(code)


def status(
    run_dir: Annotated[Path, typer.Argument(help="run directory (runs/<run-id>)")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a run's state, current stage, progress and gate results (stale and unreadable
    verdicts, and the failed gates the config allows, are named)."""
    from ..pipeline import run_status

    st = _guard(lambda: run_status(run_dir))
    if as_json:
        sys.stdout.write(st.model_dump_json() + "\n")  # type: ignore[union-attr]
        return
    _print_status(st)


def runs_cmd(
    root: Annotated[Path, typer.Argument(help="folder holding run directories")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the runs under a folder (newest first)."""
    import json

    from ..pipeline import list_runs

    runs = list_runs(root)
    if as_json:
        sys.stdout.write(json.dumps([r.model_dump(mode="json") for r in runs]) + "\n")
        return
    table = Table(title=f"runs in {escape(str(root))}")
    for c in ("run", "state", "stage", "message"):
        table.add_column(c)
    for r in runs:
        style = _STYLE.get(r.state, "")
        table.add_row(escape(r.run_id), f"[{style}]{r.state}[/]" if style else r.state,
                      r.current_stage or "", escape(r.message))
    out.print(table)


def register(app: typer.Typer) -> None:
    """Add ``run``, ``resume``, ``stage``, ``status`` and ``runs`` to ``app``."""
    app.command()(run)
    app.command()(resume)
    app.command()(stage)
    app.command()(status)
    app.command("runs")(runs_cmd)
