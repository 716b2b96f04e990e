"""Stage 6, iterative training: rounds of generate → validate → DPO from the stage-5 policy.

Iteration 0 is the stage-5 policy, measured as every iteration is. Iteration t ≥ 1
(docs/iterative-training.md has the same rules):

1. **Generate**: ``generation.samples`` responses per prompt from iteration t−1's policy
   for up to ``iterative.prompts_per_iteration`` train prompts (stage 2's train prompts,
   or the distinct prompts of its train pairs), scored by the verifier or a reward model
   (``generation.scorer``; the stage-4 model by default), best paired with worst
   (:func:`realign.generation.generate_pairs`; seed = run seed + t).
2. **Validate** the new pairs with the stage-2 gates (:func:`realign.validation.validate_file`,
   0-1 scores, the run's eval sets and benchmarks); a failed gate ends the stage.
3. **DPO**: one round (:func:`realign.dpo_round.run_round`, ``iterative.max_steps`` steps,
   ``iterative.learning_rate`` or ``dpo.learning_rate``) warm-started from iteration t−1's
   policy, against π0 (the stage-3 reference; ``iterative.reference: previous`` uses
   iteration t−1's policy), under the live KL monitor on the stage-3 probe. The round
   runs on the run's ``backend`` (``mlx``: :func:`realign.dpo_round_mlx.run_round`, π0
   loaded with mlx-lm, the policy saved by MLX as a folder PyTorch loads); generation and
   measurement run on PyTorch either way.
4. **Measure** on held-out prompts (:class:`Measurer`; ``iterative.eval_prompts``, those
   outside the KL probe first): greedy responses (``evaluation.max_new_tokens``) scored
   by the verifier (or the reward model); the mean score with a paired bootstrap 95% CI of
   the gain over iteration t−1 and over the baseline (the stage-1 model); ``win_rate``
   against the baseline (a higher score wins, equal ties; the previous iteration's win
   rate beside it); ``kl_divergence``: KL(π ‖ π0) along responses sampled from the
   policy (:func:`realign.kl_monitor.measure_heldout`, as stage 5's gate); capability
   retention on the stage-1 benchmarks; the reward-hacking guard
   (:mod:`realign.reward_hacking`: ``length_ratio``, ``prompt_echo``, ``distinct_ratio``).

**Stop** after an iteration whose gates include a failure that ``allow_gate_failures``
does not list (or whose pairs failed validation), after ``iterative.patience`` iterations in a row whose gain over the previous
one has a CI that includes 0, or at ``iterative.max_iterations``. The stage keeps the
**best passing iteration** (highest held-out score among the iterations with no failed
gate, the earlier on a tie; iteration 0 when none passes) and reports its gates; a
rolled-back iteration is named in a warning with its reasons.

**Resume**: ``state.json`` records each measured iteration (atomically, after its
measurement); an iteration's pairs (``iter-<t>/clean.jsonl`` with ``pairs.json``), its
DPO checkpoints and its saved model are reused, so a killed stage continues at the
iteration, and inside it at the step, where it stopped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..distributed import is_main_process
from ..fileio import file_digest, read_jsonl, write_json_atomic, write_jsonl_atomic
from ..gates import GateResult, StageVerdict, make_verdict
from .context import RunContext, generation_scorer, load_reference

NAME = "iterative"
STATE_FORMAT = "realign-iterative/1"
STATE_FILE = "state.json"
PAIRS_DONE = "pairs.json"


# ----------------------------------------------------------------------------- decisions


def gain_includes_zero(rec: dict[str, Any]) -> bool:
    """Whether an iteration's gain over the previous one has a 95% CI that includes 0
    (no CI: counts as including 0)."""
    ci = (rec.get("gain_vs_previous") or {}).get("ci95")
    return ci is None or ci[0] <= 0 <= ci[1]


def blocking(rec: dict[str, Any], allowed: Sequence[str] = ()) -> list[str]:
    """The gates an iteration failed that the config does not allow
    (``allow_gate_failures``)."""
    return [g for g in rec.get("failed") or [] if g not in allowed]


def stop_reason(records: list[dict[str, Any]], *, max_iterations: int, patience: int,
                allowed: Sequence[str] = ()) -> str | None:
    """Why iterating stops after ``records`` (iteration 0 first), or None to go on. A
    failed gate that ``allowed`` lists does not stop it."""
    last = records[-1]
    t = last["iteration"]
    if t >= 1 and blocking(last, allowed):
        return f"iteration {t} failed {', '.join(blocking(last, allowed))}"
    stalled = 0
    for r in reversed(records[1:]):
        if not gain_includes_zero(r):
            break
        stalled += 1
    if t >= 1 and stalled >= patience:
        return (f"no significant gain: the gain's 95% CI included 0 for {stalled} iteration(s) "
                "in a row")
    if t >= max_iterations:
        return f"reached iterative.max_iterations ({max_iterations})"
    return None


def select(records: list[dict[str, Any]], allowed: Sequence[str] = ()) -> dict[str, Any]:
    """The best passing iteration: highest mean held-out score among the iterations with no
    failed gate (none but those ``allowed`` lists; the earlier on a tie); iteration 0 when
    none passes."""
    ok = [r for r in records if not blocking(r, allowed) and r.get("score") is not None]
    if not ok:
        return records[0]
    return max(ok, key=lambda r: (r["score"]["mean"] if r["score"]["mean"] is not None
                                  else float("-inf"), -r["iteration"]))


# ----------------------------------------------------------------------------- measurement


def _paired_gain(before: list[float], after: list[float], *, n_boot: int, seed: int
                 ) -> dict[str, Any]:
    from ..metrics import paired_bootstrap_ci

    n = len(before)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(a - b for a, b in zip(after, before)) / n
    ci, _ = paired_bootstrap_ci(before, after, lambda b, a: (a - b).mean(axis=1),
                                n_boot=n_boot, seed=seed)
    return {"mean": mean, "ci95": list(ci) if ci else None, "n": n}


class Measurer:
    """Measures one model on the held-out prompts against the baseline (see the module doc)."""

    def __init__(self, ctx: RunContext, backend: Any, ref0: Any, eval_rows: list[Any],
                 gate_prompts: list[Any], scorer: str, reward_model: Any,
                 before: Any, why_no_benchmarks: str | None) -> None:
        self.ctx, self.backend, self.ref0 = ctx, backend, ref0
        self.rows, self.gate_prompts = eval_rows, gate_prompts
        self.scorer, self.rm = scorer, reward_model
        self.before, self.why_no_benchmarks = before, why_no_benchmarks

    def responses(self, handle: Any) -> list[str]:
        ev = self.ctx.config.evaluation
        out: list[str] = self.backend.generate(handle, [r.prompt for r in self.rows],
                                               max_new_tokens=ev.max_new_tokens,
                                               batch_size=ev.batch_size)
        return out

    def scores(self, responses: list[str]) -> list[float | None]:
        from ..generation import score_with_reward_model, score_with_verifier

        if self.scorer == "verifier":
            got = score_with_verifier(self.rows, [[r] for r in responses])
        else:
            model, tok = self.rm
            got = score_with_reward_model(model, tok, self.rows, [[r] for r in responses],
                                          max_length=self.ctx.config.reward.max_length)  # type: ignore[assignment]
        return [s[0] for s in got]

    def measure(self, handle: Any, t: int, responses: list[str], scores: list[float | None],
                baseline: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
        """The record of iteration ``t``: scores, gains, gates (responses already made)."""
        from ..assessment import retention_gates, win_rate_gate
        from ..kl_monitor import measure_heldout
        from ..messages import as_text
        from ..reward_hacking import guard_gates, measure_guard

        ctx, cfg = self.ctx, self.ctx.config
        th, ev = ctx.thresholds, cfg.evaluation
        t0 = time.perf_counter()
        base_scores: list[float | None] = baseline["scores"]
        idx = [i for i, (s, b) in enumerate(zip(scores, base_scores))
               if s is not None and b is not None]
        got = [float(scores[i]) for i in idx]  # type: ignore[arg-type]
        mean = sum(got) / len(got) if got else None
        rec: dict[str, Any] = {
            "iteration": t, "scores": scores,
            "score": {"mean": mean, "n": len(got), "scorer": self.scorer,
                      "pass_rate": (sum(1 for s in got if s >= 1.0) / len(got)
                                    if got and self.scorer == "verifier" else None)},
            "gain_vs_baseline": _paired_gain([float(base_scores[i]) for i in idx], got,  # type: ignore[arg-type]
                                             n_boot=ev.n_boot, seed=cfg.seed),
            "gain_vs_previous": None, "win_rate_vs_previous": None,
        }
        if previous is not None:
            prev = previous["scores"]
            jdx = [i for i in idx if prev[i] is not None]
            rec["gain_vs_previous"] = _paired_gain([float(prev[i]) for i in jdx],
                                                   [float(scores[i]) for i in jdx],  # type: ignore[arg-type]
                                                   n_boot=ev.n_boot, seed=cfg.seed)
            if jdx:
                rec["win_rate_vs_previous"] = sum(
                    1.0 if scores[i] > prev[i] else 0.5 if scores[i] == prev[i] else 0.0  # type: ignore[operator]
                    for i in jdx) / len(jdx)

        # win rate against the baseline: a higher verifier (or reward) score wins
        records = []
        for i, r in enumerate(self.rows):
            s, b = scores[i], base_scores[i]
            j = None if s is None or b is None else ("win" if s > b else "loss" if s < b else "tie")
            records.append({"prompt": r.prompt, "reference": r.reference, "judge": self.scorer,
                            "judgement": j, "max_new_tokens": ev.max_new_tokens})
        win = win_rate_gate(th, records, {self.scorer: len(idx)}, n_boot=ev.n_boot, seed=cfg.seed,
                            why_none="no held-out prompt could be scored")
        gates: list[GateResult] = [win.gate]

        # KL to pi0 along the policy's own samples
        held = measure_heldout(self.backend, handle, self.ref0, prompts=self.gate_prompts, pairs=[],
                               beta=cfg.dpo.beta,
                               max_new_tokens=cfg.kl_monitor.gate_max_new_tokens,
                               seed=cfg.seed, batch_size=cfg.kl_monitor.batch_size,
                               max_length=cfg.dpo.max_length)
        s = held["sampled"]
        kl = s["kl"] if s else None
        gates.insert(0, th.evaluate(
            "kl_divergence", kl,
            detail=(f"iteration {t}: mean per-token KL(policy || π0) along {s['tokens']} tokens "
                    f"sampled from the policy (temperature 1, seed {s['seed']}) for "
                    f"{s['prompts']} held-out prompts outside the KL probe" if s else
                    "unmeasured: no held-out prompt outside the KL probe")))

        # capability retention on the stage-1 benchmarks
        retention: dict[str, Any] = {}
        if self.before is None:
            why = f"unmeasured: {self.why_no_benchmarks}"
            gates += [th.evaluate("capability_retention", None, detail=why),
                      th.evaluate("worst_benchmark_retention", None, detail=why)]
        else:
            from ..evaluation import evaluate_model

            ctx.progress(0, None, f"iteration {t}: benchmarks")
            after = evaluate_model(handle.model, handle.tokenizer, cfg.sft.benchmarks,
                                   limit=self.before.limit)
            rg, table = retention_gates(th, self.before, after, n_boot=ev.n_boot, seed=cfg.seed)
            gates += rg
            retention = {k: v.model_dump(mode="json") for k, v in table.items()}

        # the reward-hacking guard
        guard = measure_guard([as_text(r.prompt) for r in self.rows], responses,
                              baseline["responses"],
                              [None if b is None else b >= 1.0 for b in base_scores]
                              if self.scorer == "verifier" else None,
                              kl=kl, kl_threshold=th.get("kl_divergence"), seed=cfg.seed)
        gates += guard_gates(th, guard)
        failed = [g.name for g in gates if g.status == "fail"]
        rec.update(
            win_rate={"value": win.gate.value, "ci95": win.gate.ci95, "wins": win.wins,
                      "ties": win.ties, "losses": win.losses},
            kl={"sampled": s, "seconds": held["seconds"]},
            retention=retention,
            guard=guard.model_dump(mode="json"),
            gates=[g.model_dump(mode="json") for g in gates], failed=failed,
            measure_seconds=round(time.perf_counter() - t0, 3))
        if guard.signals:
            rec["hacking"] = guard.signals
        return rec


# ----------------------------------------------------------------------------- the stage


def _state(out: Path) -> dict[str, Any]:
    import json

    f = out / STATE_FILE
    if f.is_file():
        try:
            st = json.loads(f.read_text(encoding="utf-8"))
            if st.get("format") == STATE_FORMAT:
                return st  # type: ignore[no-any-return]
        except (OSError, ValueError):
            pass
    return {"format": STATE_FORMAT, "baseline": None, "iterations": []}


def _save_state(out: Path, st: dict[str, Any]) -> None:
    if is_main_process():
        write_json_atomic(out / STATE_FILE, st)


def _train_prompts(ctx: RunContext, s2: Any) -> list[Any]:
    from ..generation import prompt_rows_from_pairs, read_prompt_rows

    if s2.train_prompts and Path(s2.train_prompts).is_file():
        return read_prompt_rows(s2.train_prompts)
    return prompt_rows_from_pairs(read_jsonl(Path(s2.train)))


def _eval_prompts(ctx: RunContext, s2: Any, probe: list[dict[str, Any]], limit: int) -> list[Any]:
    from ..generation import (
        outside_probe_first,
        prompt_rows_from_pairs,
        read_prompt_rows,
    )

    if s2.heldout_prompts and Path(s2.heldout_prompts).is_file():
        rows = read_prompt_rows(s2.heldout_prompts)
    else:
        rows = prompt_rows_from_pairs(read_jsonl(Path(s2.heldout))) if s2.heldout else []
    return outside_probe_first(rows, probe, limit)


def run(ctx: RunContext) -> StageVerdict:
    import torch

    from ..assessment import load_baseline_benchmarks
    from ..backends.trl import TRLBackend
    from ..backends.trl_train import quiet_hf
    from ..kl_probe import distinct_prompts, gate_rows
    from ..reward import load_reward_model

    quiet_hf()
    cfg, it = ctx.config, ctx.config.iterative
    out = ctx.stage_dir(NAME)
    torch.manual_seed(cfg.seed)
    s2, s3, s5 = (ctx.artifacts("preference_data"), ctx.artifacts("reference_init"),
                  ctx.artifacts("dpo"))
    if not s5.model or not s3.kl_probe or not s2.train:
        raise RuntimeError("stage 6 needs stages 2 (train split), 3 (KL probe) and 5 (the "
                           "policy it starts from) to have run")
    probe = read_jsonl(Path(s3.kl_probe))
    heldout_pairs = read_jsonl(Path(s2.heldout)) if s2.heldout else []
    train_rows = _train_prompts(ctx, s2)
    eval_rows = _eval_prompts(ctx, s2, probe, it.eval_prompts)
    if not eval_rows:
        raise RuntimeError("stage 6 needs held-out prompts: stage 2 wrote none")
    scorer, rm_path = generation_scorer(ctx, train_rows, stage=6)
    gate_prompts = distinct_prompts(gate_rows(heldout_pairs, probe), cfg.kl_monitor.gate_prompts)

    backend = TRLBackend()
    ctx.progress(0, None, "loading π0 (the reference)")
    ref0 = load_reference(ctx, backend, s3.reference_model or ctx.base_model())
    rm = load_reward_model(rm_path, device=cfg.device) if scorer == "reward_model" else None
    before, why = load_baseline_benchmarks(ctx)
    meas = Measurer(ctx, backend, ref0, eval_rows, gate_prompts, scorer, rm, before, why)
    # the DPO rounds run on the run's backend; generation and measurement on PyTorch
    trainer = _RoundBackend(ctx, backend, ref0, s3.reference_model or ctx.base_model())
    st = _state(out)
    timings: dict[str, float] = {}
    t_stage = time.perf_counter()

    # the baseline (stage-1 model): its greedy held-out responses and scores, once
    if st["baseline"] is None:
        ctx.progress(0, None, "baseline: held-out responses")
        h = backend.load(ctx.base_model(), device=cfg.device)
        resp = meas.responses(h)
        del h
        st["baseline"] = {"model": ctx.base_model(), "responses": resp, "scores": meas.scores(resp)}
        _save_state(out, st)
    baseline = st["baseline"]
    records: list[dict[str, Any]] = st["iterations"]

    def measure(handle: Any, t: int, model_path: str, extra: dict[str, Any]) -> None:
        ctx.progress(0, None, f"iteration {t}: measuring on {len(eval_rows)} held-out prompts")
        resp = meas.responses(handle)
        scores = meas.scores(resp)
        if is_main_process():
            write_jsonl_atomic(out / f"iter-{t}" / "heldout_responses.jsonl",
                               [{"prompt": r.prompt, "response": x, "score": s,
                                 "baseline": b, "baseline_score": bs}
                                for r, x, s, b, bs in zip(eval_rows, resp, scores,
                                                          baseline["responses"], baseline["scores"])])
        rec = meas.measure(handle, t, resp, scores, baseline,
                           next((r for r in reversed(records) if r.get("scores")), None))
        rec.update(model=model_path, **extra)
        records.append(rec)
        _save_state(out, st)

    if not records:  # iteration 0: the stage-5 policy
        (out / "iter-0").mkdir(exist_ok=True)
        h0 = backend.load(s5.model, device=cfg.device)
        measure(h0, 0, str(s5.model), {"source": "stage 5 selected model"})
        del h0

    warnings: list[str] = []
    while True:
        reason = stop_reason(records, max_iterations=it.max_iterations, patience=it.patience,
                             allowed=cfg.allow_gate_failures)
        if reason is not None:
            break
        t = records[-1]["iteration"] + 1
        t0 = time.perf_counter()
        extra = _iteration(ctx, backend, ref0, t, records[-1]["model"], train_rows, probe, scorer,
                           rm, rm_path, out, warnings, trainer=trainer)
        timings[f"iteration_{t}"] = time.perf_counter() - t0
        if extra.get("model") is None:  # the pairs failed validation: nothing was trained
            records.append({"iteration": t, "model": None, "score": None, "scores": None,
                            "gates": extra["validation_gates"], "failed": extra["failed"],
                            **{k: v for k, v in extra.items() if k != "model"}})
            _save_state(out, st)
            continue
        handle = extra.pop("handle")
        measure(handle, t, extra.pop("model"), extra)
        del handle

    st["stopped"] = reason
    _save_state(out, st)
    allowed = cfg.allow_gate_failures
    chosen = select(records, allowed)
    last = records[-1]
    if last["iteration"] >= 1 and blocking(last, allowed):
        why_fail = "; ".join(last.get("hacking") or []) or ", ".join(blocking(last, allowed))
        warnings.append(f"iteration {last['iteration']} failed "
                        f"{', '.join(blocking(last, allowed))} ({why_fail}): rolled back to "
                        f"iteration {chosen['iteration']}")
    if blocking(chosen, allowed):
        warnings.append("no iteration passed every gate: the stage keeps iteration 0 (the "
                        "stage-5 policy) and reports its gates")
    for r in records:
        if r.get("hacking"):
            warnings.append(f"reward hacking at iteration {r['iteration']}: "
                            + "; ".join(r["hacking"]))
    gates = [GateResult.model_validate(g) for g in chosen["gates"]]
    model_path = chosen["model"]
    summary = [{k: v for k, v in r.items() if k not in ("scores",)} for r in records]
    findings = {
        "backend": ctx.backend_findings(),
        "measurement_backend": ctx.backend_findings("trl"),
        "iterations": summary, "selected_iteration": chosen["iteration"], "stopped": reason,
        "scorer": scorer, "reward_model": rm_path, "reference": it.reference,
        "baseline": {"model": baseline["model"],
                     "mean_score": _mean(baseline["scores"]), "prompts": len(eval_rows)},
        "timings": {**{k: round(v, 3) for k, v in timings.items()},
                    "stage": round(time.perf_counter() - t_stage, 3)},
    }
    artifacts = {"model": str(model_path), "selected_iteration": chosen["iteration"],
                 "model_digest": file_digest(Path(model_path)) if is_main_process()
                 and Path(model_path).exists() else None,
                 "metrics": str(ctx.rundir.metrics_path(NAME)),
                 "state": str(out / STATE_FILE)}
    return make_verdict(NAME, gates, ctx.thresholds, findings, artifacts, warnings)


def _mean(xs: list[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return sum(got) / len(got) if got else None


class _RoundBackend:
    """Where stage 6's DPO rounds run: the run's backend (``ctx.backend_name``). On TRL
    the handles of the measurement are reused; on MLX, π0 is loaded once more with mlx-lm
    (lazily) and each round's policy is saved by MLX as a folder PyTorch then loads."""

    def __init__(self, ctx: RunContext, backend: Any, ref0: Any, ref0_model: str) -> None:
        self.ctx, self.mlx = ctx, ctx.backend_name == "mlx"
        self.backend = ctx.backend() if self.mlx else backend
        self._ref0, self.ref0_model = (None if self.mlx else ref0), ref0_model

    def ref0(self) -> Any:
        if self._ref0 is None:
            self._ref0 = load_reference(self.ctx, self.backend, self.ref0_model)
        return self._ref0

    def frozen(self, model: str) -> Any:
        if self.mlx:
            return load_reference(self.ctx, self.backend, model)
        return _frozen(self.backend.load(model, device=self.ctx.config.device))

    def policy(self, start: Any) -> Any:
        cfg = self.ctx.config
        if self.mlx:
            from ..backends.mlx import make_policy as mlx_policy

            return mlx_policy(start, cfg.dpo.lora)
        from ..backends.trl import make_policy

        return make_policy(start.model, cfg.dpo.lora,
                           disable_dropout=bool(cfg.dpo.extra.get("disable_dropout", True)))

    def saveable(self, rnd: Any, policy: Any, t: int) -> Any:
        """The handle to save: the round's selected weights, LoRA merged."""
        if self.mlx:
            from ..backends.mlx import merge

            return merge(policy) if self.ctx.config.dpo.lora else policy
        ref0 = self.ref0()
        model = rnd.model.merge_and_unload() if self.ctx.config.dpo.lora else rnd.model
        return type(ref0)(model=model, tokenizer=ref0.tokenizer, device=ref0.device,
                          source=f"iteration {t}")


