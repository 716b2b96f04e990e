"""Assess one model against the run's baseline: capability retention and win rate.

Stage 7 (:mod:`realign.stages.evaluation`) assesses the stage-5 policy with
:func:`assess`; :mod:`realign.rollback` re-assesses earlier checkpoints with the same
function, so a restored model passes the same gates. The formulas are in the docstrings
below and in docs/evaluation-monitoring.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .distributed import is_main_process
from .fileio import read_jsonl, write_json_atomic, write_jsonl_atomic
from .gates import GateResult, Thresholds
from .stages.context import RunContext
from .verifiers import judge_by_reward, judge_by_verifier, verify_answer

# ----------------------------------------------------------------------------- retention


def mean_retention_ci(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], *,
                      n_boot: int, seed: int) -> tuple[float, float] | None:
    """95% percentile-bootstrap CI of the mean retention over benchmarks.

    ``pairs[b] = (before_b, after_b)``, per-item scores paired by position. Resample k
    draws, independently per benchmark b, ``idx = rng.integers(0, n_b, n_b)`` from one
    ``numpy.random.default_rng(seed)`` (benchmarks in order), computes
    R_b,k = mean(after_b[idx]) ÷ mean(before_b[idx]), and takes M_k = mean over b of
    R_b,k; resamples where some before-mean is 0 are dropped. CI = 2.5th and 97.5th
    percentiles of M_k. None when no pair or no valid resample.
    """
    import numpy as np

    if not pairs or n_boot < 1:
        return None
    rng = np.random.default_rng(seed)
    ratios = np.zeros((n_boot, len(pairs)))
    for j, (before, after) in enumerate(pairs):
        b = np.asarray(before, dtype=np.float64)
        a = np.asarray(after, dtype=np.float64)
        if b.size == 0 or b.shape != a.shape:
            return None
        idx = rng.integers(0, b.size, size=(n_boot, b.size))
        bm, am = b[idx].mean(axis=1), a[idx].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios[:, j] = np.where(bm > 0, am / np.where(bm > 0, bm, 1.0), np.nan)
    means = ratios.mean(axis=1)
    means = means[np.isfinite(means)]
    if means.size == 0:
        return None
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


class BenchmarkRetention(BaseModel):
    """Retention of one benchmark, as recorded in the verdict's findings."""

    suite: str
    metric: str
    before: float | None
    after: float | None
    retention: float | None
    ci95: tuple[float, float] | None
    n: int
    unmeasured_reason: str | None = None


