"""MLX vs TRL: DPO optimizer-step time and examples/s on the same model and batch (issue 16).

Same model (the default SmolLM2-135M-Instruct unless ``--model``), the same preference
pairs (the first ``steps × batch`` rows of ``examples/pairs.jsonl``, TRL conversational
format), the same DPO settings (sigmoid loss, β 0.1, AdamW, ``--batch-size`` pairs per
step, ``--max-length`` tokens per sequence), full fine-tuning, reference log-probs
precomputed before training (untimed) in all variants, so a step is the policy's
forward + backward over ``2 × batch`` sequences and the update. Variants:

* ``trl-fp32``: realign's stage-5 trainer (``realign.backends.trl_train.make_dpo_trainer_class``,
  i.e. TRL's ``DPOTrainer`` with the completion-only LM head) with ``bf16=False``: float32,
  the numerics the MLX backend reproduces (the parity tests compare these two);
* ``trl-default``: the same with TRL's default ``bf16=True`` (bf16 autocast on a CPU),
  which is what stage 5 runs today;
* ``mlx``: :class:`realign.backends.mlx_dpo.MLXDPOTrainer`, float32, on MLX's default
  device (the CPU here: ``mlx[cpu]``; Metal on a Mac).

Each variant runs in a fresh Python process (imports and model loading are not timed),
in rotating order, ``--reps`` times; the first ``--warmup`` steps are not counted.
Prints every run, the medians, and the ratios MLX / TRL (step time; examples/s =
batch × gradient accumulation ÷ step time).

    python benchmarks/bench_mlx.py [--steps 6] [--warmup 1] [--batch-size 4] [--max-length 128] [--reps 1]

On an Apple Silicon Mac (the figure that matters: MLX then runs on Metal, and TRL on
MPS in float32, which is what the TRL backend picks there):

    pip install -e '.[train,mlx]'
    python benchmarks/bench_mlx.py --steps 20 --warmup 2 --batch-size 8 --max-length 256 --reps 2 --trl-device mps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("trl-fp32", "trl-default", "mlx")


def _rows(n: int) -> list[dict]:
    from realign.rows import read_rows, to_trl_row

    rows = [to_trl_row(r) for r in read_rows(ROOT / "examples" / "pairs.jsonl")]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows[:n]]


def _child(a: argparse.Namespace) -> dict[str, object]:
    n = (a.steps + a.warmup) * a.batch_size
    rows = _rows(n)
    total = a.steps + a.warmup
    if a.child == "mlx":
        from realign.backends.base import DPOSettings
        from realign.backends.mlx import MLXBackend, make_policy
        from realign.backends.mlx_dpo import MLXDPOTrainer

        ref = MLXBackend().load(a.model, device=a.mlx_device)
        policy = make_policy(ref, None)
        s = DPOSettings(beta=0.1, loss_type="sigmoid", learning_rate=5e-6, per_device_batch_size=a.batch_size,
                        max_steps=total, max_length=a.max_length, seed=0)
        tr = MLXDPOTrainer(policy, ref, rows, s, use_cache=False)
        t0 = time.perf_counter()
        tr.precompute_reference()
        pre = time.perf_counter() - t0
        res = tr.train()
        import mlx.core as mx

        return {"steps": res.step_seconds, "precompute": pre, "device": str(mx.default_device()),
                "loss": [r["loss"] for r in res.log_history]}

    import torch
    from datasets import Dataset
    from realign.backends import trl_train as tt
    from realign.backends.trl import TRLBackend, make_policy
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    tt.quiet_hf()
    tt.ref_cache_dir = lambda: Path(a.work) / f"cache-{os.getpid()}"  # type: ignore[assignment]
    ref = TRLBackend().load(a.model, device=a.trl_device)
    for p in ref.model.parameters():
        p.requires_grad_(False)
    policy = make_policy(ref.model, None)
    steps: list[float] = []

    def sync() -> None:
        if ref.device.type == "mps":
            torch.mps.synchronize()
        elif ref.device.type == "cuda":
            torch.cuda.synchronize()

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *x: object, **k: object) -> None:
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, *x: object, **k: object) -> None:
            sync()
            steps.append(time.perf_counter() - self.t)

    extra = {"save_strategy": "no"}
    if a.child == "trl-fp32":
        extra["bf16"] = False
    args = tt.dpo_config(Path(a.work) / f"out-{os.getpid()}", beta=0.1, loss_type="sigmoid",
                         learning_rate=5e-6, batch_size=a.batch_size, gradient_accumulation_steps=1,
                         max_steps=total, num_epochs=1, max_length=a.max_length, seed=0,
                         save_every=10**6, use_cpu=(ref.device.type == "cpu") or None, extra=extra)
    t0 = time.perf_counter()
    trainer = tt.make_dpo_trainer_class()(model=policy, ref_model=ref.model, args=args,
                                          train_dataset=Dataset.from_list(rows),
                                          processing_class=ref.tokenizer, callbacks=[Timer()])
    pre = time.perf_counter() - t0
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"steps": steps, "precompute": pre, "device": str(ref.device), "loss": losses,
            "bf16": bool(trainer.args.bf16)}


def _run_child(variant: str, a: argparse.Namespace, work: Path) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(work), "--model", a.model,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
           "--max-length", str(a.max_length), "--trl-device", a.trl_device or "",
           "--mlx-device", a.mlx_device or ""]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=6, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="steps run first and not counted")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--trl-device", default=None, help="cpu, mps or cuda (default: what the TRL backend picks)")
    ap.add_argument("--mlx-device", default=None, help="cpu or gpu (default: MLX's default device)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.trl_device = a.trl_device or None
    a.mlx_device = a.mlx_device or None
    if a.child:
        print("RESULT " + json.dumps(_child(a)), flush=True)
        return

    import tempfile

    variants = [v for v in a.variants.split(",") if v]
    work = Path(tempfile.mkdtemp(prefix="bench-mlx-"))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"model {a.model}; {a.steps} measured (+{a.warmup} warm-up) steps × batch {a.batch_size} pairs "
          f"(2 × {a.batch_size} sequences), max_length {a.max_length}; {os.cpu_count()} CPUs"
          + (f"; load average at start {load[0]:.1f}" if load else ""), flush=True)
    results: dict[str, list[dict[str, object]]] = {v: [] for v in variants}
    for rep in range(a.reps):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        for v in order:
            r = _run_child(v, a, work)
            measured = r["steps"][a.warmup:]  # type: ignore[index]
            r["median_step"] = statistics.median(measured)
            results[v].append(r)
            print(f"  rep {rep} {v:12s} device {r['device']:10s} median step {r['median_step']:.3f} s "
                  f"({a.batch_size / r['median_step']:.2f} examples/s)  steps "
                  + " ".join(f"{t:.2f}" for t in measured)
                  + f"  | precompute+init {r['precompute']:.1f} s  first losses "
                  + " ".join(f"{x:.4f}" for x in r["loss"][:3]), flush=True)  # type: ignore[index]
    med = {v: statistics.median(float(r["median_step"]) for r in results[v]) for v in variants}  # type: ignore[arg-type]
    print("\nmedian optimizer-step time over reps (examples/s = batch ÷ step time):")
    for v in variants:
        print(f"  {v:12s} {med[v]:.3f} s  {a.batch_size / med[v]:.2f} examples/s")
    if "mlx" in med:
        for base in ("trl-fp32", "trl-default"):
            if base in med:
                print(f"  mlx / {base}: step time ratio {med['mlx'] / med[base]:.2f} "
                      f"(examples/s ratio {med[base] / med['mlx']:.2f})")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average at the end {load[0]:.1f} (on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