def _iteration(ctx: RunContext, backend: Any, ref0: Any, t: int, prev_model: str,
               train_rows: list[Any], probe: list[dict[str, Any]], scorer: str, rm: Any,
               rm_path: str | None, out: Path, warnings: list[str], *,
               trainer: _RoundBackend | None = None) -> dict[str, Any]:
    """Generate, validate and train iteration ``t`` from ``prev_model`` (see the module
    doc); reuses what a killed run left. Returns the record's extra fields with ``handle``
    and ``model``, or with ``model`` None and ``failed`` when the pairs failed validation."""
    import json

    from ..dpo_round_mlx import round_runner
    from ..gates import StageVerdict as _V
    from ..generation import generate_pairs
    from ..rows import read_rows, to_trl_row
    from ..validation import validate_file

    cfg, it, g = ctx.config, ctx.config.iterative, ctx.config.generation
    folder = out / f"iter-{t}"
    folder.mkdir(parents=True, exist_ok=True)
    saved = folder / "model"
    done_f = folder / PAIRS_DONE
    extra: dict[str, Any] = {"source": f"iteration {t - 1}'s policy + DPO"}

    # 1-2. pairs: generated from the previous policy, validated
    if done_f.is_file():
        meta = json.loads(done_f.read_text(encoding="utf-8"))
        verdict = _V.model_validate(meta["validation"])
    else:
        rng = random.Random(cfg.seed * 1000 + t)
        rows = (list(train_rows) if len(train_rows) <= it.prompts_per_iteration
                else rng.sample(list(train_rows), it.prompts_per_iteration))
        ctx.progress(0, None, f"iteration {t}: loading the policy to sample from")
        h = backend.load(prev_model, device=cfg.device)
        res = generate_pairs(h, rows, samples=g.samples, temperature=g.temperature, top_p=g.top_p,
                             max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                             max_length=cfg.dpo.max_length, seed=cfg.seed + t, scorer=scorer,
                             reward_model=rm, reward_max_length=cfg.reward.max_length,
                             pairing=g.pairing, min_gap=g.min_score_gap,
                             progress=lambda d, n, m: ctx.progress(d, n, f"iteration {t}: {m}"))
        del h
        warnings.extend(f"iteration {t}: {w}" for w in res.warnings if w not in warnings)
        write_jsonl_atomic(folder / "generated.jsonl", res.pairs)
        res.write_records(folder / "candidates.jsonl")
        t_ = ctx.thresholds
        if res.pairs:
            ctx.progress(0, None, f"iteration {t}: validating {len(res.pairs)} pairs")
            verdict = validate_file(folder / "generated.jsonl", eval_sets=list(cfg.eval_sets),
                                    eval_field=cfg.eval_field, benchmarks=list(cfg.sft.benchmarks),
                                    thresholds=t_, score_scale="0-1",
                                    gap_min_coverage=cfg.gap_min_coverage,
                                    write_clean=folder / "clean.jsonl")
        else:
            why = "no prompt gave a pair"
            verdict = make_verdict("preference_data", [
                t_.evaluate("min_pairs", 0, detail=f"0 usable pairs: {why}"),
                t_.evaluate("preference_gap", None, detail=f"unmeasured: {why}")], t_)
        meta = {"generation": res.stats, "validation": verdict.model_dump(mode="json"),
                "prompts": len(rows)}
        write_json_atomic(done_f, meta)
    extra["pairs"] = {"generation": meta["generation"], "prompts": meta["prompts"],
                      "gates": {x.name: {"value": x.value, "status": x.status}
                                for x in verdict.gates}}
    failed = [x.name for x in verdict.gates if x.status == "fail"]
    if failed:
        return {**extra, "model": None, "failed": failed,
                "validation_gates": [x.model_dump(mode="json") for x in verdict.gates]}
    train = [to_trl_row(r) for r in read_rows(folder / "clean.jsonl")]

    # 3. DPO, warm-started from the previous policy
    if saved.is_dir():
        ctx.progress(0, None, f"iteration {t}: loading its trained policy")
        handle = backend.load(saved, device=cfg.device)
        extra["dpo"] = json.loads((folder / "dpo.json").read_text(encoding="utf-8")) \
            if (folder / "dpo.json").is_file() else {}
        return {**extra, "handle": handle, "model": str(saved)}
    ctx.progress(0, None, f"iteration {t}: DPO on {len(train)} pairs")
    tb = trainer or _RoundBackend(ctx, backend, ref0, str(ctx.base_model()))
    start = tb.backend.load(prev_model, device=cfg.device)
    ref = tb.ref0() if it.reference == "initial" else tb.frozen(prev_model)
    policy = tb.policy(start)
    from ..rundir import metrics_log

    with metrics_log(ctx.rundir.metrics_path(NAME)) as log:
        log({"event": "iteration", "iteration": t, "pairs": len(train), "from": prev_model})
    rnd = round_runner(ctx.backend_name)(
                    backend=tb.backend, ref=ref, policy=policy, train_rows=train, probe=probe,
                    folder=folder, metrics_path=ctx.rundir.metrics_path(NAME), run_dir=ctx.run_dir,
                    dpo=cfg.dpo, kl_monitor=cfg.kl_monitor, seed=cfg.seed + t,
                    threshold=ctx.thresholds.get("kl_divergence"), max_steps=it.max_steps,
                    learning_rate=it.learning_rate, policy_is_reference=False,
                    progress=lambda d, n, m: ctx.progress(d, n, f"iteration {t}: {m}"))
    handle = tb.saveable(rnd, policy, t)
    dpo = {"steps": rnd.global_step, "selected_step": rnd.final["step"],
           "probe_kl": rnd.final.get("kl"), "probe_margin": rnd.final.get("heldout_margin"),
           "resumed_from_step": rnd.monitor.resumed_from, "warnings": rnd.warnings,
           "train_seconds": round(rnd.train_seconds, 3), "pairs": len(train),
           "learning_rate": it.learning_rate or cfg.dpo.learning_rate}
    warnings.extend(f"iteration {t}: {w}" for w in rnd.warnings)
    if is_main_process():
        tb.backend.save(handle, saved)
        write_json_atomic(folder / "dpo.json", dpo)
    del start, policy, handle, rnd
    extra["dpo"] = dpo
    # measured as saved (and as a resumed run would load it): the trainer's in-memory
    # model need not generate exactly as its saved weights do
    return {**extra, "handle": backend.load(saved, device=cfg.device), "model": str(saved)}


def _frozen(handle: Any) -> Any:
    """A frozen copy of a loaded model handle (the DPO reference under
    ``iterative.reference: previous``)."""
    import copy

    m = copy.deepcopy(handle.model)
    for p in m.parameters():
        p.requires_grad_(False)
    m.eval()
    return type(handle)(model=m, tokenizer=handle.tokenizer, device=handle.device,
                        source=handle.source)
