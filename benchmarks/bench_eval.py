"""Benchmark the offline capability suites on the default model (issue 5, "Performance").

What it measures, in one process on this machine's CPU (or ``--device``):

1. Loading the default model (SmolLM2-135M-Instruct, materialized from the GGUF once).
2. ``realign.evaluation.evaluate_lm`` over the default offline suites, with lm-eval's
   ``HFLM`` model-call methods (``loglikelihood``, ``loglikelihood_rolling``,
   ``generate_until``) wrapped by timers. "Model calls" is the time inside those methods
   (tokenization, batching, forward passes, decoding); "outside" is everything else:
   task loading, building requests, chat templates, filters, metrics, collecting the
   per-item results.

Prints wall time per phase, the share of evaluation time spent outside the model calls
(target: under 10%), the score of each suite and the load average before/after (the
machine may be shared: timings are disturbed by other work).

Usage::

    python benchmarks/bench_eval.py                  # all default suites, all items
    python benchmarks/bench_eval.py --limit 20       # a quick look
    python benchmarks/bench_eval.py --json           # one JSON object on stdout
    python benchmarks/bench_eval.py --save res.json  # also keep the per-item results
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def instrument(lm: Any) -> dict[str, float]:
    """Replace the LM's request methods by timed wrappers (instance attributes)."""
    spent: dict[str, float] = defaultdict(float)
    for name in MODEL_METHODS:
        method = getattr(lm, name)

        @functools.wraps(method)
        def timed(*args: Any, _m: Any = method, _n: str = name, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return _m(*args, **kwargs)
            finally:
                spent[_n] += time.perf_counter() - t

        setattr(lm, name, timed)
    return spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--suite", action="append", help="suite (repeatable; default: shipped suites)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", help="write the BenchmarkResults (per-item scores, responses) here")
    args = ap.parse_args(argv)

    from realign.backends.trl import TRLBackend
    from realign.evaluation import DEFAULT_SUITES, evaluate_lm, make_lm

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    handle = TRLBackend().load(args.model, device=args.device)
    t_load = time.perf_counter() - t0

    lm = make_lm(handle.model, handle.tokenizer, batch_size=args.batch_size)
    spent = instrument(lm)
    suites = args.suite or list(DEFAULT_SUITES)
    t1 = time.perf_counter()
    res = evaluate_lm(lm, suites, limit=args.limit)
    t_eval = time.perf_counter() - t1
    model_time = sum(spent.values())
    if args.save:
        with open(args.save, "w", encoding="utf-8") as f:
            f.write(res.model_dump_json())
    outside = t_eval - model_time
    report = {
        "model": args.model,
        "device": str(handle.device),
        "threads": __import__("torch").get_num_threads(),
        "batch_size": args.batch_size,
        "limit": args.limit,
        "load_s": round(t_load, 2),
        "eval_s": round(t_eval, 2),
        "model_calls_s": {k: round(v, 2) for k, v in spent.items()},
        "outside_model_calls_s": round(outside, 2),
        "outside_share": round(outside / t_eval, 4) if t_eval > 0 else None,
        "suites": {k: {"score": v.score, "n": v.n, "metric": v.metric, "chance": v.chance,
                       "chat_template": v.apply_chat_template} for k, v in res.suites.items()},
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return 0
    print(f"model {args.model} on {report['device']} ({report['threads']} torch threads, "
          f"batch {args.batch_size}); load average before {report['loadavg_before']}, "
          f"after {report['loadavg_after']} on {report['cpu_count']} CPUs")
    print(f"model load: {t_load:.1f} s")
    print(f"evaluation: {t_eval:.1f} s; in model calls {model_time:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in spent.items())}); outside "
          f"{outside:.1f} s = {100 * outside / t_eval:.1f}% (target < 10%)")
    for k, v in res.suites.items():
        score = "—" if v.score is None else f"{v.score:.3f}"
        print(f"  {k:20s} {v.metric:28s} {score:>6s}  n={v.n:<4d} chance={v.chance}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
