"""Model-measurement tools, registered only when the library (and torch) provide them.

Each tool resolves its paths with the server's :class:`PathPolicy`, calls one library
function in a worker thread with progress forwarded to ``ctx.report_progress``, and
returns the library's numbers:

* ``compute_kl``: :func:`realign.backends.trl.kl_between` (also ``realign kl``): mean
  per-token KL(π_θ ‖ π_ref) over completion tokens, exact over the vocabulary,
  nats/token, with the ``kl_divergence`` gate;
* ``calculate_ifd_score``: :func:`realign.ifd.ifd_of_file` (``realign ifd``): IFD =
  PPL(A | Q) ÷ PPL(A) per example and its distribution;
* ``score_preference_gap``: :func:`realign.reward.gap_on_file` (``realign validate
  --reward-model``): the ``preference_gap`` gate from a stage-4 reward model, gap =
  mean tanh((r(c) − r(r)) / 2).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field
from realign.backends.base import KLBetween
from realign.config import DEFAULT_MAX_LENGTH
from realign.gates import DEFAULT_PRESET, GateResult, Thresholds
from realign.ifd import IFDFileResult

from ._util import OverridesArg, check_finite, run_blocking, tool_error
from .paths import PathPolicy

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


KLReport = KLBetween  # one model for the library, the CLI and this tool


class PreferenceGapReport(BaseModel):
    """The preference_gap gate from a reward model, and what it is made of."""

    gate: GateResult
    reward_model: str
    scored_pairs: int
    gap: float | None = Field(description="mean over pairs of tanh((r(c) - r(r)) / 2) = "
                                          "s(c) - s(r), s = Bradley-Terry sigmoid")
    ci95: tuple[float, float] | None
    normalization: str
    accuracy: float | None = Field(description="share of pairs with r(chosen) > r(rejected)")
    margin: dict[str, float] = Field(description="quantiles of r(chosen) - r(rejected)")
    negative_gap: list[int] = Field(description="lines whose pair has a negative gap (the "
                                                "reward model prefers the rejected response)")


def available() -> bool:
    """True when torch, the TRL backend and the stage helpers are installed."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("torch", "transformers", "realign.backends.trl", "realign.rows"))


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

    def p(raw: str, what: str) -> Path:
        try:
            return paths.resolve(raw, what=what)
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
        max_length: Annotated[int, Field(ge=8)] = DEFAULT_MAX_LENGTH,
        device: Annotated[str | None, Field(description="cuda, mps or cpu (default: best)")] = None,
        preset: Literal["relaxed", "standard", "strict"] = DEFAULT_PRESET,
        thresholds: OverridesArg = {},  # noqa: B006
    ) -> KLReport:
        """KL(policy || reference) on a probe set, with the kl_divergence gate.

        KL = Σ_i Σ_t Σ_v p_θ(v|·)(log p_θ(v|·) − log p_ref(v|·)) ÷ Σ_i T_i: exact over the
        vocabulary at each completion token, averaged over the completion tokens of the
        first max_examples pairs (nats/token). Also returns the per-sequence sums. Loads
        both models (CPU: seconds for small models, minutes for large ones).
        """
        check_finite(thresholds)
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
        from realign.backends.trl import kl_between

        res = await run_blocking(kl_between, pol, probe_path, ref, completion=completion,
                                 max_examples=max_examples, batch_size=batch_size,
                                 max_length=max_length, device=device, thresholds=t, ctx=ctx,
                                 progress_kw="progress")
        return res

    @mcp.tool(annotations=READ_ONLY)
    async def calculate_ifd_score(
        path: Annotated[str, Field(description="SFT or preference data (.jsonl, .json, .parquet): "
                                               "messages, instruction+response, prompt+completion "
                                               "or prompt+chosen rows")],
        ctx: Context,
        model: Annotated[str, Field(description="causal LM that scores: a folder, 'default' "
                                                "(SmolLM2-135M-Instruct) or a hub id")] = "default",
        limit: Annotated[int | None, Field(ge=1, description="score only the first N examples")] = None,
        batch_size: Annotated[int, Field(ge=1)] = 16,
        max_length: Annotated[int, Field(ge=2)] = DEFAULT_MAX_LENGTH,
        device: Annotated[str | None, Field(description="cuda, mps or cpu (default: best)")] = None,
    ) -> IFDFileResult:
        """Instruction-following difficulty (Li et al. 2023) of every example of a file.

        IFD = PPL(A | Q) / PPL(A): the answer's perplexity after the instruction, divided
        by the perplexity of the same answer tokens with no instruction. IFD < 1: the
        instruction helps; IFD > 1: it does not (a likely misaligned pair). Returns the
        distribution (mean, quantiles, share above 1) and per-example scores with their
        line numbers. Reads files only (same numbers as `realign ifd --json`).
        """
        from realign.ifd import ifd_of_file

        return await run_blocking(ifd_of_file, p(path, "path"), model_arg(model, "model"),
                                  limit=limit, batch_size=batch_size, max_length=max_length,
                                  device=device, ctx=ctx, progress_kw="progress")

    @mcp.tool(annotations=READ_ONLY)
    async def score_preference_gap(
        path: Annotated[str, Field(description="preference pairs (any supported format)")],
        reward_model: Annotated[str, Field(description="reward model folder (stage 4 saves one "
                                                       "as stages/4-reward_model/reward_model)")],
        ctx: Context,
        exclude_lines: Annotated[list[int], Field(description="lines not to score, e.g. the "
                                                              "duplicates/identical/empty/"
                                                              "contaminated findings of "
                                                              "validate_preference_data")] = [],  # noqa: B006
        skip_bad_rows: bool = False,
        split: Annotated[str | None, Field(description="split of a saved DatasetDict")] = None,
        batch_size: Annotated[int, Field(ge=1)] = 8,
        max_length: Annotated[int, Field(ge=8)] = DEFAULT_MAX_LENGTH,
        device: Annotated[str | None, Field(description="cuda, mps or cpu (default: best)")] = None,
        preset: Literal["relaxed", "standard", "strict"] = DEFAULT_PRESET,
        thresholds: OverridesArg = {},  # noqa: B006
    ) -> PreferenceGapReport:
        """Stage 2/4: the preference_gap gate of a file, scored by a reward model.

        Each pair is scored r(chosen), r(rejected); s(y) = sigmoid(r(y) - r(y')), so the
        pair's gap s(c) - s(r) = tanh((r(c) - r(r)) / 2) and the gate reads the mean
        (with a 95% CI). Also returns the reward accuracy on the file, margin quantiles
        and the lines whose gap is negative. Reads files only.
        """
        from realign.reward import gap_on_file

        check_finite(thresholds)
        try:
            t = Thresholds(preset=preset, overrides=dict(thresholds))
        except ValueError as e:
            raise tool_error(e) from e
        gate, found = await run_blocking(
            gap_on_file, p(path, "path"), p(reward_model, "reward_model"), thresholds=t,
            exclude_lines=exclude_lines, split=split, skip_bad_rows=skip_bad_rows,
            batch_size=batch_size, max_length=max_length, device=device, ctx=ctx,
            progress_kw="progress")
        return PreferenceGapReport(gate=gate, **found)

    return ["compute_kl", "calculate_ifd_score", "score_preference_gap"]