def retention_gates(thresholds: Thresholds, before: Any, after: Any, *, n_boot: int, seed: int
                    ) -> tuple[list[GateResult], dict[str, BenchmarkRetention]]:
    """The two retention gates from two :class:`realign.evaluation.BenchmarkResults`.

    Every benchmark of the baseline (``before``) and of the evaluated model (``after``)
    counts. When any has an undefined retention (missing from one side, no per-item
    scores, different items, or a baseline score of 0), both gates are ``unmeasured``
    and the detail names each such benchmark with its reason, plus the retentions that
    were measured: a mean or a minimum over the rest would pass on a subset.
    """
    from .evaluation import retention_by_suite

    per = retention_by_suite(before, after, n_boot=n_boot, seed=seed)
    table: dict[str, BenchmarkRetention] = {}
    pairs: list[tuple[list[float], list[float]]] = []
    defined: dict[str, float] = {}
    for name, r in per.items():
        b, a = before.suites.get(name), after.suites.get(name)
        metric = (b or a).metric  # type: ignore[union-attr]
        table[name] = BenchmarkRetention(
            suite=name, metric=metric,
            before=r.before_mean if r.before_mean is not None else (b.score if b else None),
            after=r.after_mean if r.after_mean is not None else (a.score if a else None),
            retention=r.retention, ci95=r.ci95, n=r.n, unmeasured_reason=r.unmeasured_reason)
        if r.retention is not None and b is not None and a is not None:
            defined[name] = r.retention
            bb, aa = b.by_id(), a.by_id()
            keys = list(bb)
            pairs.append(([bb[k] for k in keys], [aa[k] for k in keys]))
    left_out = {n: t.unmeasured_reason or "undefined" for n, t in table.items() if t.retention is None}
    if not table:
        why = "unmeasured: the baseline holds no benchmark results"
        return [thresholds.evaluate("capability_retention", None, detail=why),
                thresholds.evaluate("worst_benchmark_retention", None, detail=why)], table
    if left_out:
        measured = (f"; measured on the others: {', '.join(f'{k} {v:.3f}' for k, v in defined.items())}"
                    if defined else "")
        why = (f"unmeasured: retention is undefined for {len(left_out)} of {len(table)} "
               "benchmark(s) (" + "; ".join(f"{n}: {w}" for n, w in left_out.items()) + ")"
               + measured + " — the gate needs every benchmark, not a subset")
        undefined = {"undefined_benchmarks": list(left_out)}
        return [thresholds.evaluate("capability_retention", None, detail=why,
                                    remedy_context=undefined),
                thresholds.evaluate("worst_benchmark_retention", None, detail=why,
                                    remedy_context=undefined)], table
    mean = sum(defined.values()) / len(defined)
    worst = min(defined, key=lambda k: defined[k])
    items = sum(table[n].n for n in defined)
    w = table[worst]
    gates = [
        thresholds.evaluate(
            "capability_retention", mean, ci95=mean_retention_ci(pairs, n_boot=n_boot, seed=seed),
            remedy_context={"worst": worst},
            detail=f"mean of after ÷ before over {len(defined)} benchmark(s) "
                   f"({', '.join(f'{k} {v:.3f}' for k, v in defined.items())}), {items} items; "
                   f"paired bootstrap CI, {n_boot} resamples"),
        thresholds.evaluate(
            "worst_benchmark_retention", defined[worst], ci95=w.ci95,
            remedy_context={"worst": worst},
            detail=f"{worst}: {w.after:.3f} after ÷ {w.before:.3f} before "
                   f"on {w.n} items ({w.metric})"),
    ]
    return gates, table


# ----------------------------------------------------------------------------- decision


def decide(gates: Sequence[GateResult]) -> tuple[str, list[str]]:
    """``("deploy", reasons)`` when every gate passes, else ``("reject", reasons)`` with one
    reason per failed or unmeasured gate (unmeasured never counts as a pass)."""

    def show(g: GateResult) -> str:
        v = "unmeasured" if g.value is None else f"{g.value:.4g}"
        return f"{g.name} {v} (needs {g.op} {g.threshold:g})"

    bad = [g for g in gates if g.status != "pass"]
    if not bad and gates:
        return "deploy", ["every gate passed: " + "; ".join(show(g) for g in gates)]
    if not gates:
        return "reject", ["no gate was evaluated"]
    def why(g: GateResult) -> str:  # details of unmeasured gates often say so themselves
        return g.detail.removeprefix(f"{g.status}: ")

    return "reject", [f"{show(g)} {g.status}: {why(g)}" for g in bad]


# ----------------------------------------------------------------------------- win rate


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def winrate_prompts(heldout: list[dict[str, Any]], probe_size: int, limit: int
                    ) -> list[dict[str, Any]]:
    """Distinct held-out prompts, those outside the KL probe (the first ``probe_size``
    rows) first, at most ``limit``; each keeps its row's ``reference`` when it has one."""
    order = heldout[probe_size:] + heldout[:probe_size]
    seen: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(order):
        key = _prompt_key(r["prompt"])
        if key in seen:
            if seen[key].get("reference") is None and r.get("reference") is not None:
                seen[key]["reference"] = str(r["reference"])
            continue
        seen[key] = {"prompt": r["prompt"], "in_probe": i >= len(heldout) - min(probe_size, len(heldout)),
                     "reference": None if r.get("reference") is None else str(r["reference"])}
    return list(seen.values())[:limit]


