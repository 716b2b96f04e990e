"""``realign init``: write a commented run config for this machine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import RealignError
from ..gates import PRESETS
from ._common import err, fail_input, out


def init(
    model: Annotated[str, typer.Option(help="starting model: 'default', a folder or a hub id")] = "default",
    data: Annotated[Optional[str], typer.Option(
        help="preference pairs (file, saved dataset or hub id); default: a placeholder to edit")] = None,
    preset: Annotated[str, typer.Option(help="threshold preset: " + ", ".join(PRESETS))] = "standard",
    output: Annotated[Path, typer.Option("--output", "-o", help="config file to write")] = Path("run.yaml"),
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="measure the DPO batch size on this machine now (a quick sweep, "
                            "minutes); default: a cached calibration, else the default")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print what was written as JSON")] = False,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="config values KEY=VALUE (e.g. stages=[preference_data] dpo.beta=0.2), checked "
             "by the run config's schema", metavar="KEY=VALUE", show_default=False)] = None,
) -> None:
    """Write a commented run config (every field with its meaning, range and default),
    with this machine's DPO batch size, check it, and print the command that runs it.

    The batch size comes from `realign calibrate`'s cached measurement for this machine,
    model and length when there is one (--calibrate measures it now); else it is the
    default, and the file says so. An existing file is kept unless --force.
    """
    from ..init_config import write_run_config

    if preset not in PRESETS:
        fail_input(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")

    def say(msg: str) -> None:
        err.print(f"[dim]calibrate: {escape(msg)}[/]")

    try:
        res = write_run_config(output, model=model, data=data, preset=preset,
                               overrides=list(overrides or []), force=force,
                               calibrate=calibrate, progress=say)
    except RealignError as e:
        fail_input(str(e))
        return
    if as_json:
        sys.stdout.write(res.model_dump_json() + "\n")
        return
    b = res.batch
    out.print(f"wrote {escape(res.path)}: model {escape(str(res.config['model']))}, "
              f"preset {res.config['preset']}, stages {', '.join(res.config['stages'])}",
              highlight=False)
    out.print(f"this machine: {escape(b.hardware)}", highlight=False)
    out.print(f"dpo.batch_size {b.batch_size} × gradient_accumulation_steps "
              f"{b.gradient_accumulation_steps} ({b.source})", highlight=False)
    for n in res.notes:
        out.print(f"[yellow]note:[/] {escape(n)}", highlight=False)
    out.print(f"next: [bold]{escape(res.next_command)}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``init`` to ``app``."""
    app.command()(init)
