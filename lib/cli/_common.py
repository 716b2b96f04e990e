"""Helpers shared by the command modules: consoles, errors, thresholds, progress, verdicts.

Imports nothing from :mod:`realign.cli`, so any command module can import it without a cycle.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..gates import (
    EXIT_BAD_INPUT,
    EXIT_CODES,
    PRESETS,
    StageVerdict,
    Thresholds,
    parse_overrides,
)

__all__ = ["PROGRESS_MIN_BYTES", "STATUS_STYLE", "emit", "err", "fail_input", "out",
           "print_verdict", "progress_bar", "remedy_text", "thresholds_from"]

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


def remedy_text(remedy: str | None) -> str:
    """A gate's remedy as Rich markup for a table cell ('' when it has none)."""
    return f"\n[cyan]→ {escape(remedy)}[/]" if remedy else ""


def print_verdict(verdict: StageVerdict, *, top: int = 10) -> None:
    """Human output: the gate table and the top findings with line numbers."""
    table = Table(title=f"stage: {verdict.stage} ({verdict.preset} preset)", show_lines=False)
    for col in ("gate", "value", "threshold", "status", "detail → remedy"):
        table.add_column(col, overflow="fold")
    for g in verdict.gates:
        value = "—" if g.value is None else f"{g.value:.4g}"
        thr = f"{g.op} {g.threshold:g}" + (" (override)" if g.overridden else "")
        table.add_row(g.name, value, thr, f"[{STATUS_STYLE[g.status]}]{g.status}[/]",
                      escape(g.detail) + remedy_text(g.remedy))
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
