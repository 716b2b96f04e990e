"""Hardware detection, measured DPO batch-size calibration, work split, launcher config.

Nothing here is a table of machines: every number that decides a batch size or a work
split is measured on the machine that will train.

* :func:`detect_hardware` — CUDA GPUs, Apple Silicon (chip, unified memory, MPS, MLX),
  CPU (model, cores, memory) as a :class:`HardwareInfo`.
* :func:`calibrate` — sweeps the DPO training batch size 1, 2, 4, ... with the real
  backend and the stage's own trainer, measuring examples/s (an example is one
  preference pair: a chosen and a rejected sequence) until out of memory or until the
  throughput stops rising; returns the curve, the peak and a recommended batch size and
  gradient accumulation for a target effective batch. Cached per (hardware, model,
  sequence length, device) under ``$REALIGN_HOME/calibration/``.
* :func:`calculate_workload_distribution` — shares of the work ∝ measured throughput.
* :func:`accelerate_config` — an ``accelerate launch`` config (DDP, or FSDP / DeepSpeed
  ZeRO-3 when the model does not fit one device).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from .errors import InputError
from .fileio import write_text_atomic
from .provenance import package_versions

# ----------------------------------------------------------------------------- settings
#: A batch size counts as "still rising" when its throughput beats the best so far by
#: more than this fraction; otherwise the sweep stops (after ``patience`` such sizes).
MIN_GAIN = 0.05
#: The recommended batch size is the smallest one within this fraction of the peak
#: throughput: the same speed with less memory (and more optimizer steps per epoch).
NEAR_PEAK = 0.05
#: A cluster is heterogeneous when its fastest node is more than this many times faster
#: than its slowest (measured examples/s). At 1.25 an equal split leaves the fastest node
#: idle 1 − 1/1.25 = 20% of the wall time.
HETEROGENEOUS_RATIO = 1.25
#: Warn about an equal (50/50) split when it would leave a node idle more than this
#: fraction of the wall time.
IDLE_WARN_FRACTION = 0.05
#: Fraction of a device's memory the training state may take before the model is judged
#: not to fit (the rest is activations, allocator fragmentation, CUDA context).
FIT_FRACTION = 0.8
#: Sweep settings: (warm-up steps, measured steps, time budget in s, largest batch).
QUICK = (1, 2, 120.0, 64)
FULL = (2, 5, 900.0, 512)

SCHEMA = "realign.calibration/1"


# ----------------------------------------------------------------------------- detection
class CPUInfo(BaseModel):
    model: str
    physical_cores: int | None = None
    logical_cores: int
    memory_gb: float | None = Field(None, description="total RAM, GiB")
    available_memory_gb: float | None = None


class CUDADevice(BaseModel):
    index: int
    name: str
    memory_gb: float
    compute_capability: str


class AppleSilicon(BaseModel):
    chip: str
    unified_memory_gb: float | None
    mps_available: bool
    mlx_available: bool


class HardwareInfo(BaseModel):
    """What this machine has. ``accelerator`` is what training would use by default."""

    hostname: str
    platform: str
    python: str
    torch: str | None = None
    torch_threads: int | None = None
    cpu: CPUInfo
    cuda: list[CUDADevice] = Field(default_factory=list)
    apple: AppleSilicon | None = None
    accelerator: Literal["cuda", "mps", "cpu"] = "cpu"
    notes: list[str] = Field(default_factory=list)

    @property
    def gpu_count(self) -> int:
        return len(self.cuda)

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of what decides throughput: CPU model, cores, RAM, GPUs,
        Apple chip, torch version and thread count. The hostname is left out, so identical
        machines share calibrations."""
        key = {
            "cpu": [self.cpu.model, self.cpu.logical_cores, round(self.cpu.memory_gb or 0)],
            "cuda": [[d.name, round(d.memory_gb), d.compute_capability] for d in self.cuda],
            "apple": self.apple.chip if self.apple else None,
            "torch": self.torch, "threads": self.torch_threads,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _sysctl(name: str) -> str | None:
    try:
        r = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def _cpu_info() -> CPUInfo:
    """CPU model from /proc/cpuinfo (Linux), ``sysctl`` (macOS) or ``platform``; cores from
    ``os.cpu_count`` (logical) and /proc/cpuinfo (physical: distinct (physical id, core id));
    memory from /proc/meminfo, ``sysctl hw.memsize`` or ``os.sysconf``."""
    model = None
    physical = None
    text = _read("/proc/cpuinfo")
    if text:
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else None
        cores = set()
        for block in text.split("\n\n"):
            pid = re.search(r"^physical id\s*:\s*(\d+)", block, re.M)
            cid = re.search(r"^core id\s*:\s*(\d+)", block, re.M)
            if cid:
                cores.add((pid.group(1) if pid else "0", cid.group(1)))
        physical = len(cores) or None
    if sys.platform == "darwin":
        model = model or _sysctl("machdep.cpu.brand_string")
        p = _sysctl("hw.physicalcpu")
        physical = int(p) if p and p.isdigit() else physical
    model = model or platform.processor() or platform.machine() or "unknown"
    total = avail = None
    mem = _read("/proc/meminfo")
    if mem:
        t = re.search(r"^MemTotal:\s*(\d+) kB", mem, re.M)
        a = re.search(r"^MemAvailable:\s*(\d+) kB", mem, re.M)
        total = int(t.group(1)) / 2**20 if t else None
        avail = int(a.group(1)) / 2**20 if a else None
    if total is None and sys.platform == "darwin":
        b = _sysctl("hw.memsize")
        total = int(b) / 2**30 if b and b.isdigit() else None
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError, AttributeError):
            total = None
    return CPUInfo(model=model, physical_cores=physical, logical_cores=os.cpu_count() or 1,
                   memory_gb=round(total, 2) if total else None,
                   available_memory_gb=round(avail, 2) if avail else None)