def winrate_prompts_from_rows(rows: list[Any], probe: list[dict[str, Any]], limit: int
                              ) -> list[dict[str, Any]]:
    """Win-rate prompts from prompt rows (:class:`realign.generation.PromptRow`, stage 2's
    ``heldout_prompts`` in generation mode: every held-out prompt, not only those that gave
    a pair), those outside the KL ``probe`` first, at most ``limit``; each keeps its
    reference answer and its ground truth for the verifier."""
    from .generation import outside_probe_first, prompt_key

    keys = {prompt_key(r["prompt"]) for r in probe}
    return [{"prompt": r.prompt, "reference": r.reference, "truth": dict(r.truth),
             "in_probe": prompt_key(r.prompt) in keys}
            for r in outside_probe_first(rows, probe, limit)]


def _checkable(truth: Any) -> bool:
    """Ground truth the verifiers check beyond a reference answer (tests, instructions)."""
    return isinstance(truth, dict) and any(truth.get(k) is not None for k in (
        "tests", "instructions", "instruction_id_list"))


class WinRateOutcome(BaseModel):
    """The win-rate gate and its per-prompt records."""

    gate: GateResult
    records: list[dict[str, Any]] = Field(default_factory=list)
    judges: dict[str, int] = Field(default_factory=dict)
    skipped: int = 0
    wins: int = 0
    ties: int = 0
    losses: int = 0


def judge_records(records: list[dict[str, Any]], *, judge: str, reward_model: str | None,
                  reward_max_length: int, batch_size: int, device: str | None) -> dict[str, int]:
    """Fill ``judge`` and ``judgement`` (and rewards) in each record in place.

    A record has ``prompt``, ``policy``, ``baseline`` and ``reference`` (or None). Returns
    the count per judge used ("verifier", "reward_model", "none").
    """
    use_verifier = judge in ("auto", "verifier")
    use_rm = judge in ("auto", "reward_model") and reward_model is not None
    to_score = []
    by_truth = [r for r in records if use_verifier and _checkable(r.get("truth"))]
    if by_truth:  # tests or instructions: the row's own verifier scores both responses
        from .generation import PromptRow, score_with_verifier

        rows = [PromptRow(prompt=r["prompt"], truth=r["truth"], line=i + 1)
                for i, r in enumerate(by_truth)]
        got = score_with_verifier(rows, [[r["policy"], r["baseline"]] for r in by_truth])
        for r, (sp, sb) in zip(by_truth, got):
            if sp is None or sb is None:
                continue
            r["judge"] = "verifier"
            r["policy_score"], r["baseline_score"] = sp, sb
            r["policy_correct"], r["baseline_correct"] = sp >= 1.0, sb >= 1.0
            r["judgement"] = "win" if sp > sb else "loss" if sp < sb else "tie"
    for r in records:
        if r.get("judge") == "verifier":
            continue
        if use_verifier and r.get("reference") is not None:
            r["judge"] = "verifier"
            r["policy_correct"] = verify_answer(r["policy"], r["reference"])
            r["baseline_correct"] = verify_answer(r["baseline"], r["reference"])
            r["judgement"] = judge_by_verifier(r["policy"], r["baseline"], r["reference"])
        elif use_rm:
            r["judge"] = "reward_model"
            to_score.append(r)
        else:
            r["judge"] = "none"
            r["judgement"] = None
    if to_score:
        from .reward import load_reward_model, reward_input_ids, score_sequences

        model, tok = load_reward_model(reward_model, device=device)  # type: ignore[arg-type]
        seqs = []
        for r in to_score:
            seqs.append(reward_input_ids(tok, r["prompt"], r["policy"], reward_max_length))
            seqs.append(reward_input_ids(tok, r["prompt"], r["baseline"], reward_max_length))
        scores = score_sequences(model, tok, seqs, batch_size=batch_size)
        del model
        for k, r in enumerate(to_score):
            r["r_policy"], r["r_baseline"] = scores[2 * k], scores[2 * k + 1]
            r["judgement"] = judge_by_reward(r["r_policy"], r["r_baseline"],
                                             r["policy"].strip() == r["baseline"].strip())
    counts: dict[str, int] = {}
    for r in records:
        counts[r["judge"]] = counts.get(r["judge"], 0) + 1
    return counts


