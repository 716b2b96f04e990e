"""Rollback after a stage-7 regression: restore the best earlier model that passes.

``realign rollback RUN`` (and the pipeline, after stage 7 rejects the policy, when
``evaluation.rollback_on_regression`` is true) runs :func:`rollback`:

1. **Candidates** (:func:`rollback_candidates`), in this order:

   * when stage 7 evaluated a stage-6 iteration: the other iterations that passed every
     stage-6 gate (best held-out score first), then the stage-5 model;
   * the stage-5 training checkpoints still on disk (``stages/5-dpo/checkpoints/
     checkpoint-N``; the trainer keeps the last two) whose step N had a KL check that
     passed the ``kl_divergence`` gate, best held-out margin first, leaving out the step
     stage 5 selected (that is the model stage 7 rejected);
   * the stage-1 baseline model, the fallback: it is the model the regression is
     measured against, so its retention is 1 by definition and ``win_rate`` (against
     itself) does not apply.

2. Each checkpoint candidate is **re-evaluated** with stage 7's gates
   (:func:`realign.assessment.assess`, the function stage 7 uses: benchmarks and retention against the
   stage-1 baseline, win rate against the baseline's responses). The first that passes
   every gate is restored. When none does, the baseline is restored; its benchmarks are
   re-run too, so the record shows its measured retention.

3. **Restoring** writes the restored model's card (:mod:`realign.model_card`:
   ``README.md`` in its folder when that lies in the run directory, else
   ``<run>/model_card.md``), then points ``deployed_model.json`` in the run directory at
   the model's folder (the previous pointer is kept as ``deployed_model.<n>.json``). ``rollback.json``
   records the trigger, the regression's reasons, every candidate with its gates and
   what was restored (an earlier ``rollback.json`` is kept as ``rollback.<n>.json``).
   Candidate results go to ``rollback/<candidate>/``. Nothing is deleted.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from . import assessment
from .backends.trl_train import checkpoint_step, complete_checkpoints
from .errors import InputError
from .fileio import keep_old, write_json_atomic
from .gates import GateResult, StageVerdict, Thresholds, remedy_context_from_config
from .rundir import RunDir, RunLock, load_run_config
from .stages.context import ProgressFn, RunContext


class Candidate(BaseModel):
    """A model rollback may restore."""

    name: str
    path: str
    source: Literal["iteration", "dpo_model", "dpo_checkpoint", "baseline"]
    step: int | None = None
    kl: float | None = None
    heldout_margin: float | None = None


class CandidateResult(BaseModel):
    """A candidate's re-evaluation."""

    candidate: Candidate
    gates: list[GateResult]
    passed: bool
    note: str = ""
    benchmarks: str | None = None
    winrate: str | None = None


class RollbackResult(BaseModel):
    """What ``rollback.json`` records."""

    run_id: str
    trigger: Literal["cli", "pipeline"]
    time: str
    regression: list[str] = Field(description="stage 7's reasons for rejecting the policy")
    rejected_model: str | None
    evaluated: list[CandidateResult]
    restored: Candidate | None
    deployed_model: dict[str, Any] | None
    summary: str
    model_card: str | None = Field(
        None, description="the restored model's card: README.md in its folder when that is "
                          "in the run directory, else <run>/model_card.md")


