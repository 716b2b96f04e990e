"""Stage 4, preference modeling: a reward model trained on the stage-2 training split.

* Model: ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)`` on the
  stage-1 model (artifact ``model``; the configured model when stage 1 did not run),
  trained with TRL's ``RewardTrainer`` (loss −log σ(r(x, y_c) − r(x, y_r))); LoRA when
  ``reward.lora`` is set (adapters merged before saving). Saved to
  ``stages/4-reward_model/reward_model`` (artifact ``reward_model``).
* Gate ``reward_accuracy``: held-out share with r(chosen) > r(rejected) (ties wrong),
  Wilson 95% CI (:func:`realign.reward.wilson_interval`).
* Gate ``reward_overfit``: accuracy on (at most ``reward.train_eval_pairs``) training
  pairs − held-out accuracy.
* Gate ``preference_gap``, only when stage 2's gate was unmeasured (no explicit
  scores): mean over the held-out pairs (``reward.gap_pairs: all``: train + held-out) of
  tanh((r(c) − r(r)) / 2) = s(c) − s(r) with s(y) = σ(r(y) − r(y')), the Bradley–Terry
  probability (:func:`realign.reward.reward_gap`); the gate's detail says it was
  measured here, and ``findings.preference_gap_source`` records it.
* Findings (not gated): length-only baseline accuracy on the held-out pairs (the
  response with more words is predicted chosen, ties half), accuracy per length bucket,
  quantiles of the held-out margin r(c) − r(r), pairs with a negative gap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import file_digest, read_jsonl
from ..gates import GateResult, StageVerdict, make_verdict
from ..messages import as_text
from ..reward import (
    accuracy_by_length,
    length_baseline_accuracy,
    load_reward_model,
    pair_accuracy,
    quantiles,
    reward_gap,
    save_reward_model,
    score_pairs,
    train_reward_model,
    wilson_interval,
    words,
)
from ..rundir import metrics_log
from .context import RunContext

NAME = "reward_model"


def _split(ctx: RunContext, key: str) -> list[dict[str, Any]]:
    path = getattr(ctx.artifacts("preference_data"), key)
    if not path:
        raise RuntimeError(f"stage 2 (preference_data) has no '{key}' split; run it first")
    return read_jsonl(Path(path))


def run(ctx: RunContext) -> StageVerdict:
    from ..backends.trl_train import quiet_hf

    quiet_hf()
    cfg, rc = ctx.config, ctx.config.reward
    out = ctx.stage_dir(NAME)
    train, held = _split(ctx, "train"), _split(ctx, "heldout")
    base = ctx.base_model()

    ctx.progress(0, rc.max_steps if rc.max_steps > 0 else None, "reward model training")
    with metrics_log(ctx.rundir.metrics_path(NAME)) as log:
        model, tok = train_reward_model(
            base, train, output_dir=out / "checkpoints", learning_rate=rc.learning_rate,
            max_steps=rc.max_steps, num_epochs=rc.num_epochs, batch_size=rc.batch_size,
            gradient_accumulation_steps=rc.gradient_accumulation_steps,
            max_length=rc.max_length, seed=cfg.seed, lora=rc.lora, device=cfg.device,
            extra=rc.extra, progress=ctx.progress, log=lambda r: log({"train_log": r}))
    saved = save_reward_model(model, tok, out / "reward_model")
    del model
    model, tok = load_reward_model(saved, device=cfg.device)  # score what was saved

    def prog(label: str) -> Any:
        return lambda done, total: ctx.progress(done, total, label)

    hc, hr = score_pairs(model, tok, held, batch_size=rc.eval_batch_size,
                         max_length=rc.max_length, progress=prog("scoring held-out pairs"))
    sample = train[: rc.train_eval_pairs]
    tc, tr = score_pairs(model, tok, sample, batch_size=rc.eval_batch_size,
                         max_length=rc.max_length, progress=prog("scoring training pairs"))

    n = len(held)
    acc = pair_accuracy(hc, hr)
    right = sum(c > r for c, r in zip(hc, hr))
    train_acc = pair_accuracy(tc, tr)
    cw = [words(as_text(r["chosen"])) for r in held]
    rw = [words(as_text(r["rejected"])) for r in held]
    baseline = length_baseline_accuracy(cw, rw)
    gates: list[GateResult] = [
        ctx.thresholds.evaluate(
            "reward_accuracy", acc, ci95=wilson_interval(right, n),
            detail=(f"{right} of {n} held-out pairs have r(chosen) > r(rejected) (Wilson 95% CI); "
                    f"length-only baseline {baseline:.3f}" if n else "unmeasured: no held-out pairs")),
        ctx.thresholds.evaluate(
            "reward_overfit", None if acc is None or train_acc is None else train_acc - acc,
            detail=(f"train accuracy {train_acc:.3f} on {len(sample)} training pairs − held-out "
                    f"accuracy {acc:.3f}" if acc is not None and train_acc is not None
                    else "unmeasured: no pairs to score")),
    ]

    margins = [c - r for c, r in zip(hc, hr)]
    findings: dict[str, Any] = {
        "heldout_accuracy": acc, "train_accuracy": train_acc,
        "heldout_pairs": n, "train_pairs": len(train), "train_pairs_scored": len(sample),
        "length_baseline_accuracy": baseline,
        "length_buckets": accuracy_by_length(hc, hr, cw, rw),
        "margin_quantiles": quantiles(margins),
    }

    stage2 = ctx.verdict("preference_data")
    gap2 = None
    if stage2 is not None:
        gap2 = next((g for g in stage2.gates if g.name == "preference_gap"), None)
    if gap2 is None or gap2.status == "unmeasured":
        if rc.gap_pairs == "all":
            rows_c, rows_r = tc + hc, tr + hr
            if len(sample) < len(train):
                more = train[len(sample):]
                mc, mr = score_pairs(model, tok, more, batch_size=rc.eval_batch_size,
                                     max_length=rc.max_length, progress=prog("scoring pairs for the gap"))
                rows_c, rows_r = tc + mc + hc, tr + mr + hr
            scope = f"all {len(train) + n} usable pairs (train + held-out)"
        else:
            rows_c, rows_r = hc, hr
            scope = f"the {n} held-out pairs"
        g = reward_gap(rows_c, rows_r, ids=None if rc.gap_pairs == "all" else range(1, n + 1))
        gates.append(ctx.thresholds.evaluate(
            "preference_gap", g.gap, ci95=g.ci95,
            remedy_context={"negative_lines": g.negative if rc.gap_pairs == "heldout" else None,
                            "negative_source": "stage 2's heldout.jsonl"},
            detail=(f"measured in stage 4 (stage 2 had no explicit scores) by the reward model on "
                    f"{scope}: mean of s(c) - s(r), s(y) = sigmoid(r(y) - r(y')) = "
                    f"tanh(margin/2); {len(g.negative)} pairs with a negative gap")
            if g.n else "unmeasured: no pairs to score"))
        findings["preference_gap_source"] = "stage 4 reward model"
        if rc.gap_pairs == "heldout":  # 1-based lines of heldout.jsonl
            findings["negative_gap_heldout_lines"] = g.negative
    else:
        hg = reward_gap(hc, hr)
        findings["preference_gap_source"] = "stage 2 explicit scores"
        findings["reward_model_gap_heldout"] = {"gap": hg.gap, "ci95": hg.ci95}

    if baseline is not None and acc is not None and baseline >= acc:
        warn = [f"the length-only baseline ({baseline:.3f}) is at least as accurate as the reward "
                f"model ({acc:.3f}): the preference signal may be mostly length"]
    else:
        warn = []
    artifacts = {"reward_model": str(saved), "reward_model_digest": file_digest(saved),
                 "base_model": base, "metrics": str(ctx.rundir.metrics_path(NAME))}
    return make_verdict(NAME, gates, ctx.thresholds, findings, artifacts, warn)
