"""Benchmark on-policy sampling (issue 15): tokens/s batched vs one prompt at a time, the
shared prefill of k samples, and torch thread counts.

On the default model (SmolLM2-135M-Instruct) and the default run's prompts
(``lib/default_data/sentiment.jsonl``, the first ``--prompts``), k samples per prompt
(temperature 1, top_p 0.95, at most ``--max-new-tokens`` tokens), this machine's CPU.
Each configuration runs in a **fresh subprocess** (``torch.set_num_threads`` before any
work), so thread counts do not share a warmed-up pool. Rows:

* ``one prompt at a time``: :func:`realign.backends.trl.sample_many` with a batch of k
  sequences (one prompt's k samples; their prefill shared);
* ``batched``: batches of ``--batch`` sequences (batch ÷ k prompts);
* ``hf generate``: transformers' ``model.generate`` (sampling, top_p, the same prompts
  repeated k times, batches of ``--batch``), the baseline the sampler replaced;

each at 1 and 2 threads (``--threads``). Reported: wall seconds, sampled tokens, tokens/s
and the ratio to the one-prompt-at-a-time row at 1 thread, plus the load average before
and after (a shared machine disturbs the figures; ratios within one run are what count).

Usage::

    python benchmarks/bench_generate.py                    # 32 prompts x 4 samples
    python benchmarks/bench_generate.py --prompts 64 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
torch.set_num_threads(int(sys.argv[1]))
mode, n, k, tokens, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
from realign.backends.trl import TRLBackend, sample_many, encode_prompt, _pad_id
from realign.generation import read_prompt_rows
rows = read_prompt_rows(sys.argv[7])[:n]
prompts = [r.prompt for r in rows]
be = TRLBackend()
h = be.load("default", device="cpu")
sample_many(h, prompts[:1], num_samples=k, max_new_tokens=4, seed=9, temperature=1.0, top_p=0.95)  # warm-up
t0 = time.perf_counter()
if mode == "hf":
    tok = h.tokenizer
    ids = [encode_prompt(tok, p) for p in prompts for _ in range(k)]
    got = 0
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch]
        L = max(len(x) for x in chunk)
        x = torch.full((len(chunk), L), _pad_id(tok), dtype=torch.long)
        a = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, c in enumerate(chunk):
            x[r, L - len(c):] = torch.tensor(c)
            a[r, L - len(c):] = 1
        with torch.no_grad():
            out = h.model.generate(input_ids=x, attention_mask=a, max_new_tokens=tokens, do_sample=True,
                                   temperature=1.0, top_p=0.95, top_k=0, pad_token_id=_pad_id(tok),
                                   eos_token_id=tok.eos_token_id)
        for r in range(len(chunk)):
            new = out[r, L:].tolist()
            got += (new.index(tok.eos_token_id) + 1) if tok.eos_token_id in new else len(new)
else:
    b = k if mode == "one" else batch
    enc = sample_many(h, prompts, num_samples=k, max_new_tokens=tokens, seed=0, temperature=1.0,
                      top_p=0.95, batch_size=b)
    got = sum(e.n_completion for s in enc for e in s)
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "tokens": got}))
"""


def run_one(threads: int, mode: str, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), mode, str(args.prompts),
                          str(args.k), str(args.max_new_tokens), str(args.batch),
                          str(ROOT / "lib" / "default_data" / "sentiment.jsonl")],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32, help="sequences per batch")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()
    rows = []
    for mode, label in (("one", "one prompt at a time"), ("batched", "batched"),
                        ("hf", "hf generate")):
        for th in args.threads:
            r = run_one(th, mode, args)
            rows.append({"mode": label, "threads": th, **r,
                         "tokens_per_s": r["tokens"] / r["seconds"]})
    base = next(r for r in rows if r["mode"] == "one prompt at a time" and r["threads"] == args.threads[0])
    for r in rows:
        r["vs_one_at_a_time_1_thread"] = r["tokens_per_s"] / base["tokens_per_s"]
    res = {"prompts": args.prompts, "k": args.k, "max_new_tokens": args.max_new_tokens,
           "batch": args.batch, "load_before": load0, "load_after": os.getloadavg(), "rows": rows}
    if args.json:
        print(json.dumps(res))
        return
    print(f"{args.prompts} prompts x {args.k} samples, <= {args.max_new_tokens} tokens, "
          f"batch {args.batch} sequences; load {load0[0]:.2f} -> {res['load_after'][0]:.2f}")
    print(f"{'mode':<22}{'threads':>8}{'seconds':>9}{'tokens':>8}{'tok/s':>8}{'ratio':>7}")
    for r in rows:
        print(f"{r['mode']:<22}{r['threads']:>8}{r['seconds']:>9.1f}{r['tokens']:>8}"
              f"{r['tokens_per_s']:>8.1f}{r['vs_one_at_a_time_1_thread']:>7.2f}")


if __name__ == "__main__":
    main()
