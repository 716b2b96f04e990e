"""CLI command ``realign ifd``: instruction-following difficulty of a data set."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import InputError, RealignError
from ._common import err, fail_input, out


def ifd(
    data: Annotated[Path, typer.Argument(help="SFT or preference data: .jsonl, .json or .parquet")],
    model: Annotated[str, typer.Option(help="causal LM: a local folder or 'default'")] = "default",
    top_k: Annotated[Optional[int], typer.Option(help="keep the K highest IFD ≤ --max-ifd (default cap 1)")] = None,
    max_ifd: Annotated[Optional[float], typer.Option(help="keep examples with IFD ≤ X")] = None,
    write: Annotated[Optional[Path], typer.Option(help="write the kept examples here, in the input's format")] = None,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 16,
    max_length: Annotated[int, typer.Option(help="tokens per sequence (longer answers are cut)")] = 512,
    device: Annotated[Optional[str], typer.Option(help="cuda, mps or cpu (default: the best available); with --backend mlx: gpu or cpu")] = None,
    backend: Annotated[str, typer.Option(help="trl (PyTorch), mlx (Apple Silicon; mlx[cpu] on Linux) or auto (mlx on Apple Silicon when installed, else trl)")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object: report and per-example scores")] = False,
) -> None:
    """IFD = PPL(answer | instruction) ÷ PPL(answer) per example, and its distribution."""
    from ..ifd import ifd_report, ifd_scores, read_examples, select_by_ifd, write_subset

    if (top_k is not None or max_ifd is not None) and write is None:
        fail_input("--top-k/--max-ifd select examples to write: add --write OUT")
    if top_k is not None and top_k < 0:
        fail_input("--top-k must be ≥ 0")
    if batch_size < 1 or max_length < 2:
        fail_input("--batch-size must be ≥ 1 and --max-length ≥ 2")
    from ..backends import BACKENDS, default_backend_name, get_backend

    if backend not in BACKENDS:
        fail_input(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    name = default_backend_name() if backend == "auto" else backend
    try:
        examples, fmt, raw = read_examples(data)
        if not examples:
            raise InputError("no examples", file=data)
        if name == "trl":
            from ..backends.trl_train import quiet_hf

            quiet_hf()
        be = get_backend(name)
        handle = be.load(model, device=device)
        with _progress(len(examples), err.is_terminal and not as_json) as cb:
            res = ifd_scores(handle, [e.prompt for e in examples], [e.answer for e in examples],
                             batch_size=batch_size, max_length=max_length, backend=be,
                             progress=cb)
    except InputError as e:
        fail_input(str(e))
        raise  # unreachable
    except (RealignError, ValueError) as e:
        fail_input(str(e))
        raise
    report = ifd_report(res.ifd)
    result: dict[str, object] = {"data": str(data), "model": handle.source, "backend": name,
                                 "report": report.model_dump(), "scores": res.ifd,
                                 "lines": [e.line for e in examples]}
    if write is not None:
        keep = select_by_ifd(res.ifd, top_k=top_k, max_ifd=max_ifd)
        write_subset(write, fmt, raw, keep)
        result["written"] = {"path": str(write), "kept": len(keep), "of": len(examples),
                             "top_k": top_k, "max_ifd": max_ifd}
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    table = Table(title=f"IFD of {data.name} ({report.measured} of {report.n} examples measured)")
    table.add_column("statistic")
    table.add_column("value")
    table.add_row("mean", "—" if report.mean is None else f"{report.mean:.4f}")
    for k, v in report.quantiles.items():
        table.add_row(k, f"{v:.4f}")
    table.add_row("share IFD > 1", "—" if report.share_above_1 is None else f"{report.share_above_1:.1%}")
    out.print(table)
    if write is not None:
        w = result["written"]
        out.print(f"kept {w['kept']} of {w['of']} examples → {write}")  # type: ignore[index]


class _progress:
    """A Rich progress bar on stderr (examples scored), or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self):  # type: ignore[no-untyped-def]
        if not self.enabled:
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]IFD"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=err, transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("ifd", total=self.total)
        return lambda done, total: self.bar.update(task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def register(app: typer.Typer) -> None:
    """Add ``ifd`` to ``app``."""
    app.command()(ifd)
