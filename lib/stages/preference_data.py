"""Stage 2, preference data: validate the configured pairs and split them.

Runs :func:`realign.validation.validate_file` (gates ``min_pairs``, ``preference_gap``,
``decontamination``, ``length_bias``) with ``--write-clean`` into the stage folder, then
converts the usable pairs to TRL's conversational format and splits them into
``train.jsonl`` and ``heldout.jsonl`` (:func:`realign.rows.split_heldout`).

Decontamination covers, without being told, every benchmark the run evaluates: the
``sft.benchmarks`` suites (stage 1's baseline and stage 7's retention; every item, not
only ``benchmark_limit``), plus the ``eval_sets`` files. Each hit names its set; a
benchmark whose items cannot be loaded is named in the gate's detail and in a warning.
"""

from __future__ import annotations

from pathlib import Path

from ..fileio import file_digest, write_jsonl_atomic
from ..gates import StageVerdict
from ..rows import read_rows, split_heldout, to_trl_row
from ..validation import validate_file
from .context import RunContext

NAME = "preference_data"


def run(ctx: RunContext) -> StageVerdict:
    cfg = ctx.config
    out = ctx.stage_dir(NAME)
    src = Path(cfg.data)
    clean = out / ("clean" + (src.suffix if src.is_file() else ""))
    ctx.progress(0, None, "validating preference data")

    def prog(done: int, total: int) -> None:
        ctx.progress(done, total, "validating preference data")

    verdict = validate_file(
        cfg.data, eval_sets=list(cfg.eval_sets), eval_field=cfg.eval_field,
        benchmarks=list(cfg.sft.benchmarks), thresholds=ctx.thresholds,
        score_scale=cfg.score_scale, gap_min_coverage=cfg.gap_min_coverage,
        skip_bad_rows=cfg.skip_bad_rows, write_clean=clean, split=cfg.data_split, progress=prog)
    if verdict.findings["preference_gap"]["scale_source"] == "declared":
        verdict.findings["preference_gap"]["scale_declared_by"] = "config score_scale"
    rows = [to_trl_row(r) for r in read_rows(clean)]
    if len(rows) >= 2:
        train, heldout = split_heldout(rows, fraction=cfg.heldout.fraction,
                                       min_pairs=cfg.heldout.min_pairs,
                                       max_pairs=cfg.heldout.max_pairs, seed=cfg.seed)
        write_jsonl_atomic(out / "train.jsonl", train)
        write_jsonl_atomic(out / "heldout.jsonl", heldout)
        verdict.artifacts.update(
            train=str(out / "train.jsonl"), heldout=str(out / "heldout.jsonl"),
            train_pairs=len(train), heldout_pairs=len(heldout),
            train_digest=file_digest(out / "train.jsonl"),
            heldout_digest=file_digest(out / "heldout.jsonl"))
    verdict.artifacts["clean_digest"] = file_digest(clean)
    return verdict