def detect_hardware() -> HardwareInfo:
    """Detect CPU, CUDA GPUs and Apple Silicon. Works without torch (then no GPU is seen,
    and a note says why)."""
    notes: list[str] = []
    cpu = _cpu_info()
    cuda: list[CUDADevice] = []
    torch_version = threads = None
    mps = False
    try:
        import torch

        torch_version = torch.__version__
        threads = torch.get_num_threads()
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                cuda.append(CUDADevice(index=i, name=p.name,
                                       memory_gb=round(p.total_memory / 2**30, 2),
                                       compute_capability=f"{p.major}.{p.minor}"))
        backend = getattr(torch.backends, "mps", None)
        mps = bool(backend and backend.is_available())
    except ImportError:
        notes.append("torch is not installed: GPUs cannot be detected "
                     "(pip install 'realign[train]')")
    apple = None
    if sys.platform == "darwin" and platform.machine() == "arm64":
        apple = AppleSilicon(chip=_sysctl("machdep.cpu.brand_string") or "Apple Silicon",
                             unified_memory_gb=cpu.memory_gb, mps_available=mps,
                             mlx_available=find_spec("mlx") is not None)
    accel: Literal["cuda", "mps", "cpu"] = "cuda" if cuda else ("mps" if mps else "cpu")
    return HardwareInfo(hostname=socket.gethostname(), platform=platform.platform(),
                        python=platform.python_version(), torch=torch_version,
                        torch_threads=threads, cpu=cpu, cuda=cuda, apple=apple,
                        accelerator=accel, notes=notes)


# ----------------------------------------------------------------------------- calibration
class CurvePoint(BaseModel):
    """One batch size of the sweep."""

    batch_size: int
    status: Literal["ok", "oom", "error"]
    examples_per_s: float | None = None
    step_ms: float | None = Field(None, description="median optimizer-step time")
    step_ms_all: list[float] = Field(default_factory=list, description="measured steps")
    memory_gb: float | None = None
    memory_source: str | None = None
    detail: str = ""


class Recommendation(BaseModel):
    """Per-device batch × gradient accumulation × processes for a target effective batch."""

    target_effective_batch: int
    world_size: int
    per_device_batch: int
    gradient_accumulation_steps: int
    effective_batch: int
    note: str = ""


class CalibrationResult(BaseModel):
    """A measured DPO throughput curve on one device of one node."""

    schema_: str = Field(SCHEMA, alias="schema")
    node_id: str
    hardware: HardwareInfo
    fingerprint: str
    model: str
    model_source: str
    model_params: int
    dtype: str
    device: str
    seq_len: int
    quick: bool
    warmup_steps: int
    measure_steps: int
    method: str
    points: list[CurvePoint]
    stop_reason: str
    peak: CurvePoint | None = None
    recommended_batch_size: int | None = None
    recommendation: Recommendation | None = None
    seconds: float
    load_average: list[float] | None = Field(None, description="1/5/15-min load at the start")
    created: str
    versions: dict[str, str] = Field(default_factory=dict)
    cached: bool = False

    model_config = {"populate_by_name": True}

    @property
    def throughput(self) -> float | None:
        """examples/s at the recommended batch size (what the node would run)."""
        p = next((p for p in self.points if p.batch_size == self.recommended_batch_size
                  and p.status == "ok"), None)
        return p.examples_per_s if p else None


def recommend_batch(points: Sequence[CurvePoint]) -> tuple[CurvePoint | None, int | None]:
    """(peak point, recommended batch size).

    peak = the ok point with the largest examples/s; recommended = the smallest ok batch
    size whose throughput ≥ (1 − NEAR_PEAK) × peak throughput.
    """
    ok = [p for p in points if p.status == "ok" and p.examples_per_s]
    if not ok:
        return None, None
    peak = max(ok, key=lambda p: p.examples_per_s or 0.0)
    assert peak.examples_per_s is not None
    near = [p.batch_size for p in ok if (p.examples_per_s or 0) >= (1 - NEAR_PEAK) * peak.examples_per_s]
    return peak, min(near)


