"""Benchmark and hardware tools: thin wrappers over :mod:`realign.evaluation` and
:mod:`realign.hardware_calibrator`.

* ``list_suites``: :func:`realign.evaluation.list_suites` (``realign eval --list``);
* ``evaluate_benchmarks``: :func:`realign.evaluation.evaluate_path` (the numbers of
  ``realign eval --json``), registered when lm-eval and torch are installed;
* ``calibrate_hardware``: :func:`realign.hardware_calibrator.detect_hardware` always,
  :func:`realign.hardware_calibrator.calibrate` when a model is given (``realign
  calibrate [--model M] --json``).

Long work runs in a worker thread and reports progress through ``ctx.report_progress``.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field
from realign.evaluation import BenchmarkResults, SuiteInfo
from realign.evaluation import list_suites as _list_suites
from realign.hardware_calibrator import CalibrationResult, HardwareInfo

from ._util import run_blocking
from .paths import PathPolicy

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
#: calibrate writes its result to the calibration cache ($REALIGN_HOME/calibration).
CACHES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                         open_world_hint=False)


class SuiteList(BaseModel):
    suites: list[SuiteInfo]


class HardwareReport(BaseModel):
    """What this machine has and, when a model was given, its measured DPO throughput curve."""

    hardware: HardwareInfo
    fingerprint: str = Field(description="hash of what decides throughput (hostname excluded)")
    calibration: CalibrationResult | None = Field(
        None, description="batch-size sweep: examples/s and memory per batch size, the peak, "
                          "the recommended batch and gradient accumulation")


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _hardware(model: str | None, progress: Callable[..., None] | None = None,
              **kw: Any) -> HardwareReport:
    """detect_hardware(), then calibrate(model) when a model is given (its progress
    messages are numbered: the sweep's length is not known in advance)."""
    from realign import hardware_calibrator as hc

    hw = hc.detect_hardware()
    cal = None
    if model is not None:
        n = itertools.count(1)
        say = (lambda msg: progress(next(n), None, msg)) if progress else None
        cal = hc.calibrate(model, progress=say, **kw)
    return HardwareReport(hardware=hw, fingerprint=hw.fingerprint(), calibration=cal)


def register(mcp: MCPServer, policy: PathPolicy) -> list[str]:
    """Add the benchmark and hardware tools to ``mcp``; return their names."""
    names = []

    def model_arg(raw: str) -> str:
        """Local model folders are confined like any path; 'default' and hub ids pass."""
        local = raw.startswith(("/", ".", "~")) or Path(raw).exists() or (policy.base / raw).exists()
        if raw == "default" or not local or not policy.is_confined:
            return raw
        try:
            return str(policy.resolve(raw, what="model"))
        except ValueError as e:
            raise ToolError(str(e)) from e

    @mcp.tool(annotations=READ_ONLY)
    def list_suites() -> SuiteList:
        """The offline benchmark suites shipped with realign (no hub needed): name, item
        count, primary metric, chance score, whether the chat template is used."""
        return SuiteList(suites=_list_suites())

    names.append("list_suites")

    if _has("torch", "transformers", "lm_eval"):
        @mcp.tool(annotations=READ_ONLY)
        async def evaluate_benchmarks(
            ctx: Context,
            model: Annotated[str, Field(description="a model folder, 'default' "
                                                    "(SmolLM2-135M-Instruct) or a hub id")] = "default",
            suites: Annotated[list[str], Field(description="shipped suites (list_suites) or "
                                                           "lm-eval task names; empty: every "
                                                           "shipped suite")] = [],  # noqa: B006
            limit: Annotated[int | None, Field(ge=1, description="first N items of each "
                                                                 "suite")] = None,
            batch_size: Annotated[int, Field(ge=1)] = 16,
            device: Annotated[str | None, Field(description="cuda, mps or cpu (default: "
                                                            "best)")] = None,
            chat_template: Annotated[bool | None, Field(description="force the chat template "
                                                                    "on/off (default: per "
                                                                    "suite)")] = None,
            include_items: Annotated[bool, Field(description="also return every item's score "
                                                             "(and generated response)")] = False,
        ) -> BenchmarkResults:
            """Benchmark a model with lm-evaluation-harness, in-process, suite by suite.

            Score of a suite = mean over its items of the primary metric (accuracy,
            exact match, format followed). Shipped suites run offline; other lm-eval
            tasks need the Hugging Face hub and fail with a clear error when it is
            unreachable. Capability retention (stage 7) = score after / score before
            per suite. Progress after the model load and after each suite.
            """
            from realign.evaluation import DEFAULT_SUITES, evaluate_path

            res = await run_blocking(
                evaluate_path, model_arg(model), list(suites or DEFAULT_SUITES), limit=limit,
                batch_size=batch_size, device=device, apply_chat_template=chat_template,
                ctx=ctx, progress_kw="progress")
            if not include_items:
                for s in res.suites.values():
                    s.items = []
            return res

        names.append("evaluate_benchmarks")

    @mcp.tool(annotations=CACHES)
    async def calibrate_hardware(
        ctx: Context,
        model: Annotated[str | None, Field(description="model to calibrate ('default', a folder "
                                                       "or a hub id); omit to detect the "
                                                       "hardware only")] = None,
        seq_len: Annotated[int, Field(ge=8, description="tokens per sequence, as "
                                                        "dpo.max_length")] = 256,
        device: Annotated[str | None, Field(description="cuda, cuda:N, mps or cpu (default: "
                                                        "best)")] = None,
        quick: Annotated[bool, Field(description="fewer steps, a 2-minute budget, batch "
                                                 "<= 64")] = False,
        refresh: Annotated[bool, Field(description="measure again even if a cached "
                                                   "calibration exists")] = False,
        max_batch: Annotated[int | None, Field(ge=1, description="largest batch size to "
                                                                 "try")] = None,
        max_seconds: Annotated[float | None, Field(gt=0, description="time budget of the "
                                                                     "sweep (s)")] = None,
        target_batch: Annotated[int, Field(ge=1, description="effective batch to reach with "
                                                             "gradient accumulation")] = 32,
        world_size: Annotated[int | None, Field(ge=1, description="training processes "
                                                                  "(default: GPUs here, "
                                                                  "or 1)")] = None,
    ) -> HardwareReport:
        """Detect this machine's hardware; with a model, measure its DPO batch-size curve.

        Detection: CPU, RAM, CUDA GPUs, Apple Silicon (MPS/MLX), what training would
        use. Calibration sweeps batch sizes 1, 2, 4, ... with the stage-5 trainer and
        reports examples/s and memory per size, the peak, the recommended batch (the
        smallest batch near the peak throughput) and the gradient accumulation for target_batch.
        Cached per hardware, model and seq_len (refresh re-measures). Detection takes
        seconds; a calibration minutes (quick: about 2).
        """
        return await run_blocking(
            _hardware, model_arg(model) if model is not None else None, ctx=ctx,
            progress_kw="progress", seq_len=seq_len, device=device, quick=quick,
            refresh=refresh, max_batch=max_batch, max_seconds=max_seconds,
            target_effective_batch=target_batch, world_size=world_size)

    names.append("calibrate_hardware")
    return names
