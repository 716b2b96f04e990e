"""Model-measurement tools, registered only when the library (and torch) provide them.

``compute_kl``: KL(π_θ ‖ π_ref) of two models on a probe set of preference pairs,
measured by :func:`realign.backends.trl.kl_on_probe` (mean per-token KL over completion
tokens, exact over the vocabulary, nats/token) and compared with the ``kl_divergence``
gate by :class:`realign.gates.Thresholds`. This module only loads the models and the
rows and passes them on (glue: see the report about moving it into the library).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from realign.gates import DEFAULT_PRESET, GateResult, Thresholds

from ._util import run_blocking, tool_error
from .paths import PathPolicy

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


class KLReport(BaseModel):
    """The kl_divergence gate and the numbers behind it."""

    gate: GateResult
    mean_per_token: float = Field(description="Σ_i Σ_t KL_it ÷ Σ_i T_i, nats per completion token")
    mean_per_sequence: float = Field(description="mean over examples of Σ_t KL_it, nats")
    per_sequence: list[float]
    tokens: int
    examples: int


def available() -> bool:
    """True when torch, the TRL backend and the stage helpers are installed."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("torch", "transformers", "realign.backends.trl", "realign.stages.common"))


def _measure_kl(policy: str, reference: str | None, probe: Path, completion: str, max_examples: int,
                batch_size: int, max_length: int, device: str | None, thresholds: Thresholds,
                progress: Any = None) -> KLReport:
    from realign.backends.trl import TRLBackend, kl_on_probe
    from realign.stages.common import read_rows, to_trl_row

    rows = [to_trl_row(r) for r in read_rows(probe)][:max_examples]
    if not rows:
        raise ToolError(f"{probe}: no pairs to probe")
    backend = TRLBackend()
    steps = 3 if reference else 2
    if progress:
        progress(0, steps, "loading the policy")
    pol = backend.load(policy, device=device)
    ref = None
    if reference:
        if progress:
            progress(1, steps, "loading the reference")
        ref = backend.load(reference, device=device)
    if progress:
        progress(steps - 1, steps, f"measuring KL on {len(rows)} pairs")
    kl = kl_on_probe(pol, ref, [r["prompt"] for r in rows], [r[completion] for r in rows],
                     batch_size=batch_size, max_length=max_length)
    if progress:
        progress(steps, steps, "done")
    gate = thresholds.evaluate(
        "kl_divergence", kl.mean,
        detail=f"mean per-token KL(policy || {'reference' if reference else 'adapters disabled'}) "
               f"over {kl.tokens} {completion} tokens of {len(rows)} probe pairs from {probe.name}")
    return KLReport(gate=gate, mean_per_token=kl.mean, mean_per_sequence=kl.mean_sequence,
                    per_sequence=kl.per_sequence, tokens=kl.tokens, examples=len(rows))


def register(mcp: MCPServer, paths: PathPolicy) -> list[str]:
    if not available():
        return []

    def model_arg(raw: str, what: str) -> str:
        """Local model folders are confined like any path; 'default' and hub ids pass."""
        local = raw.startswith(("/", ".", "~")) or Path(raw).exists() or (paths.base / raw).exists()
        if raw == "default" or not local or not paths.is_confined:
            return raw  # a hub id: the hub is offline here and loading says so
        try:
            return str(paths.resolve(raw, what=what))
        except ValueError as e:
            raise ToolError(str(e)) from e

    @mcp.tool(annotations=READ_ONLY)
    async def compute_kl(
        policy: Annotated[str, Field(description="policy model: a folder (a full model or a PEFT "
                                                 "adapter), 'default', or a hub id")],
        probe: Annotated[str, Field(description="preference pairs to probe (any supported format); "
                                                "the completions are scored")],
        ctx: Context,
        reference: Annotated[str | None, Field(description="reference model; omit when the policy "
                                                           "is a PEFT adapter: the reference is then "
                                                           "its base with adapters disabled")] = None,
        completion: Literal["chosen", "rejected"] = "chosen",
        max_examples: Annotated[int, Field(ge=1, le=4096)] = 64,
        batch_size: Annotated[int, Field(ge=1)] = 8,
        max_length: Annotated[int, Field(ge=8)] = 512,
        device: Annotated[str | None, Field(description="cuda, mps or cpu (default: best)")] = None,
        preset: Literal["relaxed", "standard", "strict"] = DEFAULT_PRESET,
        thresholds: dict[str, float] = {},  # noqa: B006
    ) -> KLReport:
        """KL(policy || reference) on a probe set, with the kl_divergence gate.

        KL = Σ_i Σ_t Σ_v p_θ(v|·)(log p_θ(v|·) − log p_ref(v|·)) ÷ Σ_i T_i: exact over the
        vocabulary at each completion token, averaged over the completion tokens of the
        first max_examples pairs (nats/token). Also returns the per-sequence sums. Loads
        both models (CPU: seconds for small models, minutes for large ones).
        """
        try:
            t = Thresholds(preset=preset, overrides=dict(thresholds))
        except ValueError as e:
            raise tool_error(e) from e
        pol = model_arg(policy, "policy")
        ref = model_arg(reference, "reference") if reference else None
        try:
            probe_path = paths.resolve(probe, what="probe")
        except ValueError as e:
            raise ToolError(str(e)) from e
        return await run_blocking(_measure_kl, pol, ref, probe_path, completion, max_examples,
                                  batch_size, max_length, device, t, ctx=ctx, progress_kw="progress")

    return ["compute_kl"]
