"""Hardware calibrator: detection on this machine, the measured batch sweep on a tiny
model, the work-split math on hand-made inputs, the accelerate config, the CLI."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from realign import hardware_calibrator as hc
from realign.cli import app
from realign.errors import InputError
from realign.hardware_calibrator import (
    CurvePoint, HardwareMetrics, analyze_distribution, calculate_workload_distribution,
    per_node_batches, recommend_accumulation, recommend_batch,
)

DATA = Path(__file__).parent / "calibration_data"
runner = CliRunner()


# ------------------------------------------------------------------ detection
def test_detect_hardware_matches_this_machine() -> None:
    hw = hc.detect_hardware()
    assert hw.cpu.logical_cores == os.cpu_count()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if m:
            assert hw.cpu.model == m.group(1).strip()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = int(re.search(r"^MemTotal:\s*(\d+)", meminfo.read_text(), re.M).group(1))
        assert hw.cpu.memory_gb == pytest.approx(kb / 2**20, abs=0.01)
    torch = pytest.importorskip("torch")
    assert len(hw.cuda) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert hw.accelerator == ("cuda" if hw.cuda else "mps" if hw.apple and hw.apple.mps_available
                              else hw.accelerator)
    if not hw.cuda and not (hw.apple and hw.apple.mps_available):
        assert hw.accelerator == "cpu"
    # the fingerprint is stable and ignores the host name
    assert hw.fingerprint() == hc.detect_hardware().fingerprint()
    assert hw.model_copy(update={"hostname": "elsewhere"}).fingerprint() == hw.fingerprint()
    other = hw.model_copy(update={"cpu": hw.cpu.model_copy(update={"logical_cores": 999})})
    assert other.fingerprint() != hw.fingerprint()


def test_cli_json_prints_one_object() -> None:
    r = runner.invoke(app, ["calibrate", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["hardware"]["cpu"]["logical_cores"] == os.cpu_count()
    assert obj["fingerprint"] == hc.detect_hardware().fingerprint()
    assert "calibration" not in obj


# ------------------------------------------------------------------ curve arithmetic
def _pt(b: int, eps: float | None, status: str = "ok") -> CurvePoint:
    return CurvePoint(batch_size=b, status=status, examples_per_s=eps)  # type: ignore[arg-type]


def test_recommend_batch_smallest_near_peak() -> None:
    pts = [_pt(1, 10), _pt(2, 19), _pt(4, 30), _pt(8, 31), _pt(16, 30.5), _pt(32, None, "oom")]
    peak, rec = recommend_batch(pts)
    assert peak is not None and peak.batch_size == 8
    assert rec == 4  # 30 >= 0.95 * 31
    assert recommend_batch([_pt(1, None, "oom")]) == (None, None)


def test_recommend_accumulation() -> None:
    r = recommend_accumulation(16, 64, 1)
    assert (r.per_device_batch, r.gradient_accumulation_steps, r.effective_batch) == (16, 4, 64)
    r = recommend_accumulation(16, 64, 2)
    assert (r.per_device_batch, r.gradient_accumulation_steps, r.effective_batch) == (16, 2, 64)
    r = recommend_accumulation(24, 64, 1)  # 24 does not divide 64: the largest divisor ≥ 12
    assert (r.per_device_batch, r.gradient_accumulation_steps) == (16, 4)
    r = recommend_accumulation(256, 32, 1)  # never more than the target
    assert (r.per_device_batch, r.gradient_accumulation_steps) == (32, 1)
    r = recommend_accumulation(8, 97, 1)  # prime target: no divisor ≥ 4, effective batch reported
    assert r.per_device_batch == 8 and r.gradient_accumulation_steps == 13
    assert r.effective_batch == 104 and "104" in r.note
    with pytest.raises(InputError):
        recommend_accumulation(0, 32, 1)


def test_is_oom() -> None:
    assert hc.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert hc.is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert hc.is_oom(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"))
    assert hc.is_oom(MemoryError())
    assert not hc.is_oom(RuntimeError("shape mismatch"))
    assert not hc.is_oom(ValueError("out of memory"))  # not an allocator error type
    torch = pytest.importorskip("torch")
    assert hc.is_oom(torch.cuda.OutOfMemoryError("x"))


# ------------------------------------------------------------------ work distribution
def _m(node: str, t: float, model: str = "m") -> HardwareMetrics:
    return HardwareMetrics(node_id=node, model_name=model, throughput=t, memory_gb=64,
                           latency_ms=100)


def test_shares_proportional_to_throughput() -> None:
    shares = calculate_workload_distribution([_m("a", 30), _m("b", 10)])
    assert shares == pytest.approx({"a": 0.75, "b": 0.25})
    three = calculate_workload_distribution([_m("a", 1), _m("b", 2), _m("c", 5)])
    assert math.fsum(three.values()) == pytest.approx(1.0)
    assert three["c"] == pytest.approx(5 / 8)
    # every node finishes its share at the same time: share / throughput is constant
    t = {"a": 1, "b": 2, "c": 5}
    assert len({round(three[k] / t[k], 12) for k in t}) == 1


def test_distribution_errors_are_clear() -> None:
    with pytest.raises(InputError, match="no nodes"):
        calculate_workload_distribution([])
    with pytest.raises(InputError, match="'b' has throughput 0") as e:
        calculate_workload_distribution([_m("a", 3), _m("b", 0)])
    assert e.value.field == "throughput"
    with pytest.raises(InputError, match="throughput -1"):
        calculate_workload_distribution([_m("a", 3), _m("b", -1)])
    with pytest.raises(InputError, match="nan"):
        calculate_workload_distribution([_m("a", 3), _m("b", float("nan"))])
    with pytest.raises(InputError, match="appears twice"):
        calculate_workload_distribution([_m("a", 3), _m("a", 4)])
    with pytest.raises(InputError, match="different models"):
        calculate_workload_distribution([_m("a", 3, "x"), _m("b", 4, "y")])


def test_equal_split_idle_and_heterogeneity() -> None:
    rep = analyze_distribution([_m("fast", 30), _m("slow", 10)], global_batch=32)
    # equal split: the fast node finishes in (W/2)/30, the slow in (W/2)/10 → idle 1 − 10/30
    assert rep.equal_split_idle["fast"] == pytest.approx(2 / 3)
    assert rep.equal_split_idle["slow"] == 0
    assert rep.ratio == pytest.approx(3.0) and rep.heterogeneous
    assert rep.equal_split_throughput == pytest.approx(20)  # 2 × the slowest
    assert rep.proportional_throughput == pytest.approx(40)
    assert rep.per_node_batch == {"fast": 24, "slow": 8}
    text = " ".join(rep.warnings)
    assert "heterogeneous" in text and "idle 67%" in text and "'fast'" in text
    # a nearly even pair: not heterogeneous, and below the idle warning
    even = analyze_distribution([_m("a", 10.2), _m("b", 10)])
    assert not even.heterogeneous and even.warnings == []
    # just above the ratio threshold
    assert analyze_distribution([_m("a", 10 * hc.HETEROGENEOUS_RATIO * 1.01), _m("b", 10)]).heterogeneous
    # an equal split slower than the fast node alone is said so
    lop = analyze_distribution([_m("gpu", 100), _m("cpu", 1)])
    assert any("slower than 'gpu' alone" in w for w in lop.warnings)


def test_per_node_batches_sum_to_global() -> None:
    assert per_node_batches({"a": 0.655, "b": 0.345}, 32) == {"a": 21, "b": 11}
    b = per_node_batches({"a": 0.98, "b": 0.01, "c": 0.01}, 10)
    assert sum(b.values()) == 10 and min(b.values()) >= 1
    with pytest.raises(InputError):
        per_node_batches({"a": 0.5, "b": 0.5}, 1)


def test_distribute_files_from_real_calibrations(tmp_path: Path) -> None:
    """Two nodes' calibration files (one measured on an H200, one made slower by hand)."""
    h200 = json.loads((DATA / "h200-smollm2-s256.json").read_text())
    slow = json.loads(json.dumps(h200))
    slow["node_id"] = "slow"
    for p in slow["points"]:
        if p["examples_per_s"]:
            p["examples_per_s"] /= 4
    (tmp_path / "a.json").write_text(json.dumps(h200))
    (tmp_path / "b.json").write_text(json.dumps(slow))
    rep = hc.distribute_files([tmp_path / "a.json", tmp_path / "b.json"], global_batch=40)
    assert rep.shares == pytest.approx({"h200": 0.8, "slow": 0.2})
    assert rep.per_node_batch == {"h200": 32, "slow": 8}
    rec = next(p for p in h200["points"] if p["batch_size"] == h200["recommended_batch_size"])
    assert rep.throughput["h200"] == pytest.approx(rec["examples_per_s"])
    # CLI: table and JSON
    r = runner.invoke(app, ["calibrate", "--distribute", str(tmp_path / "a.json"),
                            str(tmp_path / "b.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["shares"] == pytest.approx({"h200": 0.8, "slow": 0.2})
    r = runner.invoke(app, ["calibrate", "--distribute", str(tmp_path / "a.json"),
                            str(tmp_path / "b.json")])
    assert r.exit_code == 0 and "80.0%" in r.stdout and "idle" in r.stdout


def test_distribute_cli_errors(tmp_path: Path) -> None:
    r = runner.invoke(app, ["calibrate", "--distribute"])
    assert r.exit_code == 2 and "no calibration files" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = runner.invoke(app, ["calibrate", "--distribute", str(bad)])
    assert r.exit_code == 2 and "bad.json" in r.output and "Traceback" not in r.output
    d = json.loads((DATA / "h200-smollm2-s256.json").read_text())
    del d["points"]
    (tmp_path / "nopoints.json").write_text(json.dumps(d))
    r = runner.invoke(app, ["calibrate", "--distribute", str(tmp_path / "nopoints.json")])
    assert r.exit_code == 2 and "points" in r.output
    # a node whose every batch size ran out of memory has throughput 0
    d = json.loads((DATA / "h200-smollm2-s256.json").read_text())
    d["points"] = [{"batch_size": 1, "status": "oom", "detail": "CUDA out of memory"}]
    d["recommended_batch_size"] = None
    d["peak"] = None
    (tmp_path / "oom.json").write_text(json.dumps(d))
    r = runner.invoke(app, ["calibrate", "--distribute", str(tmp_path / "oom.json")])
    assert r.exit_code == 2 and "throughput 0" in r.output
    r = runner.invoke(app, ["calibrate", str(tmp_path / "oom.json")])
    assert r.exit_code == 2 and "--distribute" in r.output


# ------------------------------------------------------------------ launch config
def _gpu_hw(n: int, mem: float) -> hc.HardwareInfo:
    cpu = hc.CPUInfo(model="x", logical_cores=16, memory_gb=128)
    return hc.HardwareInfo(hostname="n", platform="linux", python="3.11", cpu=cpu,
                           cuda=[hc.CUDADevice(index=i, name="GPU", memory_gb=mem,
                                               compute_capability="9.0") for i in range(n)],
                           accelerator="cuda")


def _load_accelerate(path: Path) -> object:
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


def test_launch_plan_ddp_when_calibration_fits(tmp_path: Path) -> None:
    cal = hc.load_calibration(DATA / "h200-smollm2-s256.json")
    plan = hc.plan_launch(hw=_gpu_hw(4, 139.8), calibration=cal)
    assert plan.strategy == "ddp" and plan.config["distributed_type"] == "MULTI_GPU"
    assert plan.num_processes == 4
    path = hc.write_accelerate_config(tmp_path / "acc.yaml", plan)
    cfg = _load_accelerate(path)
    assert str(cfg.distributed_type).endswith("MULTI_GPU") and cfg.num_processes == 4
    # one GPU, one process: nothing to distribute
    assert hc.plan_launch(hw=_gpu_hw(1, 139.8), calibration=cal).strategy == "no"


def test_launch_plan_shards_when_the_model_does_not_fit(tmp_path: Path) -> None:
    # 8B params in bf16: 5 × 2 × 8e9 B ≈ 74.5 GiB > 0.8 × 80 GiB → shard
    assert hc.training_memory_gb(8_000_000_000, 2) == pytest.approx(5 * 2 * 8e9 / 2**30)
    plan = hc.plan_launch(hw=_gpu_hw(8, 80), n_params=8_000_000_000, bytes_per_param=2,
                          layer_class="LlamaDecoderLayer")
    assert plan.strategy == "fsdp" and plan.config["distributed_type"] == "FSDP"
    assert plan.config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    cfg = _load_accelerate(hc.write_accelerate_config(tmp_path / "fsdp.yaml", plan))
    assert str(cfg.distributed_type).endswith("FSDP")
    ds = hc.plan_launch(hw=_gpu_hw(8, 80), n_params=8_000_000_000, bytes_per_param=2,
                        sharding="deepspeed", gradient_accumulation_steps=4)
    assert ds.config["deepspeed_config"]["zero_stage"] == 3
    assert ds.config["deepspeed_config"]["gradient_accumulation_steps"] == 4
    # the same model fits a 141 GiB card: 74.5 ≤ 0.8 × 141
    assert hc.plan_launch(hw=_gpu_hw(8, 141), n_params=8_000_000_000,
                          bytes_per_param=2).strategy == "ddp"
    # a calibration that ran out of memory at batch 1 means: shard
    oom = hc.load_calibration(DATA / "h200-smollm2-s256.json").model_copy(update={
        "points": [CurvePoint(batch_size=1, status="oom", detail="x")],
        "recommended_batch_size": None, "peak": None})
    assert hc.plan_launch(hw=_gpu_hw(2, 139.8), calibration=oom).strategy == "fsdp"


def test_launch_plan_multi_node(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="main-process-ip"):
        hc.plan_launch(hw=_gpu_hw(8, 80), num_machines=2)
    plan = hc.plan_launch(hw=_gpu_hw(8, 80), n_params=1_000_000, bytes_per_param=2,
                          num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    assert plan.num_processes == 16 and plan.config["machine_rank"] == 1
    cfg = _load_accelerate(hc.write_accelerate_config(tmp_path / "mn.yaml", plan))
    assert cfg.num_machines == 2 and cfg.main_process_ip == "10.0.0.1"


def test_cli_writes_cpu_accelerate_config(tmp_path: Path) -> None:
    path = tmp_path / "cpu.yaml"
    r = runner.invoke(app, ["calibrate", "--write-accelerate-config", str(path),
                            "--num-processes", "2", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    hw = hc.detect_hardware()
    if not hw.cuda:
        # torchrun launcher + use_cpu (MULTI_CPU would need mpirun, else one process)
        assert obj["launch"]["config"]["distributed_type"] == "MULTI_GPU"
        cfg = _load_accelerate(path)
        assert cfg.use_cpu and cfg.num_processes == 2


# ------------------------------------------------------------------ the measured sweep
@pytest.mark.integration
def test_sweep_on_tiny_model(tiny_model_path: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (quick) sweep: the curve, the peak, the recommendation, the cache."""
    pytest.importorskip("trl")
    monkeypatch.setenv("REALIGN_HOME", str(tmp_path / "home"))
    msgs: list[str] = []
    res = hc.calibrate(str(tiny_model_path), seq_len=16, device="cpu", quick=True,
                       max_batch=2, target_effective_batch=8, progress=msgs.append)
    assert [p.batch_size for p in res.points] == [1, 2][: len(res.points)]
    assert res.points[0].status == "ok"
    for p in res.points:
        assert p.status == "ok" and p.examples_per_s and p.examples_per_s > 0
        assert len(p.step_ms_all) == res.measure_steps == 2
        # examples/s is batch × measured steps ÷ their summed time
        assert p.examples_per_s == pytest.approx(
            p.batch_size * 2 / (sum(p.step_ms_all) / 1000), rel=1e-9)
        assert p.memory_gb and p.memory_gb > 0
    assert res.peak is not None
    assert res.peak.examples_per_s == max(p.examples_per_s or 0 for p in res.points)
    assert res.recommended_batch_size in {p.batch_size for p in res.points}
    rec = res.recommendation
    assert rec is not None and rec.effective_batch == 8
    assert rec.per_device_batch * rec.gradient_accumulation_steps == 8
    assert res.stop_reason
    from transformers import AutoModelForCausalLM

    assert res.model_params == AutoModelForCausalLM.from_pretrained(
        str(tiny_model_path)).num_parameters()
    assert any("batch size 1" in m for m in msgs)
    # cached per (hardware, model, seq_len, device): the second call measures nothing
    files = list((tmp_path / "home" / "calibration").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith(res.fingerprint)
    again = hc.calibrate(str(tiny_model_path), seq_len=16, device="cpu", quick=True,
                         max_batch=2, target_effective_batch=8)
    assert again.cached and again.points == res.points
    # the CLI reads the same cache: --json holds the calibration
    r = runner.invoke(app, ["calibrate", "--model", str(tiny_model_path), "--seq-len", "16",
                            "--device", "cpu", "--quick", "--max-batch", "2", "--json",
                            "--target-batch", "8"], env={"REALIGN_HOME": str(tmp_path / "home")})
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["calibration"]["cached"] is True
    assert obj["calibration"]["points"][0]["examples_per_s"] == res.points[0].examples_per_s
    # an unknown path is bad input (exit 2), not a traceback
    r = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "missing"), "--quick"])
    assert r.exit_code == 2 and "does not exist" in r.output


@pytest.mark.integration
def test_oom_is_caught_and_stops_the_sweep(tiny_model_path: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An allocator failure at batch 2 ends the sweep cleanly with an 'oom' point."""
    pytest.importorskip("trl")
    monkeypatch.setenv("REALIGN_HOME", str(tmp_path / "home"))
    real = hc._run_batch

    def fake(policy, tok, device, b, *a, **k):  # type: ignore[no-untyped-def]
        if b >= 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(policy, tok, device, b, *a, **k)

    monkeypatch.setattr(hc, "_run_batch", fake)
    res = hc.calibrate(str(tiny_model_path), seq_len=16, device="cpu", quick=True, max_batch=8)
    assert [(p.batch_size, p.status) for p in res.points] == [(1, "ok"), (2, "oom")]
    assert "out of memory at batch size 2" in res.stop_reason
    assert res.recommended_batch_size == 1 and "20.00 GiB" in res.points[1].detail


def test_h200_measured_curve_is_consistent() -> None:
    """The stored H200 calibrations (benchmarks/bench_calibrate.py on a lent GPU) parse,
    and their peak/recommendation follow the documented rules."""
    for f in sorted(DATA.glob("*.json")):
        cal = hc.load_calibration(f)
        peak, rec = recommend_batch(cal.points)
        assert cal.peak == peak and cal.recommended_batch_size == rec
    oom = hc.load_calibration(DATA / "h200-smollm2-s6144-oom.json")
    assert oom.points[-1].status == "oom" and "out of memory" in oom.stop_reason
