"""``realign calibrate``: hardware detection, measured batch-size calibration, work split
across nodes, and the ``accelerate`` launch config. Logic lives in
:mod:`realign.hardware_calibrator`; this module only parses options and prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..errors import InputError, RealignError
from ._common import err, fail_input, out


def _hardware_table(hw: Any) -> Table:
    t = Table(title=f"hardware: {hw.hostname} (fingerprint {hw.fingerprint()})")
    t.add_column("device")
    t.add_column("what")
    t.add_column("memory")
    c = hw.cpu
    cores = f"{c.physical_cores or '?'} physical / {c.logical_cores} logical cores"
    t.add_row("cpu", f"{c.model}, {cores}, torch threads {hw.torch_threads}",
              f"{c.memory_gb} GiB" + (f" ({c.available_memory_gb} free)" if c.available_memory_gb else ""))
    for d in hw.cuda:
        t.add_row(f"cuda:{d.index}", f"{d.name}, compute capability {d.compute_capability}",
                  f"{d.memory_gb} GiB")
    if hw.apple:
        a = hw.apple
        t.add_row("apple", f"{a.chip}; MPS {'yes' if a.mps_available else 'no'}; "
                  f"MLX {'yes' if a.mlx_available else 'not installed'}",
                  f"{a.unified_memory_gb} GiB unified")
    t.caption = f"training would use: {hw.accelerator}"
    return t


def _curve_table(res: Any) -> Table:
    t = Table(title=f"DPO throughput: {res.model} on {res.device}, {res.seq_len} tokens"
              f"{' (quick)' if res.quick else ''}{' (cached)' if res.cached else ''}")
    for c in ("batch", "examples/s", "step (median)", "memory", "status"):
        t.add_column(c, justify="right" if c != "status" else "left")
    peak = res.peak.batch_size if res.peak else None
    for p in res.points:
        mark = " ← peak" if p.batch_size == peak else ""
        mark += " ← recommended" if p.batch_size == res.recommended_batch_size else ""
        t.add_row(str(p.batch_size), f"{p.examples_per_s:.3g}" if p.examples_per_s else "—",
                  f"{p.step_ms:.0f} ms" if p.step_ms else "—",
                  f"{p.memory_gb:.2f} GiB" if p.memory_gb is not None else "—",
                  (p.status + mark) if p.status == "ok" else f"{p.status}: {p.detail[:60]}")
    t.caption = f"stopped: {res.stop_reason}"
    return t


def calibrate(
    model: Annotated[Optional[str], typer.Option(help="model to calibrate: 'default', a path or hub id")] = None,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence (prompt + response), as dpo.max_length")] = 256,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:N, mps or cpu (default: the best available); with --backend mlx: gpu or cpu")] = None,
    backend: Annotated[str, typer.Option(help="trainer to measure: trl (PyTorch), mlx (Apple Silicon; mlx[cpu] on Linux) or auto (mlx on Apple Silicon when installed, else trl)")] = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="fewer steps, a 2-minute budget, batch ≤ 64")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="measure again even if a cached calibration exists")] = False,
    max_batch: Annotated[Optional[int], typer.Option(help="largest batch size to try")] = None,
    max_seconds: Annotated[Optional[float], typer.Option(help="time budget of the sweep (s)")] = None,
    target_batch: Annotated[int, typer.Option(help="effective batch to reach with gradient accumulation")] = 32,
    world_size: Annotated[Optional[int], typer.Option(help="training processes (default: GPUs here, or 1)")] = None,
    node_id: Annotated[Optional[str], typer.Option(help="name of this node in --distribute (default: hostname)")] = None,
    output: Annotated[Optional[Path], typer.Option(help="also write the calibration here (for --distribute)")] = None,
    distribute: Annotated[bool, typer.Option("--distribute", help="split work between nodes: FILES are their calibrations")] = False,
    files: Annotated[Optional[list[Path]], typer.Argument(help="calibration files, one per node (with --distribute)")] = None,
    global_batch: Annotated[Optional[int], typer.Option(help="with --distribute: split this global batch into per-node batches")] = None,
    write_accelerate_config: Annotated[Optional[Path], typer.Option(help="write an accelerate launch config (YAML) here")] = None,
    num_machines: Annotated[int, typer.Option(help="machines in the accelerate config")] = 1,
    machine_rank: Annotated[int, typer.Option(help="this machine's rank in the accelerate config")] = 0,
    main_process_ip: Annotated[Optional[str], typer.Option(help="rank 0's address (multi-node)")] = None,
    main_process_port: Annotated[int, typer.Option(help="rank 0's port (multi-node)")] = 29500,
    num_processes: Annotated[Optional[int], typer.Option(help="processes per machine (default: GPUs, or 1 on CPU)")] = None,
    sharding: Annotated[str, typer.Option(help="when the model does not fit one device: fsdp or deepspeed")] = "fsdp",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Detect the hardware; with --model, measure the DPO batch-size curve; split work
    between nodes (--distribute); write an accelerate config."""
    from .. import hardware_calibrator as hc

    if files and not distribute:
        fail_input("calibration files are read only with --distribute")
    if sharding not in ("fsdp", "deepspeed"):
        fail_input(f"--sharding must be fsdp or deepspeed, got '{sharding}'")
    from ..backends import BACKENDS, default_backend_name

    if backend not in BACKENDS:
        fail_input(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    backend_name = default_backend_name() if backend == "auto" else backend
    for name, v in (("--seq-len", seq_len), ("--target-batch", target_batch),
                    ("--num-machines", num_machines)):
        if v < 1:
            fail_input(f"{name} must be ≥ 1, got {v}")
    try:
        if distribute:
            rep = hc.distribute_files(list(files or []), global_batch)
            if as_json:
                sys.stdout.write(rep.model_dump_json() + "\n")
                return
            t = Table(title="work split by measured throughput")
            for c in ("node", "examples/s", "share", "idle if split equally", *(
                    ["batch"] if rep.per_node_batch else [])):
                t.add_column(c, justify="right" if c != "node" else "left")
            for k, s in rep.shares.items():
                row = [k, f"{rep.throughput[k]:.3g}", f"{s:.1%}", f"{rep.equal_split_idle[k]:.0%}"]
                if rep.per_node_batch:
                    row.append(str(rep.per_node_batch[k]))
                t.add_row(*row)
            t.caption = (f"max/min {rep.ratio:.2f}×; cluster {rep.proportional_throughput:.3g} "
                         f"examples/s split by shares, {rep.equal_split_throughput:.3g} split equally")
            out.print(t)
            for w in rep.warnings:
                out.print(f"[yellow]warning:[/] {w}")
            return

        hw = hc.detect_hardware()
        result = None
        if model is not None:
            show = (lambda m: err.print(f"[dim]{m}[/]")) if not as_json or err.is_terminal else None
            result = hc.calibrate(model, seq_len=seq_len, device=device, quick=quick,
                                  refresh=refresh, max_batch=max_batch, max_seconds=max_seconds,
                                  target_effective_batch=target_batch, world_size=world_size,
                                  node_id=node_id, progress=show, backend=backend_name)
            if output:
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(result.model_dump_json(by_alias=True, indent=2), encoding="utf-8")
        plan = None
        if write_accelerate_config:
            n_params = None
            layer = None
            if result is not None:
                layer = hc.layer_class_of(result.model_source)
            plan = hc.plan_launch(
                hw=hw, calibration=result, n_params=n_params, layer_class=layer,
                num_machines=num_machines, machine_rank=machine_rank,
                main_process_ip=main_process_ip, main_process_port=main_process_port,
                processes_per_machine=num_processes, sharding=sharding,  # type: ignore[arg-type]
                gradient_accumulation_steps=(result.recommendation.gradient_accumulation_steps
                                             if result and result.recommendation else 1))
            hc.write_accelerate_config(write_accelerate_config, plan)
    except (InputError, RealignError) as e:
        fail_input(str(e))
        return
    if as_json:
        obj: dict[str, Any] = {"hardware": hw.model_dump(mode="json"), "fingerprint": hw.fingerprint()}
        if result is not None:
            obj["calibration"] = json.loads(result.model_dump_json(by_alias=True))
        if plan is not None:
            obj["launch"] = plan.model_dump(mode="json") | {"path": str(write_accelerate_config)}
        sys.stdout.write(json.dumps(obj) + "\n")
        return
    out.print(_hardware_table(hw))
    for n in hw.notes:
        out.print(f"[yellow]note:[/] {n}")
    if result is not None:
        out.print(_curve_table(result))
        if result.peak and result.recommendation:
            r = result.recommendation
            out.print(f"peak {result.peak.examples_per_s:.3g} examples/s at batch "
                      f"{result.peak.batch_size}; recommended batch {result.recommended_batch_size} "
                      f"(smallest within {hc.NEAR_PEAK:.0%} of the peak)")
            out.print(f"for an effective batch of {r.target_effective_batch} on {r.world_size} "
                      f"process(es): dpo.batch_size: {r.per_device_batch}, "
                      f"dpo.gradient_accumulation_steps: {r.gradient_accumulation_steps}"
                      + (f" ({r.note})" if r.note else ""))
        else:
            out.print("[bold red]no batch size trained on this device[/] "
                      "(see the table); use --write-accelerate-config to shard the model")
        if result.load_average and result.load_average[0] > (result.hardware.cpu.logical_cores or 1):
            out.print(f"[yellow]note:[/] the load average was {result.load_average[0]:.1f} on "
                      f"{result.hardware.cpu.logical_cores} cores during the measurement: other "
                      "processes shared the machine, so the numbers are low")
    if plan is not None:
        out.print(f"accelerate config ({plan.strategy}: {plan.reason}) written to "
                  f"{write_accelerate_config}; launch with: accelerate launch --config_file "
                  f"{write_accelerate_config} -m realign.cli stage dpo --run RUN_DIR")


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` to ``app``."""
    app.command()(calibrate)
