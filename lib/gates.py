"""Quality gates: the single home of every threshold number.

Docs, CLI, MCP and tests read thresholds from :data:`PRESETS`; no other module
writes a threshold literal. A gate compares a measured value with a threshold using
``op``; a value that could not be measured is ``unmeasured`` and never counts as a pass.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Op = Literal[">=", "<=", ">", "<"]
GateStatus = Literal["pass", "fail", "unmeasured"]
VerdictStatus = Literal["pass", "fail", "incomplete"]
PresetName = Literal["relaxed", "standard", "strict"]

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


class GateSpec(BaseModel):
    """What a gate enforces: ``value <op> threshold``."""

    model_config = ConfigDict(frozen=True)
    name: str
    stage: int
    op: Op
    description: str


# name -> (stage, op, description)
GATE_SPECS: dict[str, GateSpec] = {
    s.name: s
    for s in [
        GateSpec(name="min_pairs", stage=2, op=">=", description="usable preference pairs"),
        GateSpec(name="preference_gap", stage=2, op=">=",
                 description="mean s(chosen) - s(rejected), scores in [0, 1]"),
        GateSpec(name="decontamination", stage=2, op=">=",
                 description="1 - contaminated examples / all examples"),
        GateSpec(name="length_bias", stage=2, op="<=",
                 description="share of pairs whose chosen response has more words"),
        GateSpec(name="baseline_perplexity", stage=1, op="<",
                 description="perplexity on held-out responses"),
        GateSpec(name="initial_kl", stage=3, op="<",
                 description="KL(policy || reference) per token before training, nats"),
        GateSpec(name="reward_accuracy", stage=4, op=">=",
                 description="held-out share with r(chosen) > r(rejected)"),
        GateSpec(name="reward_overfit", stage=4, op="<",
                 description="train accuracy - held-out accuracy"),
        GateSpec(name="kl_divergence", stage=5, op="<=",
                 description="mean per-token KL(policy || reference), nats/token"),
        GateSpec(name="reward_margin", stage=5, op=">",
                 description="held-out mean DPO implicit reward margin"),
        GateSpec(name="capability_retention", stage=7, op=">=",
                 description="mean over benchmarks of score after / score before"),
        GateSpec(name="worst_benchmark_retention", stage=7, op=">=",
                 description="lowest per-benchmark retention"),
        GateSpec(name="win_rate", stage=7, op=">",
                 description="share of held-out prompts where the new policy wins, ties half"),
    ]
}

#: The threshold presets (docs/quality-thresholds.md renders them). The only place these numbers are written.
PRESETS: dict[str, dict[str, float]] = {
    "relaxed": {
        "min_pairs": 500, "preference_gap": 0.10, "decontamination": 0.85,
        "length_bias": 0.80, "baseline_perplexity": 30, "initial_kl": 1e-4,
        "reward_accuracy": 0.65, "reward_overfit": 0.15, "kl_divergence": 0.2,
        "reward_margin": 0, "capability_retention": 0.90,
        "worst_benchmark_retention": 0.85, "win_rate": 0.5,
    },
    "standard": {
        "min_pairs": 1000, "preference_gap": 0.15, "decontamination": 0.90,
        "length_bias": 0.70, "baseline_perplexity": 20, "initial_kl": 1e-4,
        "reward_accuracy": 0.70, "reward_overfit": 0.10, "kl_divergence": 0.1,
        "reward_margin": 0, "capability_retention": 0.95,
        "worst_benchmark_retention": 0.90, "win_rate": 0.5,
    },
    "strict": {
        "min_pairs": 5000, "preference_gap": 0.20, "decontamination": 0.95,
        "length_bias": 0.65, "baseline_perplexity": 15, "initial_kl": 1e-4,
        "reward_accuracy": 0.75, "reward_overfit": 0.05, "kl_divergence": 0.05,
        "reward_margin": 0, "capability_retention": 0.98,
        "worst_benchmark_retention": 0.95, "win_rate": 0.55,
    },
}
DEFAULT_PRESET: PresetName = "standard"

#: ``preference_gap`` from explicit scores is measured only when at least this share of
#: the usable pairs carries both scores; below it the gate is ``unmeasured`` with the
#: count (a gap on a few scored pairs says nothing about the rest). Run config
#: ``gap_min_coverage``, CLI ``--gap-min-coverage``.
GAP_MIN_COVERAGE = 0.8


class GateResult(BaseModel):
    """One gate, in the shape used everywhere (CLI --json, verdict.json, MCP)."""

    name: str
    value: float | None
    threshold: float
    op: Op
    status: GateStatus
    detail: str = ""
    ci95: tuple[float, float] | None = None
    overridden: bool = False
    preset_threshold: float | None = Field(
        default=None, description="the preset's threshold when the user overrode it"
    )


class StageVerdict(BaseModel):
    """A stage's verdict: fail if any gate failed, else incomplete if any is unmeasured."""

    stage: str
    status: VerdictStatus
    gates: list[GateResult]
    findings: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, Any] = Field(default_factory=dict)
    preset: str = DEFAULT_PRESET
    warnings: list[str] = Field(default_factory=list)
    inputs: dict[str, str | None] = Field(
        default_factory=dict,
        description="per earlier stage this stage read (the registry's reads): the digest of "
                    "that stage's artifacts when this stage ran (null: it had no verdict). "
                    "When one no longer matches, this verdict is stale.")

    def gate(self, name: str) -> GateResult:
        for g in self.gates:
            if g.name == name:
                return g
        raise KeyError(name)