def recommend_accumulation(batch_size: int, target_effective_batch: int,
                           world_size: int = 1) -> Recommendation:
    """Per-device batch b and gradient accumulation g with b·g·world ≈ the target E.

    b starts at the recommended batch size (capped at ⌈E / world⌉). When E/world is an
    integer, b is lowered to its largest divisor ≥ b/2, so that b·g·world = E exactly;
    otherwise g = ⌈E / (b·world)⌉ and the effective batch b·g·world is reported (≥ E).
    """
    if batch_size < 1 or target_effective_batch < 1 or world_size < 1:
        raise InputError("batch size, target effective batch and world size must be ≥ 1")
    per_rank = target_effective_batch / world_size
    b = max(1, min(batch_size, math.ceil(per_rank)))
    note = ""
    if per_rank.is_integer():
        for cand in range(b, max(1, b // 2) - 1, -1):
            if int(per_rank) % cand == 0:
                b = cand
                break
    g = math.ceil(target_effective_batch / (b * world_size))
    eff = b * g * world_size
    if eff != target_effective_batch:
        note = (f"{target_effective_batch} is not a multiple of {b}×{world_size}: the effective "
                f"batch is {eff}")
    return Recommendation(target_effective_batch=target_effective_batch, world_size=world_size,
                          per_device_batch=b, gradient_accumulation_steps=g,
                          effective_batch=eff, note=note)


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of CUDA, MPS or the CPU allocator."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in text
        or "can't allocate memory" in text or "failed to allocate" in text
        or "insufficient memory" in text or "[metal::malloc]" in text)  # the last two: MLX


def _free_memory(device: Any) -> None:
    import gc

    gc.collect()
    if device.type == "mlx":
        import mlx.core as mx

        mx.clear_cache()
        return
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def _word_tokens(tokenizer: Any, n: int = 256) -> list[int]:
    """Token ids that are one whole space-prefixed alphabetic word and round-trip alone,
    so that a text of k of them tokenizes to k tokens."""
    out = []
    special = set(tokenizer.all_special_ids)
    for tid in range(min(len(tokenizer), 50_000)):
        if tid in special:
            continue
        s = tokenizer.decode([tid])
        if len(s) > 2 and s[0] == " " and s[1:].isalpha() and s[1:].isascii():
            if tokenizer(s, add_special_tokens=False)["input_ids"] == [tid]:
                out.append(tid)
                if len(out) >= n:
                    break
    if len(out) < 8:
        raise InputError("cannot build synthetic text for this tokenizer (too few word tokens)",
                         field="model")
    return out


def synthetic_pairs(tokenizer: Any, seq_len: int, n: int, seed: int = 0) -> list[dict[str, str]]:
    """n preference pairs in TRL's standard format whose prompt+chosen and prompt+rejected
    each reach ``seq_len`` tokens after truncation (prompt ≈ seq_len/2 tokens, each
    response a few tokens longer than the rest, cut by ``max_length = seq_len``), so every
    sequence of the sweep has exactly ``seq_len`` tokens and no padding."""
    import random

    words = [tokenizer.decode([t]) for t in _word_tokens(tokenizer)]
    rng = random.Random(seed)
    p_len = max(1, seq_len // 2)
    c_len = seq_len - p_len + 8

    def text(k: int) -> str:
        return "".join(rng.choice(words) for _ in range(k))

    return [{"prompt": text(p_len), "chosen": text(c_len), "rejected": text(c_len)}
            for _ in range(n)]


def _model_identity(source: str | Path) -> str:
    """The model's path plus a hash of its config.json (weights files by name and size)."""
    p = Path(source)
    h = hashlib.sha256(str(source).encode())
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.name == "config.json":
                h.update(f.read_bytes())
            elif f.suffix in (".safetensors", ".bin", ".gguf"):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def calibration_dir() -> Path:
    from .models import realign_home

    return realign_home() / "calibration"


def cache_path(hw: HardwareInfo, model: str, seq_len: int, device: str) -> Path:
    """``$REALIGN_HOME/calibration/<fingerprint>-<model id>-s<seq_len>-<device>.json``."""
    from .models import resolve_model

    mid = _model_identity(resolve_model(model))
    return calibration_dir() / f"{hw.fingerprint()}-{mid}-s{seq_len}-{device.replace(':', '')}.json"


#: Packages whose versions a calibration records (a change invalidates nothing; it is
#: shown beside the measurement).
CALIBRATION_PACKAGES = ("realign", "torch", "transformers", "trl", "accelerate")


METHOD = (
    "real DPO steps: the stage's own trainer class (realign.backends.trl_train."
    "make_dpo_trainer_class, i.e. trl.DPOTrainer) with the stage's dpo_config, full fine-tuning "
    "of a copy of the model beside the frozen reference (as stage 5 holds them), on synthetic "
    "pairs whose chosen and rejected sequences are seq_len tokens each. The reference "
    "log-probs are attached as constants instead of being precomputed (stage 5 precomputes "
    "and caches them before training, so its steps never run the reference either); the "
    "loss values are therefore meaningless, the compute per step is the stage's. "
    "examples/s = batch size × measured steps ÷ their summed wall time (after warm-up "
    "steps); one example = one preference pair."
)


def _run_batch(policy: Any, tokenizer: Any, device: Any, batch_size: int, seq_len: int,
               warmup: int, steps: int, workdir: Path, seed: int) -> CurvePoint:
    """Train ``warmup + steps`` optimizer steps at ``batch_size``; time the last ``steps``."""
    import torch
    from datasets import Dataset, concatenate_datasets
    from transformers import TrainerCallback

    from .backends.trl_train import dpo_config, make_dpo_trainer_class, mixed_precision_bf16

    base_cls = make_dpo_trainer_class()

    class _CalibrationTrainer(base_cls):  # type: ignore[misc, valid-type]
        """Constant reference log-probs in place of the precompute (see METHOD)."""

        def _precompute_ref_logps(self, dataset: Any, name: str, bs: int) -> Any:
            zeros = [0.0] * len(dataset)
            return concatenate_datasets(
                [dataset, Dataset.from_dict({"ref_chosen_logps": zeros,
                                             "ref_rejected_logps": zeros})], axis=1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    times: list[float] = []

    class _Timer(TrainerCallback):  # type: ignore[misc]
        t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            times.append(time.perf_counter() - self.t0)

    total = warmup + steps
    rows = synthetic_pairs(tokenizer, seq_len, batch_size * total, seed=seed)
    args = dpo_config(workdir / f"b{batch_size}", beta=0.1, loss_type="sigmoid",
                      learning_rate=1e-6, batch_size=batch_size, gradient_accumulation_steps=1,
                      max_steps=total, num_epochs=1, max_length=seq_len, seed=seed,
                      save_every=10**9, use_cpu=(device.type == "cpu") or None,
                      bf16=mixed_precision_bf16(policy),  # as stage 5 trains
                      extra={"save_strategy": "no", "logging_strategy": "steps"})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = _CalibrationTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[_Timer()])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
    finally:
        policy.zero_grad(set_to_none=True)
        del trainer
    measured = times[warmup:total]
    if len(measured) < steps:
        return CurvePoint(batch_size=batch_size, status="error",
                          detail=f"only {len(times)} of {total} steps ran")
    mem, src = _memory(device)
    return CurvePoint(batch_size=batch_size, status="ok",
                      examples_per_s=batch_size * len(measured) / sum(measured),
                      step_ms=sorted(measured)[len(measured) // 2] * 1000,
                      step_ms_all=[t * 1000 for t in measured], memory_gb=mem, memory_source=src)


def _memory(device: Any) -> tuple[float | None, str | None]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "torch.cuda.max_memory_allocated (peak)"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30, "torch.mps.driver_allocated_memory (after the run)"
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return kb * scale / 2**30, "process peak RSS (ru_maxrss, never decreases)"
    except ImportError:
        return None, None


def calibrate(model: str = "default", *, seq_len: int = 256, device: str | None = None,
              quick: bool = False, refresh: bool = False, max_batch: int | None = None,
              max_seconds: float | None = None, target_effective_batch: int = 32,
              world_size: int | None = None, node_id: str | None = None,
              patience: int | None = None, seed: int = 0,
              progress: Callable[[str], None] | None = None, backend: str = "trl") -> CalibrationResult:
    """Measure the DPO training throughput curve of ``model`` at ``seq_len`` tokens.

    Sweep b = 1, 2, 4, ... (see :data:`METHOD` for what one step is). Stops at the first
    out-of-memory error, when b exceeds ``max_batch``, when the next size is predicted
    (2 × the last size's step time × steps) to overrun the time budget, or when
    throughput has not risen by more than ``MIN_GAIN`` for ``patience`` + 1 consecutive
    sizes (patience: 0 in quick mode, 1 otherwise). Reuses the cached result for (this
    hardware, model, seq_len, device) unless ``refresh`` (a quick result does not stand
    in for a full one). ``backend="mlx"``: the same sweep with the MLX trainer
    (:mod:`realign.backends.mlx_dpo`), cached separately (device ``mlx-cpu``/``mlx-gpu``).
    """
    import tempfile

    mlx = backend == "mlx"
    if mlx:
        from .backends import mlx_dpo  # noqa: F401 - raises MissingDependencyError without mlx

        dev: Any = mlx_calibration_device(device)
        run_batch: Callable[..., CurvePoint] = mlx_calibration_point
    elif backend in ("trl", "torch", "pytorch"):
        from .backends.trl import TRLBackend, make_policy, pick_device
        from .backends.trl_train import quiet_hf

        dev, run_batch = pick_device(device), _run_batch
    else:
        raise InputError(f"unknown backend {backend!r}: expected trl or mlx", field="backend")

    if seq_len < 8:
        raise InputError(f"sequence length must be ≥ 8, got {seq_len}", field="seq_len")
    warmup, steps, budget, cap = QUICK if quick else FULL
    budget = max_seconds if max_seconds is not None else budget
    cap = max_batch if max_batch is not None else cap
    patience = (0 if quick else 1) if patience is None else patience
    say = progress or (lambda msg: None)
    hw = detect_hardware()
    path = cache_path(hw, model, seq_len, str(dev))
    if path.exists() and not refresh:
        try:
            cached = CalibrationResult.model_validate_json(path.read_text(encoding="utf-8"))
            if not (cached.quick and not quick):
                if world_size or target_effective_batch != (
                        cached.recommendation.target_effective_batch if cached.recommendation else None):
                    _finish(cached, target_effective_batch, world_size or _default_world(hw, dev))
                say(f"reusing the calibration in {path}")
                return cached.model_copy(update={"cached": True,
                                                 "node_id": node_id or cached.node_id})
        except (ValidationError, ValueError):
            pass  # unreadable: measure again
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    say(f"loading {model} on {dev}")
    if mlx:
        ref, policy, n_params, dtype = mlx_calibration_models(model, dev)
    else:
        quiet_hf()
        ref = TRLBackend().load(model, device=str(dev))
        for p in ref.model.parameters():
            p.requires_grad_(False)
        policy = make_policy(ref.model, None)
        n_params = sum(p.numel() for p in policy.parameters())
        dtype = str(next(policy.parameters()).dtype)
    points: list[CurvePoint] = []
    best = 0.0
    flat = 0
    stop = ""
    b = 1
    with tempfile.TemporaryDirectory(prefix="realign-calibrate-") as tmp:
        while True:
            if b > cap:
                stop = f"reached the largest batch size tried ({cap})"
                break
            spent = time.perf_counter() - t_start
            last = next((p for p in reversed(points) if p.status == "ok"), None)
            if last and last.step_ms and spent + 2 * last.step_ms / 1000 * (warmup + steps) > budget:
                stop = (f"time budget: batch {b} would need about "
                        f"{2 * last.step_ms / 1000 * (warmup + steps):.0f} s more "
                        f"(budget {budget:.0f} s, spent {spent:.0f} s)")
                break
            say(f"batch size {b}: {warmup} warm-up + {steps} measured steps")
            try:
                pt = run_batch(policy, ref.tokenizer, dev, b, seq_len, warmup, steps,
                               Path(tmp), seed)
            except Exception as e:  # noqa: BLE001 - OOM is the expected way out
                if not is_oom(e):
                    raise
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                pt = CurvePoint(batch_size=b, status="oom", detail=first)
            finally:
                _free_memory(dev)
            points.append(pt)
            if pt.status == "oom":
                stop = f"out of memory at batch size {b}"
                break
            if pt.status != "ok":
                stop = f"batch size {b}: {pt.detail}"
                break
            tput = pt.examples_per_s or 0.0
            say(f"batch size {b}: {tput:.3g} examples/s, step {pt.step_ms:.0f} ms")
            if best > 0 and tput <= best * (1 + MIN_GAIN):
                flat += 1
                if flat > patience:
                    stop = (f"throughput stopped rising (no gain above {MIN_GAIN:.0%} for "
                            f"{flat} batch size{'s' if flat > 1 else ''})")
                    break
            else:
                flat = 0
            best = max(best, tput)
            b *= 2
    del policy, ref
    _free_memory(dev)
    peak, rec = recommend_batch(points)
    result = CalibrationResult(
        node_id=node_id or hw.hostname, hardware=hw, fingerprint=hw.fingerprint(), model=model,
        model_source=str(backend_source(model)), model_params=n_params,
        dtype=dtype,
        device=str(dev), seq_len=seq_len, quick=quick, warmup_steps=warmup,
        measure_steps=steps, method=MLX_CALIBRATION_METHOD if mlx else METHOD, points=points, stop_reason=stop, peak=peak,
        recommended_batch_size=rec, seconds=time.perf_counter() - t_start,
        load_average=load, created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
        versions=package_versions(CALIBRATION_PACKAGES + (("mlx", "mlx-lm") if mlx else ()),
                                  python=False))
    _finish(result, target_effective_batch, world_size or _default_world(hw, dev))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, result.model_dump_json(by_alias=True, indent=2))
    return result


def backend_source(model: str) -> str | Path:
    from .models import resolve_model

    return resolve_model(model)


def _default_world(hw: HardwareInfo, dev: Any) -> int:
    return max(hw.gpu_count, 1) if dev.type == "cuda" else 1


def _finish(result: CalibrationResult, target: int, world: int) -> None:
    result.recommendation = (recommend_accumulation(result.recommended_batch_size, target, world)
                             if result.recommended_batch_size else None)


def load_calibration(path: str | Path) -> CalibrationResult:
    """Read a calibration file (``realign calibrate --output``, ``--json`` or the cache)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("calibration file not found", file=p)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"not JSON ({e})", file=p) from None
    if isinstance(data, dict) and "calibration" in data and "schema" not in data:
        data = data["calibration"]  # the object printed by `realign calibrate --json`
    if not isinstance(data, dict):
        raise InputError("expected a calibration object", file=p)
    try:
        return CalibrationResult.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(first["msg"], file=p,
                         field=".".join(str(x) for x in first["loc"]) or None) from None


# ----------------------------------------------------------------------------- work split
class HardwareMetrics(BaseModel):
    """One node's measured numbers: throughput in examples/s (DPO pairs), the memory of
    the device it trains on (GiB), the optimizer-step latency (ms)."""

    node_id: str
    model_name: str
    throughput: float
    memory_gb: float | None = None
    latency_ms: float | None = None


def _checked(metrics: Sequence[HardwareMetrics]) -> list[HardwareMetrics]:
    if not metrics:
        raise InputError("no nodes: give at least one node's measured throughput")
    seen: set[str] = set()
    for m in metrics:
        if m.node_id in seen:
            raise InputError(f"node '{m.node_id}' appears twice (name each node: realign calibrate --node-id NAME)", field="node_id")
        seen.add(m.node_id)
        if not (math.isfinite(m.throughput) and m.throughput > 0):
            raise InputError(f"node '{m.node_id}' has throughput {m.throughput}: a node that "
                             "processes nothing cannot take a share (measure it again or "
                             "leave it out)", field="throughput")
    models = {m.model_name for m in metrics}
    if len(models) > 1:
        raise InputError(f"the nodes were calibrated on different models ({', '.join(sorted(models))}); "
                         "throughputs are comparable only for the same model", field="model_name")
    return list(metrics)


def calculate_workload_distribution(metrics: Sequence[HardwareMetrics]) -> dict[str, float]:
    """share_i = T_i / Σ_j T_j (T = measured examples/s). The shares sum to 1 and every
    node finishes its share at the same time, W / Σ T. Empty list, a duplicate node, a
    throughput ≤ 0 or not finite, or mixed models → :class:`InputError`."""
    ms = _checked(metrics)
    total = sum(m.throughput for m in ms)
    return {m.node_id: m.throughput / total for m in ms}


def per_node_batches(shares: dict[str, float], global_batch: int) -> dict[str, int]:
    """Split a global batch into whole per-node batches ∝ shares (largest remainder:
    floor(B·s_i), then one more to the largest fractional parts until they sum to B).
    Every node gets at least 1 when B ≥ number of nodes."""
    if global_batch < len(shares):
        raise InputError(f"global batch {global_batch} is smaller than the number of nodes "
                         f"({len(shares)})", field="global_batch")
    raw = {k: global_batch * s for k, s in shares.items()}
    out = {k: max(1, math.floor(v)) for k, v in raw.items()}
    order = sorted(raw, key=lambda k: raw[k] - math.floor(raw[k]), reverse=True)
    i = 0
    while sum(out.values()) < global_batch:
        out[order[i % len(order)]] += 1
        i += 1
    while sum(out.values()) > global_batch:  # only when max(1, ·) raised a node
        k = max((k for k in out if out[k] > 1), key=lambda k: out[k] - raw[k])
        out[k] -= 1
    return out


class DistributionReport(BaseModel):
    """The split and what an equal split would cost.

    With work W split equally over n nodes, node i needs (W/n)/T_i; the wall time is set
    by the slowest node, so node i idles ``1 − T_min / T_i`` of it, and the cluster runs
    at n·T_min examples/s instead of Σ T (proportional split).
    """

    shares: dict[str, float]
    throughput: dict[str, float]
    ratio: float = Field(description="max/min throughput")
    heterogeneous: bool
    equal_split_idle: dict[str, float]
    equal_split_throughput: float
    proportional_throughput: float
    per_node_batch: dict[str, int] | None = None
    warnings: list[str] = Field(default_factory=list)


def analyze_distribution(metrics: Sequence[HardwareMetrics],
                         global_batch: int | None = None) -> DistributionReport:
    """Shares, heterogeneity (max/min > HETEROGENEOUS_RATIO) and the equal-split idle time."""
    ms = _checked(metrics)
    shares = calculate_workload_distribution(ms)
    t = {m.node_id: m.throughput for m in ms}
    tmin, tmax = min(t.values()), max(t.values())
    ratio = tmax / tmin
    idle = {k: 1 - tmin / v for k, v in t.items()}
    n = len(ms)
    warnings = []
    fastest = max(t, key=lambda k: t[k])
    slowest = min(t, key=lambda k: t[k])
    if ratio > HETEROGENEOUS_RATIO:
        warnings.append(f"heterogeneous cluster: '{fastest}' is {ratio:.2f}× faster than "
                        f"'{slowest}' (flagged above {HETEROGENEOUS_RATIO}×); split the work by "
                        "the shares, not equally")
    if n > 1 and idle[fastest] > IDLE_WARN_FRACTION:
        eq = n * tmin
        warnings.append(
            f"an equal split ({100 / n:.0f}% each) would leave '{fastest}' idle "
            f"{idle[fastest]:.0%} of the time, waiting for '{slowest}': the cluster would run "
            f"at {eq:.3g} examples/s instead of {sum(t.values()):.3g}"
            + (f" (slower than '{fastest}' alone at {tmax:.3g})" if eq < tmax else ""))
    return DistributionReport(
        shares=shares, throughput=t, ratio=ratio, heterogeneous=ratio > HETEROGENEOUS_RATIO,
        equal_split_idle=idle, equal_split_throughput=n * tmin,
        proportional_throughput=sum(t.values()),
        per_node_batch=per_node_batches(shares, global_batch) if global_batch else None,
        warnings=warnings)


def metrics_from_calibration(result: CalibrationResult, *, file: str | Path | None = None
                             ) -> HardwareMetrics:
    """A node's HardwareMetrics from its calibration: throughput at the recommended batch
    size, times the number of devices it trains on (linear scaling assumed: it is not
    measured across devices), device memory, median step time."""
    t = result.throughput
    if t is None:
        raise InputError("the calibration has no successful batch size (every size ran out "
                         "of memory or failed): throughput 0", file=file, field="points")
    devices = max(result.hardware.gpu_count, 1) if result.device.startswith("cuda") else 1
    rec = next(p for p in result.points if p.batch_size == result.recommended_batch_size)
    mem = (result.hardware.cuda[0].memory_gb if result.device.startswith("cuda") and result.hardware.cuda
           else result.hardware.cpu.memory_gb)
    return HardwareMetrics(node_id=result.node_id, model_name=Path(result.model_source).name,
                           throughput=t * devices, memory_gb=mem, latency_ms=rec.step_ms)


def distribute_files(paths: Sequence[str | Path], global_batch: int | None = None
                     ) -> DistributionReport:
    """Read calibration files from several nodes and split the work between them."""
    if not paths:
        raise InputError("no calibration files given (one per node)")
    metrics = []
    for p in paths:
        res = load_calibration(p)
        metrics.append(metrics_from_calibration(res, file=p))
    return analyze_distribution(metrics, global_batch)


# ----------------------------------------------------------------------------- launch config
def training_memory_gb(n_params: int, bytes_per_param: int) -> float:
    """Static memory of full DPO training as stage 5 runs it, in GiB:

        P × (w (policy) + w (gradients) + 2·w (Adam moments, kept in the parameter
             dtype by torch.optim.AdamW) + w (frozen reference copy))  =  5·w·P

    with w = 2 bytes (bf16) or 4 (fp32). Activations come on top; they are what the
    calibration measures. The model fits one device when this is ≤ FIT_FRACTION of the
    device memory.
    """
    return 5 * bytes_per_param * n_params / 2**30


LAYER_CLASSES = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer",
                 "qwen2": "Qwen2DecoderLayer", "qwen3": "Qwen3DecoderLayer",
                 "gemma": "GemmaDecoderLayer", "gemma2": "Gemma2DecoderLayer",
                 "phi3": "Phi3DecoderLayer"}


class LaunchPlan(BaseModel):
    """What the accelerate config is based on."""

    strategy: Literal["no", "ddp", "fsdp", "deepspeed"]
    reason: str
    num_processes: int
    num_machines: int
    training_memory_gb: float | None = None
    device_memory_gb: float | None = None
    config: dict[str, Any]


def plan_launch(*, hw: HardwareInfo, calibration: CalibrationResult | None = None,
                n_params: int | None = None, bytes_per_param: int | None = None,
                layer_class: str | None = None, num_machines: int = 1, machine_rank: int = 0,
                main_process_ip: str | None = None, main_process_port: int = 29500,
                processes_per_machine: int | None = None,
                sharding: Literal["fsdp", "deepspeed"] = "fsdp",
                gradient_accumulation_steps: int = 1) -> LaunchPlan:
    """Choose DDP / FSDP / DeepSpeed ZeRO-3 and build the ``accelerate`` config.

    Rule: when a calibration on this device has a successful batch size, the model
    trains on one device (measured) → DDP (multi-GPU, or gloo on CPUs). Otherwise the
    estimate :func:`training_memory_gb` is compared with FIT_FRACTION × device memory:
    above → ``sharding`` (FSDP full-shard, or DeepSpeed ZeRO-3). Mixed precision is
    ``no`` because the TRL backend already loads bf16 on GPUs that support it.
    """
    on_gpu = hw.gpu_count > 0
    per_machine = processes_per_machine or (hw.gpu_count if on_gpu else 1)
    n_proc = per_machine * num_machines
    dev_mem = hw.cuda[0].memory_gb if on_gpu else hw.cpu.memory_gb
    mem = None
    if calibration is not None:
        n_params = n_params or calibration.model_params
        bytes_per_param = bytes_per_param or (2 if "bfloat16" in calibration.dtype
                                              or "float16" in calibration.dtype else 4)
    if n_params and bytes_per_param:
        mem = training_memory_gb(n_params, bytes_per_param)
    fits_measured = calibration is not None and calibration.recommended_batch_size is not None
    if fits_measured:
        assert calibration is not None
        strategy = "ddp"
        reason = (f"calibration: batch size up to {calibration.peak.batch_size if calibration.peak else '?'} "
                  f"trains on one {calibration.device} device, so each process holds a full copy (DDP)")
    elif mem is not None and dev_mem is not None and mem > FIT_FRACTION * dev_mem:
        strategy = sharding
        reason = (f"estimated training state {mem:.1f} GiB > {FIT_FRACTION:.0%} of one device's "
                  f"{dev_mem:.1f} GiB: shard parameters, gradients and optimizer state")
    elif mem is not None:
        strategy = "ddp"
        reason = (f"estimated training state {mem:.1f} GiB ≤ {FIT_FRACTION:.0%} of one device's "
                  f"{dev_mem} GiB (not measured: run `realign calibrate --model ...` to confirm)")
    else:
        strategy = "ddp"
        reason = "no calibration and no parameter count: DDP assumed"
    if calibration is not None and not fits_measured and calibration.points:
        strategy = sharding
        reason = (f"calibration ran out of memory at batch size 1 on {calibration.device}: "
                  "shard the model")
    if n_proc == 1 and strategy == "ddp":
        strategy = "no"
        reason += "; one process: no distribution needed"
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE", "debug": False,
        "num_machines": num_machines, "num_processes": n_proc, "machine_rank": machine_rank,
        "main_training_function": "main", "mixed_precision": "no", "rdzv_backend": "static",
        "same_network": True, "use_cpu": not on_gpu, "downcast_bf16": "no",
        "tpu_env": [], "tpu_use_cluster": False, "tpu_use_sudo": False,
    }
    if on_gpu:
        cfg["gpu_ids"] = "all"
    if num_machines > 1:
        if not main_process_ip:
            raise InputError("a multi-node config needs --main-process-ip (rank 0's address)",
                             field="main_process_ip")
        cfg["main_process_ip"] = main_process_ip
        cfg["main_process_port"] = main_process_port
    if strategy == "no":
        cfg["distributed_type"] = "NO"
    elif strategy == "ddp":
        # On CPUs too: accelerate's MULTI_CPU type launches through mpirun (one process
        # without it); the torchrun launcher of MULTI_GPU with use_cpu starts N processes,
        # and the Trainer (use_cpu) joins them with gloo.
        cfg["distributed_type"] = "MULTI_GPU"
    elif strategy == "fsdp":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": layer_class or "LlamaDecoderLayer",
            "fsdp_reshard_after_forward": True, "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True, "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": False,
        }
    else:
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True,
            "offload_optimizer_device": "none", "offload_param_device": "none",
            "gradient_accumulation_steps": gradient_accumulation_steps,
        }
    return LaunchPlan(strategy=strategy, reason=reason, num_processes=n_proc,  # type: ignore[arg-type]
                      num_machines=num_machines, training_memory_gb=mem,
                      device_memory_gb=dev_mem, config=cfg)


def layer_class_of(model_source: str | Path) -> str | None:
    """The decoder-layer class FSDP wraps, from config.json's model_type."""
    p = Path(model_source) / "config.json"
    try:
        mt = json.loads(p.read_text())["model_type"]
    except (OSError, ValueError, KeyError):
        return None
    return LAYER_CLASSES.get(mt)


def write_accelerate_config(path: str | Path, plan: LaunchPlan) -> Path:
    """Write the plan's config as YAML (``accelerate launch --config_file PATH``)."""
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# written by `realign calibrate`: {plan.strategy} — {plan.reason}\n")
    write_text_atomic(p, header + yaml.safe_dump(plan.config, sort_keys=True))
    return p


# ---------------------------------------------------------------- batch-size calibration
# (``realign calibrate --backend mlx``: :func:`calibrate` runs its sweep with these in place
# of the TRL trainer; mlx is imported inside them, so this module needs no mlx)

MLX_CALIBRATION_METHOD = (
    "real DPO steps of realign.backends.mlx_dpo.MLXDPOTrainer (MLX, float32), full fine-tuning "
    "of a policy copy beside the frozen reference, on synthetic pairs whose chosen and "
    "rejected sequences are seq_len tokens each. The reference log-probs are constants "
    "(the trainer precomputes them before training, so its steps never run the reference); "
    "the loss values are therefore meaningless, the compute per step is the trainer's. "
    "examples/s = batch size × measured steps ÷ their summed wall time (after warm-up "
    "steps); one example = one preference pair."
)


@dataclass
class MLXDevice:
    """The device of an MLX calibration: ``type`` is "mlx"; ``str()`` names the chip side."""

    kind: str  # "cpu" or "gpu"
    type: str = "mlx"

    def __str__(self) -> str:
        return f"mlx-{self.kind}"


def mlx_calibration_device(device: str | None) -> MLXDevice:
    from .backends.mlx import pick_device

    return MLXDevice(kind=pick_device(device))


def mlx_calibration_models(model: str, device: MLXDevice) -> tuple[Any, Any, int, str]:
    """(reference, full-fine-tuning policy, parameter count, dtype) for a calibration."""
    from mlx.utils import tree_flatten

    from .backends.mlx import MLXBackend, make_policy

    ref = MLXBackend().load(model, device=device.kind)
    policy = make_policy(ref, None)
    n_params = int(sum(v.size for _, v in tree_flatten(policy.model.parameters())))
    return ref, policy, n_params, ref.dtype


def mlx_calibration_point(policy: Any, tokenizer: Any, device: MLXDevice, batch_size: int,
                      seq_len: int, warmup: int, steps: int, workdir: Path, seed: int) -> Any:
    """Train ``warmup + steps`` optimizer steps at ``batch_size``; time the last ``steps``
    (a :class:`CurvePoint`)."""
    import resource
    import sys

    import mlx.core as mx

    from .backends.base import DPOSettings
    from .backends.mlx_dpo import MLXDPOTrainer

    total = warmup + steps
    rows = synthetic_pairs(tokenizer, seq_len, batch_size * total, seed=seed)
    zeros = [0.0] * len(rows)
    settings = DPOSettings(beta=0.1, learning_rate=1e-6, per_device_batch_size=batch_size,
                           max_steps=total, max_length=seq_len, seed=seed)
    reset = getattr(mx, "reset_peak_memory", None)
    if reset:
        reset()
    tr = MLXDPOTrainer(policy, None, rows, settings, ref_logps=(zeros, zeros), use_cache=False)
    tr.train()
    measured = tr.step_seconds[warmup:total]
    if len(measured) < steps:
        return CurvePoint(batch_size=batch_size, status="error",
                          detail=f"only {len(tr.step_seconds)} of {total} steps ran")
    peak = getattr(mx, "get_peak_memory", lambda: 0)()
    if peak:
        mem, src = peak / 2**30, "mx.get_peak_memory (peak)"
    else:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mem = kb * (1 if sys.platform == "darwin" else 1024) / 2**30
        src = "process peak RSS (ru_maxrss, never decreases)"
    return CurvePoint(batch_size=batch_size, status="ok",
                      examples_per_s=batch_size * len(measured) / sum(measured),
                      step_ms=sorted(measured)[len(measured) // 2] * 1000,
                      step_ms_all=[t * 1000 for t in measured], memory_gb=mem, memory_source=src)
