"""CLI command ``realign verify``: run the verifiers on a data set, per row and in total."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import RealignError
from ..gates import EXIT_CODES
from ..gates import PRESETS
from ..verifiers import RLVR_VERIFIABILITY_MIN
from ._common import STATUS_STYLE, fail_input, out


def verify(
    data: Annotated[Path, typer.Argument(help="rows with prompt, response, and answer / tests / instructions: .jsonl, .json or .parquet")],
    as_json: Annotated[bool, typer.Option("--json", help="print the report (every row) as one JSON object")] = False,
    workers: Annotated[int, typer.Option(help="code rows run this many child processes at a time")] = 2,
    cpu_seconds: Annotated[int, typer.Option(help="CPU seconds per code row (RLIMIT_CPU)")] = 5,
    wall_seconds: Annotated[float, typer.Option(help="wall-clock seconds per code row")] = 10.0,
    memory_mb: Annotated[int, typer.Option(help="address space per code row, MiB (RLIMIT_AS)")] = 512,
    min_share: Annotated[Optional[float], typer.Option(help=f"gate: least share of rows a verifier can check (default: the preset's; standard {RLVR_VERIFIABILITY_MIN:g})")] = None,
    preset: Annotated[str, typer.Option(help="threshold preset: relaxed, standard, strict")] = "standard",
    show: Annotated[int, typer.Option(help="rows in the table (0: all)")] = 50,
) -> None:
    """Check responses with real verifiers (math, code, instructions, exact) and the share
    of rows they can check. Exit 0 when the share meets the gate, 1 when not, 2 on bad input."""
    from pydantic import ValidationError

    from ..sandbox import SandboxLimits
    from ..verifiers import verify_file

    if workers < 1:
        fail_input("--workers must be ≥ 1")
    if preset not in PRESETS:
        fail_input(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    if min_share is not None and not 0 <= min_share <= 1:
        fail_input("--min-share must be between 0 and 1")
    try:
        limits = SandboxLimits(cpu_seconds=cpu_seconds, wall_seconds=wall_seconds,
                               memory_mb=memory_mb)
    except ValidationError as e:
        first = e.errors()[0]
        fail_input(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}")
        raise  # unreachable
    try:
        report = verify_file(data, workers=workers, limits=limits, threshold=min_share,
                             preset=preset)
    except (RealignError, ValueError) as e:
        fail_input(str(e))
        raise  # unreachable
    if as_json:
        sys.stdout.write(report.model_dump_json() + "\n")
        raise typer.Exit(EXIT_CODES[report.status])
    table = Table(title=f"verifiers on {data.name}")
    for col in ("line", "verifier", "passed", "score", "reason"):
        table.add_column(col, overflow="fold")
    rows = report.results if show == 0 else report.results[:show]
    for r in rows:
        passed = "—" if r.passed is None else ("[green]yes[/]" if r.passed else "[red]no[/]")
        score = "—" if r.score is None else f"{r.score:.2f}"
        table.add_row(str(r.line), r.verifier or "—", passed, score, escape(r.reason))
    out.print(table)
    if len(rows) < report.rows:
        out.print(f"… {report.rows - len(rows)} more rows (--show 0 or --json for all)")
    how = ", ".join(f"{k} {v}" for k, v in report.by_verifier.items()) or "none"
    out.print(f"verifiable: {report.verifiable} of {report.rows} rows "
              f"({report.share_verifiable:.1%}) — {how}", highlight=False)
    for reason, n in report.not_verifiable.items():
        out.print(f"  not verifiable ({n}): {escape(reason)}", highlight=False)
    if report.checked:
        out.print(f"passed: {report.passed} of {report.checked} responses checked "
                  f"({report.pass_rate:.1%}), mean score {report.mean_score:.3f}",
                  highlight=False)
    g = report.gate
    out.print(f"gate {g.name}: {g.value:.4g} {g.op} {g.threshold:g} → "
              f"[{STATUS_STYLE[g.status]}]{g.status}[/] ({report.seconds:.2f} s)")
    raise typer.Exit(EXIT_CODES[report.status])


def register(app: typer.Typer) -> None:
    """Add ``verify`` to ``app``."""
    app.command()(verify)