class Thresholds(BaseModel):
    """A preset plus the user's overrides. ``get`` returns the enforced number."""

    preset: PresetName = DEFAULT_PRESET
    overrides: dict[str, float] = Field(default_factory=dict)

    def model_post_init(self, __context: Any) -> None:
        for name in self.overrides:
            if name not in GATE_SPECS:
                raise ValueError(
                    f"unknown gate '{name}' in threshold override; "
                    f"known gates: {', '.join(GATE_SPECS)}"
                )

    def get(self, name: str) -> float:
        if name in self.overrides:
            return float(self.overrides[name])
        return float(PRESETS[self.preset][name])

    def evaluate(
        self,
        name: str,
        value: float | None,
        *,
        detail: str = "",
        ci95: tuple[float, float] | None = None,
    ) -> GateResult:
        """Compare ``value`` with the threshold; ``None`` or NaN gives ``unmeasured``."""
        spec = GATE_SPECS[name]
        threshold = self.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            status: GateStatus = "unmeasured"
            value = None
        else:
            status = "pass" if _OPS[spec.op](value, threshold) else "fail"
        overridden = name in self.overrides
        return GateResult(
            name=name, value=value, threshold=threshold, op=spec.op, status=status,
            detail=detail, ci95=ci95, overridden=overridden,
            preset_threshold=float(PRESETS[self.preset][name]) if overridden else None,
        )


def parse_overrides(items: list[str] | None) -> dict[str, float]:
    """Parse ``NAME=VALUE`` strings (CLI ``--threshold``) into a dict; raise ValueError."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"threshold override '{item}' is not NAME=VALUE")
        if name not in GATE_SPECS:
            raise ValueError(
                f"unknown gate '{name}'; known gates: {', '.join(GATE_SPECS)}"
            )
        try:
            out[name] = float(raw)
        except ValueError:
            raise ValueError(f"threshold override '{item}': '{raw}' is not a number") from None
    return out


def verdict_status(gates: list[GateResult]) -> VerdictStatus:
    """fail if any gate failed; else incomplete if any is unmeasured; else pass."""
    if any(g.status == "fail" for g in gates):
        return "fail"
    if any(g.status == "unmeasured" for g in gates):
        return "incomplete"
    return "pass"


def make_verdict(
    stage: str,
    gates: list[GateResult],
    thresholds: Thresholds,
    findings: Mapping[str, Any] | None = None,
    artifacts: Mapping[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> StageVerdict:
    return StageVerdict(
        stage=stage, status=verdict_status(gates), gates=gates,
        findings=dict(findings or {}), artifacts=dict(artifacts or {}),
        preset=thresholds.preset, warnings=list(warnings or []),
    )


#: CLI exit code per verdict status (docs/quality-thresholds.md#exit-codes): 0 pass, 1 fail, 2 bad input, 3 incomplete.
EXIT_CODES: dict[str, int] = {"pass": 0, "fail": 1, "incomplete": 3}
EXIT_BAD_INPUT = 2
#: Exit code of a run that completed with gate failures its config allows (``allow_gate_failures``).
EXIT_PASSED_WITH_FAILURES = 4

#: The states of a run (``status.json``; :class:`realign.rundir.RunStatus`).
#: ``passed``: every gate of every stage passed; ``passed_with_failures``: complete, and
#: every failed gate is listed in ``allow_gate_failures``; ``corrupt``: ``run.json`` is
#: unreadable (only :func:`realign.rundir.list_runs` reports it).
RunState = Literal["created", "running", "passed", "passed_with_failures", "failed",
                   "incomplete", "interrupted", "corrupt"]

#: Exit code of ``realign run`` / ``realign resume`` per run state (docs/quality-thresholds.md#exit-codes).
RUN_EXIT: dict[str, int] = {"passed": 0, "failed": 1, "incomplete": 3,
                            "passed_with_failures": EXIT_PASSED_WITH_FAILURES, "interrupted": 1,
                            "created": 3, "running": 3, "corrupt": EXIT_BAD_INPUT}
