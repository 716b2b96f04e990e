"""``realign kl``: KL(policy ‖ reference) of two saved models on a probe file, gated.

A thin adapter over :func:`realign.backends.trl.kl_between` (the MCP tool
``compute_kl`` calls the same function), or :func:`realign.backends.mlx.kl_between`
with ``--backend mlx``. Exit codes: 0 the ``kl_divergence`` gate
passes, 1 it fails, 2 bad input, 3 unmeasured.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import RealignError
from ..gates import EXIT_CODES
from ._common import STATUS_STYLE, fail_input, out, thresholds_from


def kl(
    policy: Annotated[str, typer.Argument(help="policy model: a folder (full model or PEFT adapter), 'default' or a hub id")],
    probe: Annotated[Path, typer.Option(help="preference pairs whose completions are scored (any supported format)")],
    reference: Annotated[Optional[str], typer.Option(help="reference model (omit for a PEFT adapter: its base with adapters disabled)")] = None,
    completion: Annotated[str, typer.Option(help="which response is scored: chosen or rejected")] = "chosen",
    max_examples: Annotated[int, typer.Option(help="first N pairs of the probe file")] = 64,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    max_length: Annotated[int, typer.Option(help="tokens per sequence")] = 512,
    device: Annotated[Optional[str], typer.Option(help="cuda, mps or cpu (default: the best available); with --backend mlx: gpu or cpu")] = None,
    backend: Annotated[str, typer.Option(help="trl (PyTorch), mlx (Apple Silicon; mlx[cpu] on Linux) or auto (mlx on Apple Silicon when installed, else trl)")] = "auto",
    preset: Annotated[str, typer.Option(help="threshold preset: relaxed, standard, strict")] = "standard",
    threshold: Annotated[Optional[list[str]], typer.Option("--threshold", help="override one gate: NAME=VALUE (repeatable)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """KL(policy || reference): mean per-token KL over the completion tokens of a probe set."""
    t = thresholds_from(preset, threshold)
    if completion not in ("chosen", "rejected"):
        fail_input(f"--completion must be chosen or rejected, got '{completion}'")
    if max_examples < 1 or batch_size < 1 or max_length < 8:
        fail_input("--max-examples and --batch-size must be ≥ 1, --max-length ≥ 8")
    from ..backends import BACKENDS, default_backend_name

    if backend not in BACKENDS:
        fail_input(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    name = default_backend_name() if backend == "auto" else backend
    try:
        if name == "mlx":
            from ..backends.mlx import kl_between
        else:
            from ..backends.trl import kl_between
            from ..backends.trl_train import quiet_hf

            quiet_hf()
        res = kl_between(policy, probe, reference, completion=completion,
                         max_examples=max_examples, batch_size=batch_size,
                         max_length=max_length, device=device, thresholds=t)
    except (RealignError, ValueError, OSError) as e:
        fail_input(str(e))
        raise  # unreachable
    code = EXIT_CODES["incomplete" if res.gate.status == "unmeasured" else res.gate.status]
    if as_json:
        sys.stdout.write(res.model_dump_json() + "\n")
        raise typer.Exit(code)
    g = res.gate
    table = Table(title=f"KL(policy || {reference or 'adapters disabled'}) on {probe.name}")
    for c in ("gate", "value", "threshold", "status"):
        table.add_column(c)
    table.add_row(g.name, f"{g.value:.6g}" if g.value is not None else "—",
                  f"{g.op} {g.threshold:g}", f"[{STATUS_STYLE[g.status]}]{g.status}[/]")
    table.caption = (f"{res.examples} pairs, {res.tokens} {completion} tokens; "
                     f"mean per-sequence KL {res.mean_per_sequence:.4g} nats")
    out.print(table)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``kl`` to ``app``."""
    app.command()(kl)
