"""The ``realign`` command line: a thin Typer + Rich adapter over the library.

Exit codes (DESIGN.md): 0 pass, 1 a gate failed, 2 bad input or usage, 3 incomplete.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table

from .errors import InputError, RealignError
from .gates import EXIT_BAD_INPUT, EXIT_CODES, PRESETS, StageVerdict, Thresholds, parse_overrides

app = typer.Typer(
    name="realign",
    help="DPO realignment with a measured quality gate after every stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
skill_app = typer.Typer(help="Install the realign-dpo-workflow skill for an agent.",
                        no_args_is_help=True)
app.add_typer(skill_app, name="skill")

out = Console()
err = Console(stderr=True)

#: Files larger than this get a progress bar.
PROGRESS_MIN_BYTES = 16 << 20

STATUS_STYLE = {"pass": "green", "fail": "bold red", "unmeasured": "yellow",
                "incomplete": "yellow"}


def fail_input(message: str) -> None:
    """Print a one-line error and exit 2."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def thresholds_from(preset: str, overrides: list[str] | None) -> Thresholds:
    if preset not in PRESETS:
        fail_input(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    try:
        return Thresholds(preset=preset, overrides=parse_overrides(overrides))  # type: ignore[arg-type]
    except ValueError as e:
        fail_input(str(e))
        raise  # unreachable


@contextmanager
def progress_bar(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A Rich progress bar on stderr for large inputs; yields a (done, total) callback."""
    if not enabled or total < PROGRESS_MIN_BYTES:
        yield None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)

        def update(done: int, tot: int) -> None:
            bar.update(task, completed=done, total=tot)

        yield update


def print_verdict(verdict: StageVerdict, *, top: int = 10) -> None:
    """Human output: the gate table and the top findings with line numbers."""
    table = Table(title=f"stage: {verdict.stage} ({verdict.preset} preset)", show_lines=False)
    for col in ("gate", "value", "threshold", "status", "detail"):
        table.add_column(col, overflow="fold")
    for g in verdict.gates:
        value = "—" if g.value is None else f"{g.value:.4g}"
        thr = f"{g.op} {g.threshold:g}" + (" (override)" if g.overridden else "")
        table.add_row(g.name, value, thr, f"[{STATUS_STYLE[g.status]}]{g.status}[/]", g.detail)
    out.print(table)
    f = verdict.findings
    for key in ("malformed", "duplicates", "identical", "empty", "contaminated"):
        items = f.get(key) or []
        if not items:
            continue
        shown = items[:top]
        if key == "malformed":
            text = "; ".join(f"line {m['line']}: {m['error']}" for m in shown)
        elif key == "contaminated":
            hits = f.get("contamination", {}).get("hits", [])[:top]
            text = ", ".join(f"line {h['line']} ⊃ {Path(h['eval_set']).name}:{h['eval_line']} "
                             f"({h['coverage']:.0%})" for h in hits)
        else:
            text = "lines " + ", ".join(str(x) for x in shown)
        more = f" … and {len(items) - top} more" if len(items) > top else ""
        out.print(f"[bold]{key}[/] ({len(items)}): {text}{more}", highlight=False)
    for w in verdict.warnings:
        out.print(f"[yellow]warning:[/] {escape(w)}")
    out.print(f"verdict: [{STATUS_STYLE[verdict.status]}]{verdict.status}[/]")


def emit(verdict: StageVerdict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(verdict.model_dump_json() + "\n")
    else:
        print_verdict(verdict)
    raise typer.Exit(EXIT_CODES[verdict.status])


def _decontam_defaults() -> dict[str, Any]:
    from .decontamination import DecontamConfig

    return DecontamConfig().model_dump()


_DECONTAM_DEFAULTS = _decontam_defaults()


@app.command()
def validate(
    pairs: Annotated[Path, typer.Argument(help="preference data: .jsonl, .json, .parquet or a saved dataset folder")],
    eval: Annotated[Optional[list[Path]], typer.Option("--eval", help="evaluation set to decontaminate against (repeatable)")] = None,
    eval_field: Annotated[Optional[str], typer.Option(help="text field of the evaluation sets (default: prompt, question, text, input, ...)")] = None,
    preset: Annotated[str, typer.Option(help="threshold preset: relaxed, standard, strict")] = "standard",
    threshold: Annotated[Optional[list[str]], typer.Option("--threshold", help="override one gate: NAME=VALUE (repeatable)")] = None,
    score_scale: Annotated[str, typer.Option(help="scale of score_chosen/score_rejected: auto or LO-HI, e.g. 1-10")] = "auto",
    ngram: Annotated[int, typer.Option(help="decontamination n-gram size (words)")] = _DECONTAM_DEFAULTS["ngram"],
    min_coverage: Annotated[float, typer.Option(help="share of an eval item's words a pair must cover to count as contaminated")] = _DECONTAM_DEFAULTS["min_coverage"],
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="skip malformed rows (listed as findings) instead of stopping")] = False,
    split: Annotated[Optional[str], typer.Option(help="split of a saved DatasetDict")] = None,
    write_clean: Annotated[Optional[Path], typer.Option(help="write the usable pairs here, in the input's format")] = None,
    reward_model: Annotated[Optional[Path], typer.Option(help="score the usable pairs with this reward model (stage 4) for preference_gap")] = None,
    drop_negative_gap: Annotated[Optional[Path], typer.Option(help="with --reward-model: write the input without pairs whose gap is negative")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the stage verdict as one JSON object")] = False,
) -> None:
    """Validate preference pairs: usable count, gap, decontamination, length bias."""
    from .decontamination import DecontamConfig
    from .validation import validate_file

    thresholds = thresholds_from(preset, threshold)
    if drop_negative_gap and reward_model is None:
        fail_input("--drop-negative-gap needs --reward-model")
    try:
        decontam = DecontamConfig(ngram=ngram, min_coverage=min_coverage)
    except ValueError as e:
        fail_input(f"--ngram/--min-coverage: {e.errors()[0]['msg']}")  # type: ignore[attr-defined]
    size = pairs.stat().st_size if pairs.is_file() else 0
    try:
        with progress_bar(f"validating {pairs.name}", size, enabled=err.is_terminal) as cb:
            verdict = validate_file(
                pairs, eval_sets=list(eval or []), eval_field=eval_field, thresholds=thresholds,
                score_scale=score_scale, decontam=decontam, skip_bad_rows=skip_bad_rows,
                write_clean=write_clean, split=split, progress=cb)
        if reward_model is not None:
            from .reward import apply_reward_gap

            verdict = apply_reward_gap(verdict, pairs, reward_model, thresholds=thresholds, split=split,
                                       skip_bad_rows=skip_bad_rows, drop_negative=drop_negative_gap)
    except InputError as e:
        fail_input(str(e))
    except (RealignError, ValueError) as e:
        fail_input(str(e))
    emit(verdict, as_json)


@app.command()
def thresholds(
    preset: Annotated[str, typer.Option(help="preset to show")] = "standard",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the gate thresholds of a preset."""
    from .gates import GATE_SPECS

    t = thresholds_from(preset, None)
    rows = [{"name": n, "stage": s.stage, "op": s.op, "threshold": t.get(n),
             "description": s.description} for n, s in GATE_SPECS.items()]
    if as_json:
        sys.stdout.write(json.dumps({"preset": preset, "gates": rows}) + "\n")
        return
    table = Table(title=f"{preset} preset")
    for c in ("stage", "gate", "threshold", "measures"):
        table.add_column(c)
    for r in rows:
        table.add_row(str(r["stage"]), r["name"], f"{r['op']} {r['threshold']:g}", r["description"])
    out.print(table)


@skill_app.command("install")
def skill_install(
    target: Annotated[Optional[Path], typer.Option(help="skills folder entry to create")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing install")] = False,
) -> None:
    """Copy the skill files (SKILL.md, workflow.md, templates.md, docs/) for an agent."""
    from .skill import DEFAULT_TARGET, install_skill

    try:
        dest = install_skill(target or DEFAULT_TARGET, force=force)
    except (InputError, FileExistsError, FileNotFoundError) as e:
        fail_input(str(e))
    out.print(f"installed the realign-dpo-workflow skill in {dest}")


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    try:
        return app(args=argv, standalone_mode=True)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


# Command modules register their commands on `app` (one small module per area).
def _register_commands() -> None:
    import importlib

    for mod in ("cli_pipeline", "cli_eval", "cli_ifd", "cli_calibrate", "cli_report", "cli_tools"):
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise


_register_commands()
