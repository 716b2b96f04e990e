"""Stage 2, preference data: validate the configured pairs and split them, or, in
generation mode (config ``prompts``), generate the pairs from the model first.

Pairs (config ``data``): runs :func:`realign.validation.validate_file` (gates
``min_pairs``, ``preference_gap``, ``decontamination``, ``length_bias``) with
``--write-clean`` into the stage folder, then converts the usable pairs to TRL's
conversational format and splits them into ``train.jsonl`` and ``heldout.jsonl``
(:func:`realign.rows.split_heldout`).

Generation mode (config ``prompts``): the prompts are split first
(:func:`realign.generation.split_prompts`, the split stage 1 computes too); for every
prompt, train and held-out, ``generation.samples`` responses are sampled from the stage-1
model, scored by the verifier (or a reward model, ``generation.scorer``) and the best is
paired with the worst (:func:`realign.generation.generate_pairs`); prompts without a real
difference give no pair. The pairs (``generated.jsonl``; every sample with its score in
``candidates.jsonl``) then pass the same validation, on the 0-1 score scale, and each
usable pair goes to the side of its prompt. ``train_prompts.jsonl`` /
``heldout_prompts.jsonl`` keep every prompt with its ground truth: stage 6 samples from
the train prompts and measures on the held-out ones; stage 7 judges all held-out prompts.

Decontamination covers, without being told, every benchmark the run evaluates: the
``sft.benchmarks`` suites (stage 1's baseline and stage 7's retention; every item, not
only ``benchmark_limit``), plus the ``eval_sets`` files. Each hit names its set; a
benchmark whose items cannot be loaded is named in the gate's detail and in a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import file_digest, write_jsonl_atomic
from ..gates import StageVerdict, make_verdict
from ..rows import read_rows, split_heldout, to_trl_row
from ..validation import validate_file
from .context import RunContext, generation_scorer

NAME = "preference_data"


def run(ctx: RunContext) -> StageVerdict:
    cfg = ctx.config
    if cfg.prompts is not None:
        return _generate(ctx)
    out = ctx.stage_dir(NAME)
    assert cfg.data is not None
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
        _write_split(verdict, out, train, heldout)
    verdict.artifacts["clean_digest"] = file_digest(clean)
    return verdict


def _write_split(verdict: StageVerdict, out: Path, train: list[dict[str, Any]],
                 heldout: list[dict[str, Any]]) -> None:
    write_jsonl_atomic(out / "train.jsonl", train)
    write_jsonl_atomic(out / "heldout.jsonl", heldout)
    verdict.artifacts.update(
        train=str(out / "train.jsonl"), heldout=str(out / "heldout.jsonl"),
        train_pairs=len(train), heldout_pairs=len(heldout),
        train_digest=file_digest(out / "train.jsonl"),
        heldout_digest=file_digest(out / "heldout.jsonl"))


def _generate(ctx: RunContext) -> StageVerdict:
    """Generation mode (see the module doc)."""
    from ..backends.trl import TRLBackend
    from ..backends.trl_train import quiet_hf
    from ..generation import generate_pairs, prompt_key, read_prompt_rows, split_prompts
    from ..reward import load_reward_model

    quiet_hf()
    cfg, g = ctx.config, ctx.config.generation
    assert cfg.prompts is not None
    out = ctx.stage_dir(NAME)
    rows = read_prompt_rows(cfg.prompts)
    train_p, held_p = split_prompts(rows, fraction=cfg.heldout.fraction,
                                    min_pairs=cfg.heldout.min_pairs,
                                    max_pairs=cfg.heldout.max_pairs, seed=cfg.seed)
    scorer, rm_path = generation_scorer(ctx, rows, stage=2)
    model = ctx.base_model()
    ctx.progress(0, None, f"loading {Path(model).name} to sample from")
    policy = TRLBackend().load(model, device=cfg.device)
    rm = load_reward_model(rm_path, device=cfg.device) if scorer == "reward_model" else None
    res = generate_pairs(policy, train_p + held_p, samples=g.samples, temperature=g.temperature,
                         top_p=g.top_p, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                         max_length=cfg.dpo.max_length, seed=cfg.seed, scorer=scorer,
                         reward_model=rm, reward_max_length=cfg.reward.max_length,
                         pairing=g.pairing, min_gap=g.min_score_gap, file=cfg.prompts,
                         progress=ctx.progress)
    del policy, rm
    held_keys = {prompt_key(r.prompt) for r in held_p}
    for rec in res.records:
        rec["split"] = "heldout" if prompt_key(rec["prompt"]) in held_keys else "train"
    generated = out / "generated.jsonl"
    write_jsonl_atomic(generated, res.pairs)
    res.write_records(out / "candidates.jsonl")
    for name, part in (("train_prompts", train_p), ("heldout_prompts", held_p)):
        write_jsonl_atomic(out / f"{name}.jsonl", [{"prompt": r.prompt, **r.truth} for r in part])

    clean = out / "clean.jsonl"
    ctx.progress(0, None, "validating the generated pairs")
    if res.pairs:
        verdict = validate_file(
            generated, eval_sets=list(cfg.eval_sets), eval_field=cfg.eval_field,
            benchmarks=list(cfg.sft.benchmarks), thresholds=ctx.thresholds, score_scale="0-1",
            gap_min_coverage=cfg.gap_min_coverage, write_clean=clean,
            progress=lambda d, t: ctx.progress(d, t, "validating the generated pairs"))
        verdict.findings["preference_gap"]["scale_declared_by"] = (
            f"generation: {scorer.replace('_', ' ')} scores on 0-1")
    else:
        why = "no prompt gave a pair (see findings.generation.dropped)"
        t = ctx.thresholds
        verdict = make_verdict(NAME, [
            t.evaluate("min_pairs", 0, detail=f"0 usable pairs: {why}"),
            t.evaluate("preference_gap", None, detail=f"unmeasured: {why}"),
            t.evaluate("decontamination", None, detail=f"unmeasured: {why}"),
            t.evaluate("length_bias", None, detail=f"unmeasured: {why}")], t)
    usable = [to_trl_row(r) for r in read_rows(clean)] if res.pairs else []
    held = [prompt_key(r["prompt"]) in held_keys for r in usable]
    train = [r for r, h in zip(usable, held) if not h]
    heldout = [r for r, h in zip(usable, held) if h]
    if usable:
        _write_split(verdict, out, train, heldout)
    by_split = {s: {"prompts": sum(1 for r in res.records if r["split"] == s),
                    "pairs": sum(1 for r in res.records if r["split"] == s and r["chosen"] is not None)}
                for s in ("train", "heldout")}
    verdict.findings["generation"] = {**res.stats, "model": model, "by_split": by_split,
                                      "reward_model": rm_path, "prompts_file": cfg.prompts}
    verdict.warnings.extend(res.warnings)
    if res.stats["pairs"] == 0:
        verdict.warnings.append(
            f"no prompt gave a pair: all {g.samples} samples of every prompt scored the same "
            f"(mean score {res.stats['mean_score']}); raise generation.temperature or "
            "generation.samples, or use prompts the model solves sometimes")
    verdict.artifacts.update(
        input=str(cfg.prompts), format="generated", generated=str(generated),
        generated_digest=file_digest(generated),
        train_prompts=str(out / "train_prompts.jsonl"),
        heldout_prompts=str(out / "heldout_prompts.jsonl"),
        train_prompts_digest=file_digest(out / "train_prompts.jsonl"),
        heldout_prompts_digest=file_digest(out / "heldout_prompts.jsonl"),
        clean_digest=file_digest(clean) if clean.exists() else None)
    if clean.exists():
        verdict.artifacts["clean"] = str(clean)
    return verdict