def win_rate_gate(thresholds: Thresholds, records: list[dict[str, Any]], counts: dict[str, int],
                  *, n_boot: int, seed: int, why_none: str) -> WinRateOutcome:
    """The ``win_rate`` gate over the judged records (ties half)."""
    from .metrics import win_rate

    judged = [r["judgement"] for r in records if r.get("judgement") is not None]
    skipped = len(records) - len(judged)
    if not judged:
        gate = thresholds.evaluate("win_rate", None, detail=f"unmeasured: {why_none}")
        return WinRateOutcome(gate=gate, records=records, judges=counts, skipped=skipped)
    res = win_rate(judged, n_boot=n_boot, seed=seed)
    used = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "none")
    in_probe = sum(1 for r in records if r.get("in_probe") and r.get("judgement") is not None)
    detail = (f"{res.wins} wins, {res.ties} ties, {res.losses} losses on {res.n} held-out prompts "
              f"(judged by {used}; greedy, ≤ {records[0].get('max_new_tokens', '?')} new tokens)")
    if in_probe:
        detail += f"; {in_probe} of them are KL-probe prompts"
    if skipped:
        detail += f"; {skipped} prompts not judged ({why_none})"
    gate = thresholds.evaluate("win_rate", res.win_rate, ci95=res.ci95, detail=detail)
    return WinRateOutcome(gate=gate, records=records, judges=counts, skipped=skipped,
                          wins=res.wins, ties=res.ties, losses=res.losses)


# ----------------------------------------------------------------------------- assessment


class Assessment(BaseModel):
    """Stage-7 gates of one model against the baseline."""

    model: str
    gates: list[GateResult]
    retention: dict[str, BenchmarkRetention] = Field(default_factory=dict)
    win: WinRateOutcome | None = None
    guard: dict[str, Any] | None = Field(
        default=None, description="the reward-hacking guard's measurements "
                                  "(realign.reward_hacking.GuardResult)")
    benchmarks_path: str | None = None
    winrate_path: str | None = None
    warnings: list[str] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.gates) and all(g.status == "pass" for g in self.gates)

    @property
    def retention_passed(self) -> bool:
        ret = [g for g in self.gates
               if g.name in ("capability_retention", "worst_benchmark_retention")]
        return bool(ret) and all(g.status == "pass" for g in ret)


def baseline_model(ctx: RunContext) -> str:
    """The stage-1 model (after SFT when stage 1 trained one), else the configured model."""
    return ctx.base_model()


def load_baseline_benchmarks(ctx: RunContext) -> tuple[Any, str | None]:
    """(stage-1 BenchmarkResults or None, why none)."""
    cfg = ctx.config
    if not cfg.sft.benchmarks:
        return None, ("no benchmarks configured (sft.benchmarks is empty), so stage 1 recorded "
                      "no baseline to compare with")
    path = ctx.artifacts("sft_baseline").baseline_benchmarks
    if not path or not Path(path).is_file():
        return None, ("stage 1 recorded no baseline_benchmarks.json (rerun stage 1 with "
                      "sft.benchmarks set)")
    from .evaluation import BenchmarkResults

    return BenchmarkResults.model_validate_json(Path(path).read_text(encoding="utf-8")), None


