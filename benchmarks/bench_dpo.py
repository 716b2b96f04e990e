"""Stage 5 overhead: realign's DPO stage against a bare TRL ``DPOTrainer`` job.

Same model (the default SmolLM2-135M-Instruct unless --model), same data (the training
split stage 2 makes from the shipped sample pairs), same ``DPOConfig``. Each measurement
runs in a fresh Python process (imports not timed), in rotating order, ``--reps`` times:
on this 2-core VM a run's speed depends on the process's memory history (page faults are
20-35% of the CPU time of a DPO step), so runs in one long process drift by up to 40%.
Variants:

* ``bare``: plain TRL, reference forward every step (``precompute_ref_log_probs=False``;
  TRL loads the reference itself). Timed: ``train()`` alone, and the whole job a user
  runs (load, ``DPOTrainer`` init with its tokenization, ``train()``, ``save_model()``);
* ``bare-precompute``: plain TRL with its own ``precompute_ref_log_probs=True``: its
  ``train()`` without reference forwards, and its precompute (inside the init);
* ``cold``: stage 5 (``realign stage dpo``) with an empty reference log-prob cache;
* ``warm``: stage 5 again, the reference log-probs read from the cache.

Prints every run, then the medians and the ratios stage / bare (targets from issue 3:
cold ≤ 1.05; warm faster than bare by at least the reference forward passes' share).
The stage's verdict records where its time went (``findings.timings``), printed too.
Stages 1-3 (needed by stage 5) run once before, untimed.

    python benchmarks/bench_dpo.py [--steps 20] [--batch-size 8] [--max-length 128] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("bare", "bare-precompute", "cold", "warm")


def _child(args: argparse.Namespace) -> dict[str, object]:
    """One timed measurement, in this (fresh) process; returns a JSON-able record."""
    from transformers import Trainer, TrainerCallback

    from realign.backends import trl_train as tt

    import resource

    usage: dict[str, float] = {}  # CPU seconds and page faults of train()
    steps: list[float] = []  # wall time of each optimizer step (forward, backward, update)

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: object, **k: object) -> None:
            self.r0 = resource.getrusage(resource.RUSAGE_SELF)

        def on_step_begin(self, *a: object, **k: object) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: object, **k: object) -> None:
            steps.append(time.perf_counter() - self.t)

        def on_train_end(self, *a: object, **k: object) -> None:
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            usage.update(user=r1.ru_utime - self.r0.ru_utime, sys=r1.ru_stime - self.r0.ru_stime,
                         minflt=r1.ru_minflt - self.r0.ru_minflt)

    init_trainer = Trainer.__init__

    def timed_init(self: Trainer, *a: object, **k: object) -> None:
        init_trainer(self, *a, **k)
        self.add_callback(StepTimer())

    Trainer.__init__ = timed_init  # type: ignore[method-assign]

    tt.quiet_hf()
    cache = Path(args.cache)
    tt.ref_cache_dir = lambda: cache  # type: ignore[assignment]  # the bench's own cache
    run_dir = Path(args.run)
    if args.child in ("cold", "warm"):
        from realign.pipeline import run_stages

        t0 = time.perf_counter()
        status = run_stages(run_dir, stages=["dpo"], force=True)
        wall = time.perf_counter() - t0
        v = next(s.verdict for s in status.stages if s.name == "dpo")
        return {"wall": wall, "hit": v.findings["ref_logp_cache"]["hit"], "steps": steps, "usage": usage,
                "timings": v.findings["timings"], "kl": v.gate("kl_divergence").value,
                "margin": v.gate("reward_margin").value}

    import copy

    from trl import DPOTrainer

    from realign.backends.trl import TRLBackend
    from realign.models import resolve_model
    from realign.fileio import read_jsonl
    from realign.stages.dpo import _train_dataset

    rows = read_jsonl(run_dir / "stages" / "2-preference_data" / "train.jsonl")
    n = args.steps * args.batch_size
    t_all = time.perf_counter()
    handle = TRLBackend().load(resolve_model(args.model))
    policy = copy.deepcopy(handle.model)
    targs = tt.dpo_config(Path(args.cache).parent / "bare-out", beta=0.1, loss_type="sigmoid",
                          learning_rate=5e-6, batch_size=args.batch_size,
                          gradient_accumulation_steps=1, max_steps=args.steps, num_epochs=1,
                          max_length=args.max_length, seed=0, save_every=10**6,
                          precompute_ref=args.child == "bare-precompute", use_cpu=True,
                          bf16=tt.mixed_precision_bf16(policy))  # as stage 5: float32 here
    t_init = time.perf_counter()
    trainer = DPOTrainer(model=policy, args=targs, train_dataset=_train_dataset(rows, n, 0),
                         processing_class=handle.tokenizer)
    init = time.perf_counter() - t_init
    t0 = time.perf_counter()
    trainer.train()
    train = time.perf_counter() - t0
    trainer.save_model(str(Path(args.cache).parent / "bare-model"))
    return {"wall": time.perf_counter() - t_all, "train": train, "init": init, "steps": steps, "usage": usage}


def _run_child(variant: str, run_dir: Path, cache: Path, a: argparse.Namespace) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", variant, "--run", str(run_dir), "--cache", str(cache),
           "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--max-length", str(a.max_length), "--model", a.model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(_child(a)), flush=True)
        return

    from realign.backends import trl_train as tt
    from realign.config import RunConfig
    from realign.pipeline import create_run, run_stages

    tt.quiet_hf()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    cfg = RunConfig(
        model=a.model, data=str(ROOT / "examples" / "pairs.jsonl"),
        output_dir=str(work / "runs"), run_id="bench",
        thresholds={"baseline_perplexity": 1e9},
        sft={"eval_responses": 8},
        dpo={"max_steps": a.steps, "batch_size": a.batch_size,
             "max_length": a.max_length, "save_every": 10**6},
    )
    run_dir = create_run(cfg)
    run_stages(run_dir, stages=["sft_baseline", "preference_data", "reference_init"])
    n = a.steps * a.batch_size
    print(f"{a.steps} steps × batch {a.batch_size} = {n} pairs, max_length {a.max_length}, "
          f"{os.cpu_count()} CPUs, {a.reps} reps, each run in a fresh process")

    results: dict[str, list[dict[str, object]]] = {v: [] for v in VARIANTS}
    for rep in range(a.reps):
        cache = work / f"cache-{rep}"
        cache.mkdir()
        order = ["bare", "bare-precompute", "cold", "warm"]
        if rep % 2:  # alternate which side runs first
            order = ["cold", "warm", "bare", "bare-precompute"]
        for variant in order:
            r = _run_child(variant, run_dir, cache, a)
            results[variant].append(r)
            step = statistics.median(r["steps"])  # type: ignore[arg-type]
            if variant in ("cold", "warm"):
                print(f"  rep {rep} {variant:15s} stage {r['wall']:7.1f} s  cache hit {r['hit']}  "
                      f"median step {step:.2f} s  KL {r['kl']:.4f}  margin {r['margin']:+.3f}  | "
                      + ", ".join(f"{k} {t:.1f}" for k, t in r["timings"].items()), flush=True)  # type: ignore[union-attr]
            else:
                print(f"  rep {rep} {variant:15s} train() {r['train']:7.1f} s  job {r['wall']:7.1f} s  "
                      f"(init {r['init']:.1f} s)  median step {step:.2f} s", flush=True)

    def med(variant: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in results[variant])  # type: ignore[arg-type]

    bare_train, bare_job = med("bare", "train"), med("bare", "wall")
    pre_train, pre_init = med("bare-precompute", "train"), med("bare-precompute", "init")
    cold, warm = med("cold", "wall"), med("warm", "wall")
    share = 1 - pre_train / bare_train
    print("\nmedians over reps:")
    print(f"  bare TRL, live reference:  train() {bare_train:7.1f} s ({n / bare_train:.2f} examples/s), "
          f"whole job {bare_job:7.1f} s")
    print(f"  bare TRL, its precompute:  train() {pre_train:7.1f} s ({n / pre_train:.2f} examples/s; "
          f"reference forward share of bare train() {share:.1%}), init with precompute {pre_init:.1f} s")
    print(f"  stage 5 cold:              {cold:7.1f} s ({n / cold:.2f} examples/s)  "
          f"ratio vs bare train() {cold / bare_train:.3f}, vs bare job {cold / bare_job:.3f}  (target ≤ 1.05)")
    print(f"  stage 5 warm:              {warm:7.1f} s ({n / warm:.2f} examples/s)  "
          f"ratio vs bare train() {warm / bare_train:.3f}, vs bare job {warm / bare_job:.3f}  "
          f"(target ≤ {1 - share:.3f}); vs TRL precompute-mode train() {warm / pre_train:.3f}")
    print("  median optimizer step (s): " + ", ".join(
        f"{v} {statistics.median(statistics.median(r['steps']) for r in results[v]):.2f}"  # type: ignore[arg-type]
        for v in VARIANTS))
    for variant in ("cold", "warm"):
        keys = results[variant][0]["timings"].keys()  # type: ignore[union-attr]
        print(f"  stage 5 {variant} breakdown (median s): " + ", ".join(
            f"{k} {statistics.median(r['timings'][k] for r in results[variant]):.1f}"  # type: ignore[index]
            for k in keys))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
