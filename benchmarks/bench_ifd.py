"""Benchmark IFD scoring (issue 4, "Performance"): examples/s with the default model.

What it does:

1. Takes the first ``--n`` (default 1,000) pairs of ``examples/pairs.jsonl`` as IFD
   examples (prompt + chosen, as ``realign ifd`` reads preference data). Each example is
   two sequences (answer after the instruction, answer after the empty-instruction
   context), so 1,000 examples are 2,000 sequences.
2. Loads the default model (SmolLM2-135M-Instruct, ``realign.models.default_model_path()``)
   through the TRL backend, warms up on 8 examples, then times
   :func:`realign.ifd.ifd_scores` on all ``--n`` examples at ``--batch-size`` (default 16)
   and on the first ``--baseline-n`` (default 200) examples at batch size 1.
3. Prints examples/s of both, their ratio (batched ÷ batch 1, both in examples/s), the
   largest IFD difference between the two runs on the shared examples (batching must
   not change a score), torch threads, CPU count and the load average before and after.

The machine these figures come from is shared (other processes compete for the cores):
run it more than once and read the load average it prints.

Measured (2026-11-27, 2-CPU x86-64 VM shared with other jobs, load average 8 → 5 during
the run, ``--threads 1``): 1,000 examples (2,000 sequences, 11,124 answer tokens) at
batch 16 in 583 s = 1.72 examples/s; batch 1 on the first 100: 1.25 examples/s; ratio
1.37x; largest relative IFD difference batch vs 1: 3.6e-6; mean IFD 0.134, 0.2% above 1.
On CPU the forward pass is compute-bound, so batching gains little; it pays on GPUs.
With torch's default 2 threads on the same loaded machine a 64-example run was ~3x
slower (0.4 vs 1.1 examples/s): OpenMP threads spin against the other jobs, so pass
``--threads 1`` on an oversubscribed machine.

Usage::

    python benchmarks/bench_ifd.py                        # 1,000 examples, batch 16 vs 1
    python benchmarks/bench_ifd.py --n 200 --batch-size 32 --json
    python benchmarks/bench_ifd.py --threads 1            # torch.set_num_threads(1)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def load_examples(n: int) -> tuple[list[str], list[str]]:
    prompts, answers = [], []
    with open(ROOT / "examples" / "pairs.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if len(prompts) == n:
                break
            r = json.loads(line)
            if r["chosen"].strip():
                prompts.append(r["prompt"])
                answers.append(r["chosen"])
    if len(prompts) < n:
        sys.exit(f"examples/pairs.jsonl has only {len(prompts)} usable rows, asked for {n}")
    return prompts, answers


def timed(handle, backend, prompts, answers, batch_size, max_length):  # noqa: ANN001, ANN201
    from realign.ifd import ifd_scores

    t0 = time.perf_counter()
    res = ifd_scores(handle, prompts, answers, batch_size=batch_size, max_length=max_length,
                     backend=backend)
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--baseline-n", type=int, default=200, help="examples timed at batch size 1")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import torch

    from realign.backends.trl import TRLBackend
    from realign.backends.trl_train import quiet_hf
    from realign.models import default_model_path

    quiet_hf()
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    prompts, answers = load_examples(a.n)
    backend = TRLBackend()
    handle = backend.load(default_model_path(), device=a.device)
    timed(handle, backend, prompts[:8], answers[:8], a.batch_size, a.max_length)  # warm-up

    res, secs = timed(handle, backend, prompts, answers, a.batch_size, a.max_length)
    m = min(a.baseline_n, a.n)
    res1, secs1 = timed(handle, backend, prompts[:m], answers[:m], 1, a.max_length)
    rate, rate1 = a.n / secs, m / secs1
    diff = max(abs(x - y) / y for x, y in zip(res.ifd[:m], res1.ifd) if x is not None and y)
    scored = [x for x in res.ifd if x is not None]
    out = {
        "examples": a.n, "sequences": 2 * a.n, "answer_tokens": sum(res.tokens),
        "batch_size": a.batch_size, "seconds": round(secs, 2), "examples_per_s": round(rate, 2),
        "baseline_examples": m, "baseline_seconds": round(secs1, 2),
        "baseline_examples_per_s": round(rate1, 2), "speedup_vs_batch_1": round(rate / rate1, 2),
        "max_rel_ifd_diff_batch_vs_1": diff,
        "mean_ifd": sum(scored) / len(scored), "share_ifd_above_1": sum(x > 1 for x in scored) / len(scored),
        "device": a.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "note": "shared machine: other processes compete for the CPU; see loadavg",
    }
    if a.json:
        print(json.dumps(out))
        return
    print(f"IFD, default model, {a.device}, {out['torch_threads']} torch threads, "
          f"{out['cpu_count']} CPUs (shared; load {load_before[0]:.1f} → {out['loadavg_after'][0]:.1f})")
    print(f"  batch {a.batch_size}: {a.n} examples ({2 * a.n} sequences, {out['answer_tokens']} answer "
          f"tokens) in {secs:.1f} s = {rate:.1f} examples/s")
    print(f"  batch 1:  {m} examples in {secs1:.1f} s = {rate1:.1f} examples/s")
    print(f"  batching speed-up: {rate / rate1:.2f}x; largest relative IFD difference "
          f"batch vs 1: {diff:.2e}")
    print(f"  mean IFD {out['mean_ifd']:.3f}, share IFD > 1: {out['share_ifd_above_1']:.1%}")


if __name__ == "__main__":
    main()
