"""Wall time of each stage of the default run (`realign run` with no arguments; issue 15).

Creates the default run (:func:`realign.default_run.default_config`) under
``benchmarks/_data/runs/`` and runs its seven stages one at a time, in order, as the
pipeline does (a stage whose gate fails stops the run, as in ``realign run``), timing
each. Prints per stage: wall seconds, its share of the total, the verdict and its gates;
then the total, the torch thread count and the load average before and after (the
machine may be shared: other work inflates every figure, and the shares are the
steadier number). ``--threads`` sets torch's thread count first (default: torch's own).

Usage::

    python benchmarks/bench_default_run.py                 # torch's default threads
    python benchmarks/bench_default_run.py --threads 1 --json
    python benchmarks/bench_default_run.py --run-id mine   # keep the run under that name
    python benchmarks/bench_default_run.py seed=1          # KEY=VALUE overrides
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parent / "_data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--run-id", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="config overrides, as `realign run` takes them (e.g. seed=1)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from realign.config import RunConfig, apply_overrides
    from realign.default_run import default_config
    from realign.pipeline import create_run, run_stages, run_status
    from realign.stages.registry import STAGES

    run_id = args.run_id or time.strftime("default-%Y%m%d-%H%M%S")
    cfg = default_config(output_dir=str(DATA / "runs"), run_id=run_id)
    cfg = RunConfig.model_validate(apply_overrides(cfg.model_dump(mode="json"), args.overrides))
    run = create_run(cfg)
    load0 = os.getloadavg()
    rows = []
    t_all = time.perf_counter()
    for name in STAGES:
        t0 = time.perf_counter()
        st = run_stages(run, stages=[name])
        secs = time.perf_counter() - t0
        v = next(s.verdict for s in st.stages if s.name == name)
        rows.append({"stage": name, "seconds": secs, "status": v.status if v else None,
                     "gates": {g.name: [g.value, g.status] for g in v.gates} if v else {}})
        if v is not None and any(g.status == "fail" and g.name not in st.allowed_failures
                                 for g in v.gates):
            break
    total = time.perf_counter() - t_all
    for r in rows:
        r["share"] = r["seconds"] / total
    res = {"run_dir": str(run), "threads": torch.get_num_threads(), "total_seconds": total,
           "load_before": load0, "load_after": os.getloadavg(), "stages": rows,
           "state": run_status(run).state}
    if args.json:
        print(json.dumps(res))
        return
    print(f"default run {run} — {torch.get_num_threads()} torch thread(s), load "
          f"{load0[0]:.2f} -> {res['load_after'][0]:.2f}")
    print(f"{'stage':<18}{'seconds':>9}{'share':>8}  status  gates")
    for r in rows:
        gates = ", ".join(f"{k}={'—' if v[0] is None else f'{v[0]:.3g}'} {v[1]}"
                          for k, v in r["gates"].items())
        print(f"{r['stage']:<18}{r['seconds']:>9.1f}{r['share']:>8.1%}  {r['status']}  {gates}")
    print(f"{'total':<18}{total:>9.1f}  ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