def rollback_candidates(run_dir: str | Path) -> list[Candidate]:
    """When stage 6 ran and stage 7 evaluated one of its iterations: the other stage-6
    iterations that passed every gate, models on disk (best held-out score first), then
    the stage-5 model. Then the stage-5 KL-passing checkpoints on disk (best held-out
    margin first, the selected step left out: it is the stage-5 model), then the
    stage-1 baseline."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    ctx = RunContext(config=config, run_dir=run_dir, thresholds=Thresholds())
    out: list[Candidate] = []
    dpo = ctx.verdict("dpo")
    it = ctx.verdict("iterative")
    evaluated = (ctx.verdict("evaluation").findings.get("evaluated_model")  # type: ignore[union-attr]
                 if ctx.verdict("evaluation") is not None else None)
    if it is not None and dpo is not None and it.artifacts.get("model") != dpo.artifacts.get("model"):
        recs = [r for r in it.findings.get("iterations") or []
                if r.get("iteration", 0) >= 1 and not r.get("failed") and r.get("model")
                and Path(r["model"]).is_dir() and r["model"] != evaluated]
        recs.sort(key=lambda r: -((r.get("score") or {}).get("mean") or float("-inf")))
        out += [Candidate(name=f"iteration-{r['iteration']}", path=str(r["model"]),
                          source="iteration") for r in recs]
        m5 = dpo.artifacts.get("model")
        if m5 and Path(m5).is_dir() and m5 != evaluated:
            out.append(Candidate(name="dpo-model", path=str(m5), source="dpo_model",
                                 step=dpo.findings.get("selected_step")))
    if dpo is not None:
        checks = dpo.findings.get("checks") or []
        selected = dpo.findings.get("selected_step")
        passed = {int(c["step"]): c for c in checks if c.get("passed")}
        root = RunDir(run_dir).stage_dir("dpo") / "checkpoints"
        found = []
        for d in complete_checkpoints(root) if root.is_dir() else []:  # never a cut-short save
            step = checkpoint_step(d)
            if step in passed and step != selected:
                c = passed[step]
                found.append(Candidate(name=f"dpo-step-{step}", path=str(d), source="dpo_checkpoint",
                                       step=step, kl=c.get("kl"), heldout_margin=c.get("heldout_margin")))
        found.sort(key=lambda c: -(c.heldout_margin if c.heldout_margin is not None else float("-inf")))
        out.extend(found)
    out.append(Candidate(name="baseline", path=ctx.base_model(), source="baseline"))
    return out


def _fresh_dir(root: Path, name: str) -> Path:
    d, k = root / name, 2
    while d.exists():
        d, k = root / f"{name}-{k}", k + 1
    return d


def rollback(run_dir: str | Path, *, verdict: StageVerdict | None = None,
             trigger: Literal["cli", "pipeline"] = "cli", lock: bool = True, force: bool = False,
             progress: ProgressFn | None = None) -> RollbackResult:
    """Restore the best earlier model that passes every stage-7 gate (see the module doc).

    ``verdict``: stage 7's verdict (read from disk when None). It must not be ``pass``
    unless ``force``. ``lock``: take the run lock (False when called inside a running
    pipeline, which holds it).
    """
    from contextlib import nullcontext

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    thresholds = Thresholds(preset=config.preset, overrides=config.thresholds).with_context(
        **remedy_context_from_config(config, run_dir))
    ctx = RunContext(config=config, run_dir=run_dir, thresholds=thresholds,
                     progress=progress or (lambda d, t, m: None))
    if verdict is None:
        verdict = ctx.verdict("evaluation")
    if verdict is None:
        raise InputError("stage 7 (evaluation) has not run in this run directory; run "
                         "`realign stage evaluation --run RUN` first", file=run_dir)
    if verdict.status == "pass" and not force:
        raise InputError("stage 7 passed (decision: deploy); nothing to roll back "
                         "(--force rolls back anyway)", file=run_dir)

    with RunLock(run_dir, "rollback") if lock else nullcontext():
        if lock:
            ctx.rundir.clean_temp_files()  # left by a killed job; nobody else writes here now
        evaluated: list[CandidateResult] = []
        restored: Candidate | None = None
        cands = rollback_candidates(run_dir)
        for i, cand in enumerate(cands):
            out = _fresh_dir(ctx.rundir.rollback_root, cand.name)
            ctx.progress(i, len(cands), f"re-evaluating {cand.name}")
            if cand.source == "baseline":
                a = assessment.assess(ctx, cand.path, out, win_rate=False)
                note = ("fallback: the stage-1 baseline (the model before DPO) is restored when "
                        "no checkpoint passes; win_rate does not apply to it")
                evaluated.append(CandidateResult(candidate=cand, gates=a.gates,
                                                 passed=a.retention_passed, note=note,
                                                 benchmarks=a.benchmarks_path))
                restored = cand
                break
            try:
                a = assessment.assess(ctx, cand.path, out)
            except InputError as e:  # an unloadable checkpoint is recorded and skipped
                evaluated.append(CandidateResult(candidate=cand, gates=[], passed=False,
                                                 note=f"could not be evaluated: {e}"))
                continue
            evaluated.append(CandidateResult(candidate=cand, gates=a.gates, passed=a.passed,
                                             note="passes every gate" if a.passed else
                                             "fails: " + ", ".join(g.name for g in a.gates
                                                                    if g.status != "pass"),
                                             benchmarks=a.benchmarks_path, winrate=a.winrate_path))
            if a.passed:
                restored = cand
                break
        rejected = verdict.findings.get("evaluated_model")
        if restored is None:
            summary = "rollback: no candidate could be restored"
        elif restored.source == "baseline":
            summary = (f"rollback: no earlier model passed every gate "
                       f"({len(evaluated) - 1} re-evaluated); restored the stage-1 baseline "
                       f"{restored.path}")
        else:
            summary = (f"rollback: restored {restored.name} ({restored.path}), which passes every "
                       "stage-7 gate")
        result = RollbackResult(
            run_id=run_dir.name, trigger=trigger,
            time=_dt.datetime.now(_dt.timezone.utc).isoformat(),
            regression=list(verdict.findings.get("reasons") or []),
            rejected_model=str(rejected) if rejected else None,
            evaluated=evaluated, restored=restored, deployed_model=None, summary=summary)
        if restored is not None:
            # the card first, so that the deploy record's digest covers it
            result.model_card, warning = _model_card(run_dir, restored, trigger, verdict, result)
            if warning:
                result.summary += f"; {warning}"
            result.deployed_model = ctx.rundir.write_deployed(
                restored.path, source=restored.name, decided_by=f"rollback ({trigger})",
                gates=evaluated[-1].gates)
        keep_old(ctx.rundir.rollback_json)
        write_json_atomic(ctx.rundir.rollback_json, result)
    return result


def _model_card(run_dir: Path, restored: Candidate, trigger: str, verdict: StageVerdict,
                result: RollbackResult) -> tuple[str | None, str | None]:
    """Write the restored model's card (:func:`realign.model_card.write_model_card`):
    (its path, None), or (None, why not): a card never fails a rollback."""
    from .model_card import write_model_card

    try:
        path = write_model_card(run_dir, model=restored.path, source=restored.name,
                                decided_by=f"rollback ({trigger})", evaluation=verdict,
                                rollback=result.model_dump(mode="json"))
        return str(path), None
    except Exception as e:  # noqa: BLE001
        return None, f"model card not written: {type(e).__name__}: {e}"


def deployed_model(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``deployed_model.json`` (None when nothing was deployed or restored)."""
    return RunDir(run_dir).deployed()
