"""``realign validate`` (stage 2's checks on a preference file) and ``realign thresholds``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..errors import InputError, RealignError
from ..gates import GAP_MIN_COVERAGE
from ._common import emit, err, fail_input, out, progress_bar, thresholds_from


def _decontam_defaults() -> dict[str, Any]:
    from ..decontamination import DecontamConfig

    return DecontamConfig().model_dump()


_DECONTAM_DEFAULTS = _decontam_defaults()
_GAP_MIN_COVERAGE = GAP_MIN_COVERAGE


def validate(
    pairs: Annotated[Path, typer.Argument(help="preference data: .jsonl, .json, .parquet or a saved dataset folder")],
    eval: Annotated[Optional[list[Path]], typer.Option("--eval", help="evaluation set to decontaminate against (repeatable)")] = None,
    eval_field: Annotated[Optional[str], typer.Option(help="text field of the evaluation sets (default: prompt, question, text, input, ...)")] = None,
    benchmark: Annotated[Optional[list[str]], typer.Option("--benchmark", help="benchmark to decontaminate against, by name: a shipped suite (realign_knowledge, realign_arith, realign_format) or an lm-eval task (repeatable)")] = None,
    preset: Annotated[str, typer.Option(help="threshold preset: relaxed, standard, strict")] = "standard",
    threshold: Annotated[Optional[list[str]], typer.Option("--threshold", help="override one gate: NAME=VALUE (repeatable)")] = None,
    score_scale: Annotated[str, typer.Option(help="scale of score_chosen/score_rejected: LO-HI (e.g. 1-10; LO:HI for negative bounds) or auto: read from the scores only when their lowest and highest values are the two ends of 0-1, 1-5, 1-10, 0-10 or 0-100")] = "auto",
    gap_min_coverage: Annotated[float, typer.Option(help="least share of usable pairs with both scores for preference_gap to be measured (0 < share <= 1)")] = _GAP_MIN_COVERAGE,
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
    from ..decontamination import DecontamConfig
    from ..validation import validate_file

    thresholds = thresholds_from(preset, threshold)
    if drop_negative_gap and reward_model is None:
        fail_input("--drop-negative-gap needs --reward-model")
    try:
        decontam = DecontamConfig(ngram=ngram, min_coverage=min_coverage)
    except ValueError as e:
        fail_input(f"--ngram/--min-coverage: {e.errors()[0]['msg']}")  # type: ignore[attr-defined]
    if not 0 < gap_min_coverage <= 1:  # also refuses NaN
        fail_input(f"--gap-min-coverage must be in (0, 1], got {gap_min_coverage:g}")
    try:
        size = pairs.stat().st_size if pairs.is_file() else 0
    except OSError:
        size = 0
    try:
        with progress_bar(f"validating {pairs.name}", size, enabled=err.is_terminal) as cb:
            verdict = validate_file(
                pairs, eval_sets=list(eval or []), eval_field=eval_field,
                benchmarks=list(benchmark or []), thresholds=thresholds,
                score_scale=score_scale, gap_min_coverage=gap_min_coverage, decontam=decontam,
                skip_bad_rows=skip_bad_rows, write_clean=write_clean, split=split, progress=cb)
        if verdict.findings["preference_gap"]["scale_source"] == "declared":
            verdict.findings["preference_gap"]["scale_declared_by"] = "--score-scale"
        if reward_model is not None:
            from ..reward import apply_reward_gap

            verdict = apply_reward_gap(verdict, pairs, reward_model, thresholds=thresholds, split=split,
                                       skip_bad_rows=skip_bad_rows, drop_negative=drop_negative_gap)
    except InputError as e:
        fail_input(str(e))
    except (RealignError, ValueError) as e:
        fail_input(str(e))
    except OSError as e:  # a path that cannot be read or written: bad input, not a crash
        where = f"{e.filename}: " if e.filename else ""
        fail_input(f"{where}{e.strerror or e}")
    except RecursionError:
        fail_input(f"{pairs}: input nested too deeply to process")
    emit(verdict, as_json)


def thresholds(
    preset: Annotated[str, typer.Option(help="preset to show")] = "standard",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the gate thresholds of a preset."""
    from ..gates import GATE_SPECS

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


def register(app: typer.Typer) -> None:
    """Add ``validate`` and ``thresholds`` to ``app``."""
    app.command()(validate)
    app.command()(thresholds)
