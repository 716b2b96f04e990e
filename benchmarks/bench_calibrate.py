"""Measure the DPO batch-size curve with :func:`realign.hardware_calibrator.calibrate`.

    python benchmarks/bench_calibrate.py --model default --seq-len 256 [--quick] [--out f.json]

``--random-init-from DIR`` builds the model of ``DIR/config.json`` with random weights
(tokenizer from DIR) instead of loading weights: throughput depends on the architecture,
the sequence length and the batch size, not on the weights' values, so a machine that
cannot hold or fetch the weights (a lent GPU box, say) still measures the real curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def random_init(src: Path, dest: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(src))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(dest))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dest))
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--random-init-from", type=Path)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-seconds", type=float)
    ap.add_argument("--max-batch", type=int)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from realign.hardware_calibrator import calibrate

    model = a.model
    if a.random_init_from:
        model = str(random_init(a.random_init_from,
                                Path(tempfile.mkdtemp(prefix="realign-arch-")) / a.random_init_from.name))
    res = calibrate(model, seq_len=a.seq_len, device=a.device, quick=a.quick, refresh=True,
                    max_seconds=a.max_seconds, max_batch=a.max_batch,
                    progress=lambda m: print(m, file=sys.stderr, flush=True))
    hw = res.hardware
    where = ", ".join(f"{d.name} {d.memory_gb} GiB" for d in hw.cuda) or hw.cpu.model
    print(f"{res.model} ({res.model_params / 1e6:.1f}M params, {res.dtype}) on {res.device} "
          f"[{where}], seq_len {res.seq_len}, {'quick' if res.quick else 'full'} sweep, "
          f"load average at start {res.load_average}")
    print("batch  examples/s  step_ms  memory_gb  status")
    for p in res.points:
        eps = f"{p.examples_per_s:10.2f}" if p.examples_per_s else "         —"
        ms = f"{p.step_ms:8.1f}" if p.step_ms else "       —"
        mem = f"{p.memory_gb:9.2f}" if p.memory_gb is not None else "        —"
        print(f"{p.batch_size:5d}  {eps}  {ms}  {mem}  {p.status} {p.detail[:80]}")
    print(f"stop: {res.stop_reason}")
    if res.peak:
        print(f"peak {res.peak.examples_per_s:.2f} examples/s at batch {res.peak.batch_size}; "
              f"recommended batch {res.recommended_batch_size}; {res.recommendation}")
    if a.out:
        a.out.write_text(json.dumps(json.loads(res.model_dump_json(by_alias=True)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