def baseline_cache_key(ctx: RunContext) -> dict[str, Any]:
    """Everything that decides the baseline's greedy responses besides the prompts: the
    model (path and stage 1's digest of it), ``max_new_tokens``, the generation batch
    size (padding changes the numerics), the device and dtype it runs on, and the
    torch / transformers versions. Stored in each ``winrate.jsonl`` record."""
    from importlib import metadata

    from .backends.trl import pick_device, pick_dtype

    ev = ctx.config.evaluation
    dev = pick_device(ctx.config.device)
    versions = {}
    for pkg in ("torch", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"model": baseline_model(ctx), "model_digest": ctx.artifacts("sft_baseline").model_digest,
            "max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size,
            "device": str(dev), "dtype": str(pick_dtype(dev)), **versions}


def baseline_responses(ctx: RunContext, prompts: list[dict[str, Any]], *, backend: Any,
                       key: dict[str, Any] | None = None) -> list[str]:
    """Greedy responses of the baseline model to ``prompts``, reused from stage 7's
    ``winrate.jsonl`` only when it holds the same prompts, in order, and every record
    carries the same :func:`baseline_cache_key` (model, digest, token cap, batch size,
    device, dtype, versions); otherwise generated."""
    ev = ctx.config.evaluation
    key = key if key is not None else baseline_cache_key(ctx)
    cached = ctx.rundir.stage_dir("evaluation") / "winrate.jsonl"
    if cached.is_file():
        try:
            rows = read_jsonl(cached)
        except (OSError, ValueError):
            rows = []
        if rows and [_prompt_key(r.get("prompt")) for r in rows] == \
                [_prompt_key(p["prompt"]) for p in prompts] \
                and all(r.get("baseline_key") == key and isinstance(r.get("baseline"), str)
                        for r in rows):
            return [r["baseline"] for r in rows]
    handle = backend.load(baseline_model(ctx), device=ctx.config.device)
    out: list[str] = backend.generate(handle, [p["prompt"] for p in prompts],
                                      max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
    del handle
    return out


def assess(ctx: RunContext, model_path: str | Path, out: Path, *, win_rate: bool = True,
           progress: Callable[[str], None] | None = None) -> Assessment:
    """Evaluate ``model_path`` against the baseline: benchmarks + retention gates, win rate.

    Writes ``out/benchmarks.json`` and ``out/winrate.jsonl``. ``win_rate=False`` (the
    baseline itself) records the gate as unmeasured: a model is not compared with itself.
    """
    from .backends.trl import TRLBackend

    cfg, ev = ctx.config, ctx.config.evaluation
    say = progress or (lambda msg: ctx.progress(0, None, msg))
    backend = TRLBackend()
    warnings: list[str] = []
    out.mkdir(parents=True, exist_ok=True)

    # win-rate prompts and the baseline's responses first (the baseline model is freed)
    s2 = ctx.artifacts("preference_data")
    held_path = s2.heldout
    prompts: list[dict[str, Any]] = []
    if win_rate and s2.heldout_prompts and Path(s2.heldout_prompts).is_file():
        from .generation import read_prompt_rows

        held = read_jsonl(Path(held_path)) if held_path and Path(held_path).is_file() else []
        prompts = winrate_prompts_from_rows(read_prompt_rows(s2.heldout_prompts),
                                            held[:cfg.kl_monitor.probe_size], ev.win_rate_prompts)
    elif win_rate and held_path and Path(held_path).is_file():
        prompts = winrate_prompts(read_jsonl(Path(held_path)), cfg.kl_monitor.probe_size,
                                  ev.win_rate_prompts)
    base_out: list[str] = []
    key: dict[str, Any] = {}
    if prompts:
        say("baseline responses to held-out prompts")
        key = baseline_cache_key(ctx)
        base_out = baseline_responses(ctx, prompts, backend=backend, key=key)

    say("loading the evaluated model")
    handle = backend.load(model_path, device=cfg.device)

    # benchmarks
    before, why = load_baseline_benchmarks(ctx)
    table: dict[str, BenchmarkRetention] = {}
    bench_path = None
    if before is None:
        gates = [ctx.thresholds.evaluate("capability_retention", None, detail=f"unmeasured: {why}"),
                 ctx.thresholds.evaluate("worst_benchmark_retention", None, detail=f"unmeasured: {why}")]
    else:
        from .evaluation import evaluate_model

        say("benchmarks (lm-eval)")
        after = evaluate_model(handle.model, handle.tokenizer, cfg.sft.benchmarks, limit=before.limit)
        bench_path = out / "benchmarks.json"
        if is_main_process():
            write_json_atomic(bench_path, after)
        gates, table = retention_gates(ctx.thresholds, before, after, n_boot=ev.n_boot, seed=cfg.seed)

    # win rate, and the reward-hacking guard on the same responses
    win: WinRateOutcome | None = None
    guard_found = None
    wr_path = None
    from .reward_hacking import guard_gates, measure_guard

    if not win_rate:
        why = "not applicable: the candidate is the baseline itself"
        gates.append(ctx.thresholds.evaluate("win_rate", None, detail=why))
        gates += guard_gates(ctx.thresholds, None, why_none=why[len("not applicable: "):])
    elif not prompts:
        gates.append(ctx.thresholds.evaluate(
            "win_rate", None, detail="unmeasured: stage 2 wrote no held-out prompts"))
        gates += guard_gates(ctx.thresholds, None, why_none="stage 2 wrote no held-out prompts")
    else:
        say("policy responses to held-out prompts")
        pol_out = backend.generate(handle, [p["prompt"] for p in prompts],
                                   max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
        del handle
        records = [{"prompt": p["prompt"], "reference": p["reference"], "in_probe": p["in_probe"],
                    "policy": po, "baseline": bo, "max_new_tokens": ev.max_new_tokens,
                    "baseline_key": key, **({"truth": p["truth"]} if p.get("truth") else {})}
                   for p, po, bo in zip(prompts, pol_out, base_out)]
        rm = ctx.artifacts("reward_model").reward_model
        if rm and not Path(rm).is_dir():
            warnings.append(f"the stage-4 reward model {rm} is missing; it cannot judge")
            rm = None
        say("judging responses")
        counts = judge_records(records, judge=ev.judge, reward_model=rm,
                               reward_max_length=cfg.reward.max_length, batch_size=ev.batch_size,
                               device=cfg.device)
        if ev.judge == "verifier":
            why_none = "evaluation.judge is 'verifier' and these rows carry no reference answer"
        elif ev.judge == "reward_model" and rm is None:
            why_none = "evaluation.judge is 'reward_model' but stage 4 saved no reward model"
        else:
            why_none = ("no judge: the held-out rows carry no reference answer for the verifier "
                        "and stage 4 saved no reward model")
        win = win_rate_gate(ctx.thresholds, records, counts, n_boot=ev.n_boot, seed=cfg.seed,
                            why_none=why_none)
        gates.append(win.gate)
        from .messages import as_text

        guard = measure_guard([as_text(r["prompt"]) for r in records],
                              [r["policy"] for r in records], [r["baseline"] for r in records],
                              [r.get("baseline_correct") for r in records], seed=cfg.seed)
        gates += guard_gates(ctx.thresholds, guard)
        guard_found = guard
        wr_path = out / "winrate.jsonl"
        if is_main_process():
            write_jsonl_atomic(wr_path, records)
    if guard_found is not None and guard_found.signals:
        warnings.append("reward hacking: " + "; ".join(guard_found.signals))
    return Assessment(model=str(model_path), gates=gates, retention=table, win=win,
                      benchmarks_path=str(bench_path) if bench_path else None,
                      winrate_path=str(wr_path) if wr_path else None, warnings=warnings,
                      guard=guard_found.model_dump(mode="json") if guard_found else None)


