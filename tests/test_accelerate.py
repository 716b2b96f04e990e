"""Stage 5 under a real two-process ``accelerate launch`` on CPUs (gloo DDP), driven
through ``realign stage dpo --run RUN`` with the accelerate config that
``realign calibrate --write-accelerate-config`` writes.

Checks: it finishes; rank 0 alone writes (one verdict, each KL check logged once); the
training losses equal those of a single process with the same global batch (2 ranks ×
2 pairs vs 1 process × 4 pairs: DDP averages the two ranks' gradients of their batch
means, which is the gradient of the 4-pair mean).

Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's
MULTI_CPU launch goes through mpirun); the written config uses the torchrun launcher
with ``use_cpu: true`` instead, and this test asserts that two ranks really ran.

Measured (2-core shared CPU, tiny model, 4 steps): the losses of every step agree within
3e-5 and the gradient norms within 1.5e-3 (relative). An earlier 2-3% drift from step 2 on
came from :func:`realign.distributed.barrier` being a no-op on CPU launches after its first
call (rank 1 raced past rank 0's writes); ``test_barrier_waits_for_rank_zero...`` pins it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("trl")

from realign.config import RunConfig  # noqa: E402
from realign.pipeline import create_run, run_stages  # noqa: E402

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
LOSS_REL = 1e-3       # measured: ≤ 3e-5 at every step
GRAD_NORM_REL = 5e-3  # measured: ≤ 1.5e-3 (float reduction order across two ranks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               REALIGN_HOME=str(home), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Path:
    tmp = tmp_path_factory.mktemp("acc")
    data = tmp / "pairs.jsonl"
    data.write_text("\n".join((ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:200]) + "\n")
    cfg = RunConfig(model=str(tiny_model_path), data=str(data), output_dir=str(tmp / "runs"),
                    run_id="base", thresholds={"min_pairs": 50},
                    dpo={"max_steps": STEPS, "batch_size": 4, "learning_rate": 1e-3,
                         "max_length": 64, "save_every": 100},
                    kl_monitor={"every": 2, "probe_size": 4, "batch_size": 4})
    run_dir = create_run(cfg)
    st = run_stages(run_dir, stages=["preference_data", "reference_init"])
    assert st.state in ("passed", "incomplete"), st  # incomplete: no eval sets, no scores
    return run_dir


def _clone(src: Path, dst: Path, batch_size: int) -> Path:
    shutil.copytree(src, dst)
    run = json.loads((dst / "run.json").read_text())
    run["config"]["dpo"]["batch_size"] = batch_size
    (dst / "run.json").write_text(json.dumps(run))
    return dst


def _logged(run_dir: Path, key: str) -> list[float]:
    recs = [json.loads(x) for x in (run_dir / "stages" / "5-dpo" / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in recs if r.get("event") == "train_log" and key in r]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run_dir / "stages" / "5-dpo" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r.get("event") == "train_log" and "loss" in r]


def test_two_process_dpo_matches_single_process(prepared: Path, tmp_path: Path) -> None:
    if not shutil.which("accelerate"):
        pytest.skip("the accelerate command is not installed")
    realign = shutil.which("realign") or str(Path(sys.executable).with_name("realign"))
    home = tmp_path / "home"
    env = _env(home)

    single = _clone(prepared, tmp_path / "single", batch_size=4)
    r1 = subprocess.run([realign, "stage", "dpo", "--run", str(single), "--json"], env=env,
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode in (0, 1), r1.stderr[-3000:]

    cfg = tmp_path / "accelerate.yaml"
    r = subprocess.run([realign, "calibrate", "--write-accelerate-config", str(cfg),
                        "--num-processes", "2", "--json"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if json.loads(r.stdout)["hardware"]["cuda"]:
        pytest.skip("GPUs here: the config would be a GPU one; this test is the CPU/gloo run")

    ddp = _clone(prepared, tmp_path / "ddp", batch_size=2)  # 2 ranks × 2 = 4 per step
    (home / "cache").mkdir(parents=True, exist_ok=True)
    r2 = subprocess.run(["accelerate", "launch", "--config_file", str(cfg),
                         "--main_process_port", str(_free_port()),
                         realign, "stage", "dpo", "--run", str(ddp), "--json"],
                        env=env, capture_output=True, text=True, timeout=900)
    assert r2.returncode in (0, 1), (r2.stdout[-2000:], r2.stderr[-5000:])

    stage = ddp / "stages" / "5-dpo"
    verdicts = sorted(p.name for p in stage.rglob("*verdict*.json"))
    assert verdicts == ["verdict.json"], (verdicts, r2.stdout[-1500:], r2.stderr[-4000:])
    v = json.loads((stage / "verdict.json").read_text())
    v1 = json.loads((single / "stages" / "5-dpo" / "verdict.json").read_text())
    assert v["findings"]["global_step"] == v1["findings"]["global_step"] == STEPS
    # two ranks really trained (world size 2 recorded by the stage or visible in the log)
    assert v["findings"].get("world_size", 2) == 2
    # rank 0 alone logs: each KL check appears once
    recs = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r.get("event") == "kl_check"]
    assert steps and len(steps) == len(set(steps)), steps
    # same global batch → the first step is the same computation: same loss and the same
    # (rank-averaged) gradient norm
    l1, l2 = _losses(single), _losses(ddp)
    assert [s for s, _ in l1] == [s for s, _ in l2] and len(l1) == STEPS, (l1, l2)
    g1, g2 = _logged(single, "grad_norm"), _logged(ddp, "grad_norm")
    assert l2[0][1] == pytest.approx(l1[0][1], rel=1e-4)
    assert g2[0] == pytest.approx(g1[0], rel=1e-4)
    # every step agrees: same data order, same averaged gradients
    assert [x for _, x in l2] == pytest.approx([x for _, x in l1], rel=LOSS_REL)
    assert g2 == pytest.approx(g1, rel=GRAD_NORM_REL)


_BARRIER_SCRIPT = """
import os, sys, time
from pathlib import Path
from realign.distributed import barrier
flag, arrived = Path(sys.argv[1]), Path(sys.argv[2])
barrier()  # the first call joins the process group, itself a rendezvous; the test is the next
if os.environ["RANK"] == "0":
    while not arrived.exists():  # rank 1 is at the barrier (or about to call it)
        time.sleep(0.05)
    time.sleep(2)
    flag.write_text("written by rank 0")
