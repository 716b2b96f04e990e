"""``realign eval``: capability benchmarks through lm-evaluation-harness (thin adapter).

Exit codes: 0 the benchmarks ran, 2 bad input (unknown suite, unloadable model, an
lm-eval task that needs the hub while offline).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import InputError, RealignError
from ._common import err, fail_input, out


def eval_cmd(
    model: Annotated[str, typer.Option(help="model directory, hub id, or 'default' (SmolLM2-135M-Instruct)")] = "default",
    suite: Annotated[Optional[list[str]], typer.Option("--suite", help="shipped suite or lm-eval task name (repeatable; default: the shipped suites)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="evaluate only the first N items of each suite")] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size")] = 16,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, mps (default: best available)")] = None,
    chat_template: Annotated[Optional[bool], typer.Option("--chat-template/--no-chat-template", help="force the chat template on/off (default: per suite)")] = None,
    include_path: Annotated[Optional[list[Path]], typer.Option("--include-path", help="folder of your own lm-eval task YAMLs (repeatable)")] = None,
    list_only: Annotated[bool, typer.Option("--list", help="list the shipped suites and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the results (with per-item scores) as one JSON object")] = False,
) -> None:
    """Benchmark a model on the offline suites or any lm-eval task (per-item results kept)."""
    from ..evaluation import DEFAULT_SUITES, list_suites

    if list_only:
        suites = list_suites()
        if as_json:
            sys.stdout.write("[" + ",".join(s.model_dump_json() for s in suites) + "]\n")
            return
        table = Table(title="shipped offline suites")
        for c in ("suite", "items", "metric", "chance", "chat template", "what"):
            table.add_column(c, overflow="fold")
        for s in suites:
            table.add_row(s.name, str(s.n_items), s.metric, f"{s.chance:g}",
                          "yes" if s.chat_template else "no", s.description)
        out.print(table)
        return
    if limit is not None and limit < 1:
        fail_input(f"--limit must be >= 1, got {limit}")
    from ..backends.trl import TRLBackend
    from ..evaluation import evaluate_model

    try:
        handle = TRLBackend().load(model, device=device)
        results = evaluate_model(handle.model, handle.tokenizer, list(suite or DEFAULT_SUITES),
                                 limit=limit, batch_size=batch_size,
                                 apply_chat_template=chat_template,
                                 include_path=list(include_path or []))
    except (InputError, RealignError) as e:
        fail_input(str(e))
        raise  # unreachable
    if as_json:
        sys.stdout.write(results.model_dump_json() + "\n")
        return
    table = Table(title=f"{model}: lm-eval {results.lm_eval_version}, {results.seconds:.1f} s on {results.device}")
    for c in ("suite", "metric", "score", "n", "chance", "chat template", "note"):
        table.add_column(c, overflow="fold")
    for r in results.suites.values():
        score = "—" if r.score is None else f"{r.score:.3f}"
        chance = "—" if r.chance is None else f"{r.chance:g}"
        table.add_row(r.suite, r.metric, score, str(r.n), chance,
                      "yes" if r.apply_chat_template else "no", r.detail)
    out.print(table)
    if any(r.score is None for r in results.suites.values()):
        err.print("[yellow]warning:[/] some suites have no score (see note)")


def register(app: typer.Typer) -> None:
    """Add ``eval`` to ``app``."""
    app.command("eval")(eval_cmd)
