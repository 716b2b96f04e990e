"""Stage 5 overhead: realign's DPO stage against a bare ``DPOTrainer.train()``.

Same model (the default SmolLM2-135M-Instruct unless --model), same data (the shipped
sample pairs), same TRL settings, same process. Prints:

* bare: wall seconds and examples/s of a plain TRL run (reference forward every step),
  both ``train()`` alone and the whole job a user runs (load, DPOTrainer init with its
  tokenization, ``train()``, ``save_model()``) — the stage does all of these;
* stage 5, cold: the stage with the KL monitor at its default interval, reference
  log-prob cache empty (TRL precomputes the reference log-probs, then trains);
* stage 5, warm: the same stage again, the reference log-probs read from the cache;
* the ratios stage/bare (target: cold ≤ 1.05; warm below 1 by at least the reference
  forward passes' share of the bare run).

Stages 1-3 (needed by stage 5) run before the timed part and are not timed.

    python benchmarks/bench_dpo.py [--steps 20] [--batch-size 8] [--max-length 128]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from realign.backends.trl import TRLBackend
    from realign.backends.trl_train import dpo_config, quiet_hf
    from realign.config import RunConfig
    from realign.models import resolve_model
    from realign.pipeline import create_run, run_stages
    from realign.stages.common import read_jsonl
    from realign.stages.dpo import _train_dataset

    quiet_hf()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    import realign.backends.trl_train as tt

    (work / "refcache").mkdir()
    tt.ref_cache_dir = lambda: work / "refcache"  # a cold reference log-prob cache
    cfg = RunConfig(
        model=args.model, data=str(ROOT / "examples" / "pairs.jsonl"),
        output_dir=str(work / "runs"), run_id="bench",
        thresholds={"baseline_perplexity": 1e9},
        sft={"eval_responses": 8},
        dpo={"max_steps": args.steps, "batch_size": args.batch_size,
             "max_length": args.max_length, "save_every": 10**6},
    )
    run_dir = create_run(cfg)
    run_stages(run_dir, stages=["sft_baseline", "preference_data", "reference_init"])
    train_rows = read_jsonl(run_dir / "stages" / "2-preference_data" / "train.jsonl")
    n = args.steps * args.batch_size
    print(f"threads {torch.get_num_threads()}, steps {args.steps}, batch {args.batch_size}, "
          f"max_length {args.max_length}, {n} pairs, load {os.getloadavg()[0]:.1f}")

    # -- bare TRL --------------------------------------------------------------------
    from trl import DPOTrainer

    backend = TRLBackend()
    t_all = time.perf_counter()
    handle = backend.load(resolve_model(args.model))
    policy = copy.deepcopy(handle.model)
    targs = dpo_config(work / "bare", beta=0.1, loss_type="sigmoid", learning_rate=5e-6,
                       batch_size=args.batch_size, gradient_accumulation_steps=1,
                       max_steps=args.steps, num_epochs=1, max_length=args.max_length, seed=0,
                       save_every=10**6, precompute_ref=False, use_cpu=True)
    trainer = DPOTrainer(model=policy, args=targs, train_dataset=_train_dataset(train_rows, n, 0),
                         processing_class=handle.tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    bare_train = time.perf_counter() - t0
    trainer.save_model(str(work / "bare-model"))
    bare = time.perf_counter() - t_all
    del trainer, policy
    print(f"bare DPOTrainer, train() only:        {bare_train:7.1f} s  {n / bare_train:6.2f} examples/s")
    print(f"bare DPOTrainer, load+init+train+save: {bare:7.1f} s  {n / bare:6.2f} examples/s")

    # -- stage 5, cold then warm cache ---------------------------------------------------
    for name in ("cold", "warm"):
        t0 = time.perf_counter()
        status = run_stages(run_dir, stages=["dpo"], force=True)
        wall = time.perf_counter() - t0
        v = next(s.verdict for s in status.stages if s.name == "dpo")
        cache = v.findings["ref_logp_cache"]
        print(f"stage 5 ({name}), whole stage:         {wall:7.1f} s  {n / wall:6.2f} examples/s  "
              f"ratio {wall / bare:.3f} (vs train() only {wall / bare_train:.3f})  cache hit {cache['hit']}  "
              f"precompute {cache['precompute_seconds'] or 0:.1f} s  "
              f"KL {v.gate('kl_divergence').value:.4f}  margin {v.gate('reward_margin').value:+.4f}  "
              f"checks {len(v.findings['checks'])}")
        import json

        logs = [json.loads(x) for x in (run_dir / "stages" / "5-dpo" / "metrics.jsonl").read_text().splitlines()]
        runtime = next((r["train_runtime"] for r in logs if "train_runtime" in r), None)
        print(f"    inside the stage: trainer init + train() {v.findings['train_seconds']:.1f} s, "
              f"TRL train_runtime {runtime:.1f} s, the rest of the stage {wall - v.findings['train_seconds']:.1f} s")
        print("    breakdown (s): " + ", ".join(f"{k} {t:.1f}" for k, t in v.findings["timings"].items()))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