else:
    arrived.write_text("rank 1 is here")
barrier()
print(f"rank {os.environ['RANK']} saw the flag: {flag.exists()}", flush=True)
"""


def test_barrier_waits_for_rank_zero_under_accelerate_launch(tmp_path: Path) -> None:
    """Rank 1 must not pass :func:`realign.distributed.barrier` before rank 0 reaches it.
    A bare ``PartialState()`` on a CPU launch joined the group once (a rendezvous) and
    then came up as ``DistributedType.NO``, so every later barrier returned at once and
    rank 1 read a dataset rank 0 had not written yet."""
    if not shutil.which("accelerate"):
        pytest.skip("the accelerate command is not installed")
    realign = shutil.which("realign") or str(Path(sys.executable).with_name("realign"))
    env = _env(tmp_path / "home")
    cfg = tmp_path / "accelerate.yaml"
    r = subprocess.run([realign, "calibrate", "--write-accelerate-config", str(cfg),
                        "--num-processes", "2", "--json"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    script = tmp_path / "barrier.py"
    script.write_text(_BARRIER_SCRIPT)
    flag = tmp_path / "flag"
    r2 = subprocess.run(["accelerate", "launch", "--config_file", str(cfg),
                         "--main_process_port", str(_free_port()), str(script), str(flag),
                         str(tmp_path / "arrived")],
                        env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "rank 0 saw the flag: True" in r2.stdout, r2.stdout
    assert "rank 1 saw the flag: True" in r2.stdout, r2.stdout
