"""Stage 7, evaluation: deploy or reject the policy (stage 6's selected iteration when
stage 6 ran, else stage 5's) against the stage-1 baseline.

What runs (docs/evaluation-monitoring.md says the same):

* **Benchmarks.** The policy (stage 6's artifact ``model``, else stage 5's) is evaluated through
  :func:`realign.evaluation.evaluate_model` on the suites stage 1 recorded
  (``sft.benchmarks``; ``baseline_benchmarks.json``), with the same item ``limit``.
  Per benchmark b, retention R_b = mean(after_b) ÷ mean(before_b) over the same items,
  with a paired bootstrap 95% CI (:func:`realign.metrics.capability_retention`,
  ``evaluation.n_boot`` resamples, the run's seed).
* Gate ``capability_retention``: mean of R_b over the benchmarks whose retention is
  defined; 95% CI by :func:`realign.assessment.mean_retention_ci`. Gate ``worst_benchmark_retention``: the
  lowest R_b, with that benchmark's CI. Both need every benchmark: one with an undefined
  retention (missing from the baseline's or the policy's results, no per-item scores,
  different items, or a baseline score of 0) makes both gates ``unmeasured``, with each
  such benchmark and its reason in the detail (never a mean or minimum over the rest);
  no benchmarks configured → both ``unmeasured``.
* **Win rate.** Greedy responses (at most ``evaluation.max_new_tokens`` new tokens) of
  the policy and of the baseline (stage-1 model) to up to ``evaluation.win_rate_prompts``
  distinct held-out prompts (stage-2 ``heldout.jsonl``; prompts outside the KL probe
  first, since stage 5 selected its checkpoint on the probe). Each prompt is judged:

  - by the **verifier** when its row carries a ``reference`` answer
    (:func:`realign.verifiers.verify_answer`: the response's final answer is extracted
    and compared whole with the reference, a number as a number, math expressions by
    equivalence through math-verify, text after normalization);
    correct vs wrong is a win (or loss), both right or both wrong a tie;
  - else by the **stage-4 reward model**: r(prompt, policy) vs r(prompt, baseline),
    higher wins, identical responses or equal rewards tie;
  - else the prompt is not judged. ``evaluation.judge`` forces one judge.

  Gate ``win_rate`` = (wins + ties ÷ 2) ÷ judged prompts
  (:func:`realign.metrics.win_rate`, bootstrap 95% CI); no prompt judged →
  ``unmeasured``.
* **Reward-hacking guard** (:mod:`realign.reward_hacking`) on the same greedy responses:
  ``length_ratio`` (the policy's mean words ÷ those of the baseline's verified answers),
  ``prompt_echo`` (share echoing the prompt, policy − baseline) and ``distinct_ratio``
  (distinct-2, policy ÷ baseline); findings ``reward_hacking_guard``.
* **Decision** (findings ``decision``, ``reasons``): ``deploy`` when every gate passes,
  else ``reject`` with one reason per failed or unmeasured gate (unmeasured never counts
  as a pass). Deploy writes the model card (:mod:`realign.model_card`: ``README.md`` in
  the policy's folder) and then ``deployed_model.json`` in the run directory. On a reject
  with ``evaluation.rollback_on_regression: true``, the pipeline runs
  :func:`realign.rollback.rollback` at once (same as ``realign rollback RUN``).

The gates are computed by :func:`realign.assessment.assess` (the same function rollback
uses to re-assess earlier checkpoints); the verifier is :mod:`realign.verifiers`.

Files: ``benchmarks.json`` (the policy's per-item results), ``winrate.jsonl`` (prompt,
both responses, judge, rewards, judgement per prompt, and the baseline's generation
settings, :func:`realign.assessment.baseline_cache_key`: rollback reuses the baseline's
responses only when they match), ``verdict.json``.
"""

from __future__ import annotations

from typing import Any

from .. import assessment
from ..distributed import is_main_process
from ..gates import StageVerdict, make_verdict
from .context import RunContext

NAME = "evaluation"


def evaluated_policy(ctx: RunContext) -> tuple[str | None, str]:
    """(the model stage 7 evaluates, what it is): stage 6's selected iteration when stage 6
    ran, else stage 5's selected model."""
    s6 = ctx.artifacts("iterative")
    if s6.model:
        return s6.model, f"stage 6 iteration {s6.selected_iteration}"
    return ctx.artifacts("dpo").model, "stage 5 selected model"


def model_card(ctx: RunContext, verdict: StageVerdict, policy: Any,
               source: str = "stage 5 selected model") -> Any:
    """Write the deployed policy's model card (:func:`realign.model_card.write_model_card`,
    before ``deployed_model.json`` points at it); a failure is a warning on the verdict,
    never a failed stage. Returns the card's path, or None."""
    from ..model_card import write_model_card

    try:
        return write_model_card(ctx.run_dir, model=policy, source=source,
                                decided_by="stage 7", evaluation=verdict)
    except Exception as e:  # noqa: BLE001 - the deploy stands without its card
        verdict.warnings.append(f"model card not written: {type(e).__name__}: {e}")
        return None


def run(ctx: RunContext) -> StageVerdict:
    from ..backends.trl_train import quiet_hf

    quiet_hf()
    out = ctx.stage_dir(NAME)
    policy, source = evaluated_policy(ctx)
    if not policy:
        raise RuntimeError("stage 7 needs the stage-5 model (artifact 'model' of stage dpo) "
                           "or stage 6's; run stage 5 first")
    a = assessment.assess(ctx, policy, out)
    decision, reasons = assessment.decide(a.gates)
    findings: dict[str, Any] = {
        "decision": decision, "reasons": reasons,
        "evaluated_model": str(policy), "baseline_model": ctx.base_model(),
        "retention": {k: v.model_dump(mode="json") for k, v in a.retention.items()},
    }
    findings["evaluated_source"] = source
    if a.guard is not None:
        findings["reward_hacking_guard"] = a.guard
    if a.win is not None:
        findings["win_rate"] = {"wins": a.win.wins, "ties": a.win.ties, "losses": a.win.losses,
                                "judges": a.win.judges, "not_judged": a.win.skipped}
    artifacts: dict[str, Any] = {"evaluated_model": str(policy)}
    if a.benchmarks_path:
        artifacts["benchmarks"] = a.benchmarks_path
    if a.winrate_path:
        artifacts["winrate"] = a.winrate_path
    warnings = list(a.warnings)
    verdict = make_verdict(NAME, a.gates, ctx.thresholds, findings, artifacts, warnings)
    if decision == "deploy" and is_main_process():
        card = model_card(ctx, verdict, policy, source)
        ctx.rundir.write_deployed(policy, source=source, decided_by="stage 7", gates=a.gates)
        verdict.artifacts["deployed_model"] = str(policy)
        if card is not None:
            verdict.artifacts["model_card"] = str(card)
    # A rejected policy is rolled back by the pipeline (evaluation.rollback_on_regression).
    return verdict
