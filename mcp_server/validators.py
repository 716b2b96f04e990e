"""Validator tools: thin wrappers over :mod:`realign.validation` and :mod:`realign.gates`.

Each tool takes file paths (checked by the server's :class:`PathPolicy`), calls one
library function, and returns the library's model (``StageVerdict``/``GateResult``) as
structured output. A failed gate is a normal result; bad input raises ``ToolError``
with the library's ``FILE:LINE: field ...`` message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field
from realign.decontamination import DecontamConfig
from realign.gates import (
    DEFAULT_PRESET,
    GATE_SPECS,
    GateResult,
    StageVerdict,
    Thresholds,
)
from realign.validation import validate_file
from realign.verifiers import VerifiabilityReport, verify_file

from ._util import OverridesArg, check_finite, run_blocking, tool_error
from .paths import PathPolicy

Preset = Literal["relaxed", "standard", "strict"]

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
WRITES_FILE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                              open_world_hint=False)

PathArg = Annotated[str, Field(description="preference data: .jsonl, .json, .parquet or a saved "
                                           "dataset folder")]
EvalArg = Annotated[list[str], Field(description="evaluation sets to decontaminate against "
                                                 "(JSONL/JSON/Parquet/text files)")]
FieldArg = Annotated[str | None, Field(description="text field of the evaluation sets (default: "
                                                   "prompt, question, text, input, ...)")]
ScaleArg = Annotated[str, Field(description="scale of score_chosen/score_rejected: auto or LO-HI, "
                                            "e.g. 1-10")]
NgramArg = Annotated[int, Field(ge=2, le=13, description="decontamination n-gram size (words)")]
CoverageArg = Annotated[float, Field(gt=0, le=1, description="share of an evaluation item's words "
                                                             "a pair must cover to be contaminated")]
#: The library's documented defaults (DecontamConfig), not numbers of this module.
NGRAM = DecontamConfig.model_fields["ngram"].default
MIN_COVERAGE = DecontamConfig.model_fields["min_coverage"].default


class GateThreshold(BaseModel):
    """One gate of a preset: ``value <op> threshold`` is a pass."""

    name: str
    stage: int
    op: str
    threshold: float
    description: str


class ThresholdTable(BaseModel):
    preset: str
    gates: list[GateThreshold]


class ContaminationHit(BaseModel):
    line: int = Field(description="line (row) of the preference file")
    eval_set: str
    eval_line: int = Field(description="line of the evaluation item it contains")
    coverage: float = Field(description="share of the item's words found in the pair")


class DecontaminationReport(BaseModel):
    """The decontamination gate of stage 2 and every pair that contains an evaluation item."""

    gate: GateResult
    pairs_checked: int
    contaminated_lines: list[int]
    by_eval_set: dict[str, int]
    hits: list[ContaminationHit]
    hits_truncated: bool


def _thresholds(preset: str, overrides: dict[str, float] | None) -> Thresholds:
    check_finite(overrides or {})
    try:
        return Thresholds(preset=preset, overrides=dict(overrides or {}))  # type: ignore[arg-type]
    except ValueError as e:
        raise tool_error(e) from e


def _decontam(ngram: int, min_coverage: float) -> DecontamConfig:
    try:
        return DecontamConfig(ngram=ngram, min_coverage=min_coverage)
    except ValueError as e:
        raise tool_error(e) from e


def register(mcp: MCPServer, policy: PathPolicy) -> list[str]:
    """Add the validator tools to ``mcp``; return their names."""

    def p(raw: str, what: str) -> Path:
        try:
            return policy.resolve(raw, what=what)
        except ValueError as e:
            raise ToolError(str(e)) from e

    async def _validate(ctx: Context | None, path: str, eval_sets: list[str], eval_field: str | None,
                        preset: str, thresholds: dict[str, float] | None, score_scale: str,
                        skip_bad_rows: bool, ngram: int, min_coverage: float, split: str | None,
                        write_clean: Path | None = None) -> StageVerdict:
        src = p(path, "path")
        evals: list[str | Path] = [p(e, "eval set") for e in eval_sets]
        return await run_blocking(
            validate_file, src, ctx=ctx, progress_kw="progress", eval_sets=evals,
            eval_field=eval_field, thresholds=_thresholds(preset, thresholds),
            score_scale=score_scale, decontam=_decontam(ngram, min_coverage),
            skip_bad_rows=skip_bad_rows, write_clean=write_clean, split=split)

    @mcp.tool(annotations=READ_ONLY)
    async def validate_preference_data(
        path: PathArg,
        ctx: Context,
        eval_sets: EvalArg = [],  # noqa: B006 - pydantic copies defaults
        eval_field: FieldArg = None,
        preset: Preset = DEFAULT_PRESET,
        thresholds: OverridesArg = {},  # noqa: B006
        score_scale: ScaleArg = "auto",
        skip_bad_rows: Annotated[bool, Field(description="list malformed rows as findings "
                                                         "instead of stopping at the first")] = False,
        ngram: NgramArg = NGRAM,
        min_coverage: CoverageArg = MIN_COVERAGE,
        split: Annotated[str | None, Field(description="split of a saved DatasetDict")] = None,
    ) -> StageVerdict:
        """Stage 2: validate DPO preference pairs and return the stage verdict.

        Gates: min_pairs (usable pairs after removing malformed, duplicate, identical,
        empty and contaminated rows), preference_gap (mean s(chosen) - s(rejected) from
        explicit scores, else unmeasured), decontamination (1 - contaminated / all pairs;
        unmeasured without eval_sets), length_bias (share of pairs whose chosen has more
        words). findings lists the offending line numbers. Reads files only.
        """
        return await _validate(ctx, path, eval_sets, eval_field, preset, thresholds, score_scale,
                               skip_bad_rows, ngram, min_coverage, split)

    @mcp.tool(annotations=WRITES_FILE)
    async def clean_preference_data(
        path: PathArg,
        output: Annotated[str, Field(description="where to write the usable pairs (input's "
                                                 "format); an existing file is replaced")],
        ctx: Context,
        eval_sets: EvalArg = [],  # noqa: B006
        eval_field: FieldArg = None,
        preset: Preset = DEFAULT_PRESET,
        thresholds: OverridesArg = {},  # noqa: B006
        score_scale: ScaleArg = "auto",
        skip_bad_rows: Annotated[bool, Field(description="drop malformed rows instead of "
                                                         "stopping at the first")] = False,
        ngram: NgramArg = NGRAM,
        min_coverage: CoverageArg = MIN_COVERAGE,
        split: Annotated[str | None, Field(description="split of a saved DatasetDict")] = None,
    ) -> StageVerdict:
        """Validate like validate_preference_data and write the usable pairs to `output`.

        The written file keeps only the rows counted in min_pairs (no duplicates,
        identical or empty pairs, contaminated pairs or, with skip_bad_rows, malformed
        rows). The write is atomic; nothing is written when the input is bad.
        """
        out = p(output, "output")
        if out == p(path, "path"):
            raise ToolError(f"output '{output}' is the input file; choose another path")
        return await _validate(ctx, path, eval_sets, eval_field, preset, thresholds, score_scale,
                               skip_bad_rows, ngram, min_coverage, split, write_clean=out)

    @mcp.tool(annotations=READ_ONLY)
    async def check_decontamination(
        path: PathArg,
        eval_sets: Annotated[list[str], Field(min_length=1, description="evaluation sets to "
                                              "check against (JSONL/JSON/Parquet/text)")],
        ctx: Context,
        eval_field: FieldArg = None,
        preset: Preset = DEFAULT_PRESET,
        thresholds: OverridesArg = {},  # noqa: B006
        ngram: NgramArg = NGRAM,
        min_coverage: CoverageArg = MIN_COVERAGE,
        skip_bad_rows: bool = False,
        split: str | None = None,
    ) -> DecontaminationReport:
        """Which preference pairs contain an evaluation item, verbatim or lightly edited.

        A pair is contaminated when it covers at least min_coverage of an evaluation
        item's words with shared word n-grams (n = ngram). The gate is
        decontamination = 1 - contaminated pairs / all pairs. Returns each hit with
        the pair's line, the evaluation set and item line, and the coverage.
        """
        v = await _validate(ctx, path, eval_sets, eval_field, preset, thresholds, "auto",
                            skip_bad_rows, ngram, min_coverage, split)
        c: dict[str, Any] = v.findings["contamination"]
        return DecontaminationReport(
            gate=v.gate("decontamination"), pairs_checked=v.findings["counts"]["parsed"],
            contaminated_lines=v.findings["contaminated"], by_eval_set=c["by_eval_set"],
            hits=[ContaminationHit(**h) for h in c["hits"]], hits_truncated=c["hits_truncated"])

    @mcp.tool(annotations=READ_ONLY)
    def get_thresholds(preset: Preset = DEFAULT_PRESET) -> ThresholdTable:
        """Every gate of a preset: its stage, comparison and threshold (from realign.gates)."""
        t = _thresholds(preset, None)
        return ThresholdTable(preset=preset, gates=[
            GateThreshold(name=n, stage=s.stage, op=s.op, threshold=t.get(n),
                          description=s.description) for n, s in GATE_SPECS.items()])

    @mcp.tool(annotations=READ_ONLY)
    async def assess_rlvr_verifiability(
        path: Annotated[str, Field(description="rows with prompt, response (or completion) and "
                                               "answer, tests or instructions (JSONL/JSON/Parquet)")],
        ctx: Context,
        threshold: Annotated[float | None, Field(ge=0, le=1, description="share of rows that must "
                                                  "be verifiable (default: the preset's)")] = None,
        preset: Preset = DEFAULT_PRESET,
    ) -> VerifiabilityReport:
        """Share of rows a real verifier can check, found by running the verifiers.

        math (answer equivalence with math-verify), code (the response run against the
        row's tests in a sandboxed subprocess), instructions (IFEval-style constraints
        checked by code), exact (normalized final answer). Returns the share verifiable,
        counts per verifier and per reason, the pass rate of the responses, and every row
        as {line, verifier, verifiable, passed, score, reason}.
        """
        src = p(path, "path")
        if threshold is not None:
            check_finite({"threshold": threshold})
        return await run_blocking(verify_file, src, ctx=ctx, threshold=threshold, preset=preset)

    return ["validate_preference_data", "clean_preference_data", "check_decontamination",
            "get_thresholds", "assess_rlvr_verifiability"]
