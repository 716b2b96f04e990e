"""Quality gates: the single home of every threshold number and of every gate's remedy.

Docs, CLI, MCP and tests read thresholds from :data:`PRESETS`; no other module
writes a threshold literal. A gate compares a measured value with a threshold using
``op``; a value that could not be measured is ``unmeasured`` and never counts as a pass.

A gate that failed or is unmeasured carries a ``remedy``: the next step, with values
(:data:`REMEDIES`, rendered by :func:`render_remedy` from the gate's value and threshold
and, where known, the run's config: :attr:`Thresholds.context`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
        GateSpec(name="rlvr_verifiability", stage=2, op=">=",
                 description="share of rows a verifier (math, code, instructions, exact) "
                             "can check"),
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
        GateSpec(name="length_ratio", stage=6, op=">=",
                 description="mean words of the policy's responses ÷ the baseline's verified "
                             "responses' (reward-hacking guard: length collapse)"),
        GateSpec(name="prompt_echo", stage=6, op="<=",
                 description="share of responses echoing the prompt, policy − baseline "
                             "(reward-hacking guard)"),
        GateSpec(name="distinct_ratio", stage=6, op=">=",
                 description="distinct-2 of the policy's responses ÷ the baseline's "
                             "(reward-hacking guard: loss of diversity)"),
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
        "length_ratio": 0.4, "prompt_echo": 0.3, "distinct_ratio": 0.4,
        "rlvr_verifiability": 0.7,
    },
    "standard": {
        "min_pairs": 1000, "preference_gap": 0.15, "decontamination": 0.90,
        "length_bias": 0.70, "baseline_perplexity": 20, "initial_kl": 1e-4,
        "reward_accuracy": 0.70, "reward_overfit": 0.10, "kl_divergence": 0.1,
        "reward_margin": 0, "capability_retention": 0.95,
        "worst_benchmark_retention": 0.90, "win_rate": 0.5,
        "length_ratio": 0.5, "prompt_echo": 0.2, "distinct_ratio": 0.5,
        "rlvr_verifiability": 0.8,
    },
    "strict": {
        "min_pairs": 5000, "preference_gap": 0.20, "decontamination": 0.95,
        "length_bias": 0.65, "baseline_perplexity": 15, "initial_kl": 1e-4,
        "reward_accuracy": 0.75, "reward_overfit": 0.05, "kl_divergence": 0.05,
        "reward_margin": 0, "capability_retention": 0.98,
        "worst_benchmark_retention": 0.95, "win_rate": 0.55,
        "length_ratio": 0.6, "prompt_echo": 0.1, "distinct_ratio": 0.6,
        "rlvr_verifiability": 0.9,
    },
}
DEFAULT_PRESET: PresetName = "standard"

#: ``preference_gap`` from explicit scores is measured only when at least this share of
#: the usable pairs carries both scores; below it the gate is ``unmeasured`` with the
#: count (a gap on a few scored pairs says nothing about the rest). Run config
#: ``gap_min_coverage``, CLI ``--gap-min-coverage``.
GAP_MIN_COVERAGE = 0.8


# ----------------------------------------------------------------------------- remedies
#: What to do when a gate fails or is unmeasured, one entry per gate: a jinja2 template
#: rendered by :func:`render_remedy`. ``value`` and ``threshold`` are the gate's; the other
#: names come from the context (:data:`REMEDY_CONTEXT`): the run's config (the pipeline
#: fills :attr:`Thresholds.context`) and what the stage found (``remedy_context`` of
#: :meth:`Thresholds.evaluate`). A name the context lacks renders as its placeholder
#: (``LR/2``) and a ``{% if name %}`` clause about it is left out, so a remedy reads
#: right with or without a run; docs/quality-thresholds.md shows that form
#: (:func:`remedy_table`). Commands are CLI words; the MCP server gives the tools.
REMEDIES: dict[str, dict[Literal["fail", "unmeasured"], str]] = {
    "min_pairs": {
        "fail": "add at least {{ shortfall }} usable pairs (collect or generate more) or "
                "recover removed ones: `findings.counts` says how many rows were "
                "duplicates, identical, empty, contaminated or malformed; deduplicate at "
                "the source and fix the generator, then validate again",
        "unmeasured": "no row of the data could be read: fix the input (the error names "
                      "the file, line and field)",
    },
    "preference_gap": {
        "fail": "drop or re-judge the pairs whose chosen is not clearly better"
                "{% if negative_lines %} ({{ negative_source }} lines {{ negative_lines }} "
                "have a negative gap){% endif %}; a reward model finds more: `realign validate "
                "{{ data }} --reward-model RM` lists the lines it ranks the other way "
                "(`negative_gap`); or regenerate the rejected answers so they differ clearly; "
                "check the score scale named in the detail",
        "unmeasured": "score the pairs: `score_chosen` and `score_rejected` on at least "
                      "{{ coverage }} of the usable pairs, with the scale declared "
                      "(`score_scale: LO-HI`); or let a reward model measure it: keep "
                      "`reward_model` in `stages` (stage 4 measures the gap), or "
                      "`realign validate {{ data }} --reward-model RM`",
    },
    "decontamination": {
        "fail": "remove the pairs that contain evaluation items"
                "{% if contaminated_lines %} (lines {{ contaminated_lines }}){% endif %}: "
                "`realign validate {{ data }} --eval EVAL --write-clean CLEAN` writes the data "
                "without them (`findings.contamination.hits` names each item); then find out "
                "how they got into the data",
        "unmeasured": "name the evaluation sets you will report on: `eval_sets` (files) "
                      "and `sft.benchmarks` in the run config (stage 2 checks every "
                      "benchmark the run evaluates), or `realign validate {{ data }} --eval "
                      "EVAL --benchmark NAME`{% if unchecked %}; {{ unchecked }} could not be "
                      "loaded: give its items as a file in `eval_sets`{% endif %}",
    },
    "length_bias": {
        "fail": "rebalance: add pairs whose shorter answer is preferred, or drop "
                "{% if drop %}about {{ drop }} of the pairs whose chosen answer is longer"
                "{% else %}pairs whose chosen answer is longer{% endif %} until they are at "
                "most {{ threshold }} of all; else DPO learns \"longer is better\"",
        "unmeasured": "no usable pairs to measure: fix the data first (see `min_pairs`)",
    },
    "rlvr_verifiability": {
        "fail": "too few rows carry a ground truth a verifier can check: give each row an "
                "`answer` (math or exact), `tests` (code) or `instructions` (IFEval ids), "
                "or name its `verifier`; `realign verify {{ data }} --json` says per row why "
                "it is not verifiable (`not_verifiable` counts the reasons); or score the "
                "other rows with a reward model (`generation.scorer: reward_model`)",
        "unmeasured": "no row could be read: fix the input (the error names the file, line "
                      "and field)",
    },
    "baseline_perplexity": {
        "fail": "the model does not fit the domain: set `sft.dataset` to in-domain SFT data "
                "(stage 1 fine-tunes before it measures), or start from a larger or "
                "better-matched `model`",
        "unmeasured": "no held-out responses to score: stage 2 must leave usable pairs, or "
                      "give `sft.dataset`; then rerun stage 1",
    },
    "initial_kl": {
        "fail": "policy and reference differ before training: load both with the same "
                "weights, dtype and tokenizer; with `dpo.lora` the adapters must start at "
                "zero; then rerun: `realign stage reference_init --run {{ run }}`",
        "unmeasured": "no KL probe: stage 2's held-out split is empty; add data or raise "
                      "`heldout.min_pairs` in a new run",
    },
    "reward_accuracy": {
        "fail": "the reward model does not predict the held-out preferences: compare with "
                "the length-only baseline in `findings` (if length alone does as well, the "
                "signal is length), remove conflicting or mislabelled pairs, or train longer "
                "(`reward.max_steps: {{ reward_steps_double }}`) in a new run",
        "unmeasured": "no held-out pairs: add data or raise `heldout.min_pairs` in a new run",
    },
    "reward_overfit": {
        "fail": "the reward model memorizes its training pairs: train less "
                "(`reward.max_steps: {{ reward_steps_half }}`), train adapters only "
                "(`reward.lora: {r: 16}`), or add data, in a new run",
        "unmeasured": "no pairs to score: add data, then rerun stage 4",
    },
    "kl_divergence": {
        "fail": "the policy drifted from the reference: start a new run with "
                "`dpo.learning_rate` lowered to {{ lr_half }} or `dpo.beta` raised to "
                "{{ beta_double }} (`realign run --config CONFIG dpo.learning_rate={{ lr_half }}`)"
                "{% if on_breach != 'rollback' %}, or set `kl_monitor.on_breach: rollback`"
                "{% endif %}; fewer steps (`dpo.max_steps: {{ dpo_steps_half }}`) also stay "
                "closer to the reference",
        "unmeasured": "no held-out pairs outside the KL probe: raise `heldout.min_pairs`"
                      "{% if heldout_min %} (now {{ heldout_min }}){% endif %} or lower "
                      "`kl_monitor.probe_size`{% if probe_size %} (now {{ probe_size }})"
                      "{% endif %} in a new run",
    },
    "reward_margin": {
        "fail": "DPO did not learn the preference on held-out pairs: check stage 2's "
                "`preference_gap` and stage 4's `reward_accuracy`; with sound data, train "
                "more in a new run (`realign run --config CONFIG "
                "dpo.max_steps={{ dpo_steps_double }}`, or `dpo.learning_rate: "
                "{{ lr_double }}`); when no KL check passed the reference is kept (margin "
                "0): fix `kl_divergence` first",
        "unmeasured": "no held-out pairs outside the KL probe: raise `heldout.min_pairs`"
                      "{% if heldout_min %} (now {{ heldout_min }}){% endif %} or lower "
                      "`kl_monitor.probe_size`{% if probe_size %} (now {{ probe_size }})"
                      "{% endif %} in a new run",
    },
    "capability_retention": {
        "fail": "roll back to the best earlier model that passes: `realign rollback {{ run }}`"
                "{% if candidate %} (first candidate: {{ candidate }}){% endif %}; then "
                "retrain with capability data mixed into the preference pairs"
                "{% if worst %} (largest loss: {{ worst }}){% endif %} and a smaller KL "
                "budget (`dpo.beta: {{ beta_double }}`, fewer `dpo.max_steps`)",
        "unmeasured": "{% if undefined_benchmarks %}no retention for {{ undefined_benchmarks }} "
                      "(a baseline score of 0, no per-item scores or different items): "
                      "replace it in `sft.benchmarks`{% else %}list benchmark suites in "
                      "`sft.benchmarks` (the shipped offline suites: `realign eval --list`)"
                      "{% endif %} and start a new run: stage 1 scores the baseline, stage 7 "
                      "the same items after DPO",
    },
    "worst_benchmark_retention": {
        "fail": "{% if worst %}{{ worst }} lost the most: {% endif %}roll back to the best "
                "earlier model that passes: `realign rollback {{ run }}`"
                "{% if candidate %} (first candidate: {{ candidate }}){% endif %}; then add "
                "data for that benchmark's skill to the preference pairs and retrain with a "
                "smaller KL budget (`dpo.beta: {{ beta_double }}`)",
        "unmeasured": "{% if undefined_benchmarks %}no retention for {{ undefined_benchmarks }} "
                      "(a baseline score of 0, no per-item scores or different items): "
                      "replace it in `sft.benchmarks`{% else %}list benchmark suites in "
                      "`sft.benchmarks` (the shipped offline suites: `realign eval --list`)"
                      "{% endif %} and start a new run: stage 1 scores the baseline, stage 7 "
                      "the same items after DPO",
    },
    "win_rate": {
        "fail": "the policy does not beat the baseline: improve the pairs (stage 2 "
                "`preference_gap`, stage 4 `reward_accuracy`: more and clearer pairs) and "
                "retrain; meanwhile keep the earlier model: `realign rollback {{ run }}`",
        "unmeasured": "no held-out prompt could be judged: give held-out rows a `reference` "
                      "answer (the verifier judges them) or keep `reward_model` in `stages` "
                      "(`evaluation.judge: auto`), in a new run",
    },
    "length_ratio": {
        "fail": "reward hacking: the policy's answers collapsed to {{ value }} of the length "
                "correct answers had (e.g. a bare label or the verifier's keyword): the "
                "verifier or reward model can be satisfied without doing the task; make the "
                "check harder to game (require the content, not a marker), then retrain with "
                "fewer steps or a larger `dpo.beta` ({{ beta_double }}); meanwhile keep the "
                "earlier model: `realign rollback {{ run }}`",
        "unmeasured": "no held-out responses to compare: stage 2 must leave held-out prompts "
                      "(raise `heldout.min_pairs`), in a new run",
    },
    "prompt_echo": {
        "fail": "reward hacking: {{ value }} more of the policy's answers repeat the prompt "
                "than the baseline's: the check rewards words the prompt already contains; "
                "make it require more than the instruction's words, then retrain; meanwhile "
                "keep the earlier model: `realign rollback {{ run }}`",
        "unmeasured": "no held-out responses to compare: stage 2 must leave held-out prompts "
                      "(raise `heldout.min_pairs`), in a new run",
    },
    "distinct_ratio": {
        "fail": "reward hacking: the policy gives the same few answers to different prompts "
                "(distinct-2 at {{ value }} of the baseline's): the check rewards one string; "
                "make it depend on the prompt, retrain with fewer steps or a larger "
                "`dpo.beta` ({{ beta_double }}); meanwhile keep the earlier model: "
                "`realign rollback {{ run }}`",
        "unmeasured": "no held-out responses to compare: stage 2 must leave held-out prompts "
                      "(raise `heldout.min_pairs`), in a new run",
    },
}

#: The names a remedy may use besides ``value`` and ``threshold``: name -> (what it is,
#: the placeholder shown when it is not known). ``<name>_half`` and ``<name>_double`` of
#: the numbers ``lr``, ``beta``, ``dpo_steps``, ``reward_steps`` are derived.
REMEDY_CONTEXT: dict[str, tuple[str, str]] = {
    "run": ("the run directory", "RUN"),
    "data": ("the preference data (config `data`)", "DATA"),
    "lr": ("config `dpo.learning_rate`", "LR"),
    "beta": ("config `dpo.beta`", "BETA"),
    "dpo_steps": ("config `dpo.max_steps`", "STEPS"),
    "reward_steps": ("config `reward.max_steps`", "RM_STEPS"),
    "on_breach": ("config `kl_monitor.on_breach`", "ON_BREACH"),
    "heldout_min": ("config `heldout.min_pairs`", "HELDOUT_MIN"),
    "probe_size": ("config `kl_monitor.probe_size`", "PROBE_SIZE"),
    "coverage": ("config `gap_min_coverage`", "`gap_min_coverage`"),
    "negative_lines": ("lines whose pair has a negative gap", "LINES"),
    "negative_source": ("the file those lines are in", "the data's"),
    "contaminated_lines": ("lines that contain an evaluation item", "LINES"),
    "unchecked": ("benchmarks whose items could not be loaded", "BENCHMARK"),
    "drop": ("pairs to drop so that length_bias passes", "N"),
    "worst": ("the benchmark with the lowest retention", "BENCHMARK"),
    "undefined_benchmarks": ("benchmarks without a retention", "BENCHMARK"),
    "candidate": ("the first model `realign rollback` would try", "CHECKPOINT"),
}
#: Placeholders of the derived and gate numbers (see :data:`REMEDY_CONTEXT`).
_DERIVED_PLACEHOLDERS = {
    "value": "VALUE", "threshold": "THRESHOLD", "shortfall": "THRESHOLD − VALUE",
    "lr_half": "LR/2", "lr_double": "2×LR", "beta_half": "BETA/2", "beta_double": "2×BETA",
    "dpo_steps_half": "STEPS/2", "dpo_steps_double": "2×STEPS",
    "reward_steps_half": "RM_STEPS/2", "reward_steps_double": "2×RM_STEPS",
}
_SCALED = ("lr", "beta", "dpo_steps", "reward_steps")
#: Lines named in a remedy before "… and N more".
REMEDY_MAX_LINES = 10


def _num(x: float) -> str:
    """A number as a config value: integers plainly, others to 4 significant digits."""
    if isinstance(x, bool):
        return str(x).lower()
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


def _lines(items: Any) -> str:
    xs = [str(x) for x in items]
    more = len(xs) - REMEDY_MAX_LINES
    return ", ".join(xs[:REMEDY_MAX_LINES]) + (f" … and {more} more" if more > 0 else "")


def remedy_fields(name: str, value: float | None, threshold: float | None,
                  context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The values a remedy template sees: the context's known values (lists of lines
    joined, numbers formatted), ``value``, ``threshold``, the derived halves and doubles,
    ``shortfall`` (how far the value is from the threshold) and, for ``length_bias``,
    ``drop`` (pairs whose chosen is longer to drop: (s − t)·n ÷ (1 − t), n = ``pairs``)."""
    ctx = {k: v for k, v in (context or {}).items() if v is not None and v != [] and v != ""}
    out: dict[str, Any] = {}
    for k, v in ctx.items():
        if isinstance(v, (list, tuple)):
            out[k] = _lines(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = _num(v)
        else:
            out[k] = v
    for k in _SCALED:
        v = ctx.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            steps = k.endswith("steps")
            out[f"{k}_half"] = _num(max(1, int(v) // 2) if steps else v / 2)
            out[f"{k}_double"] = _num(int(v) * 2 if steps else v * 2)
    if isinstance(ctx.get("coverage"), (int, float)):
        out["coverage"] = f"{float(ctx['coverage']):.0%}"
    if threshold is not None:
        out["threshold"] = _num(threshold)
    if value is not None:
        out["value"] = _num(value)
        if threshold is not None:
            out["shortfall"] = _num(math.ceil(abs(threshold - value)) if name == "min_pairs"
                                    else abs(threshold - value))
        n = ctx.get("pairs")
        if name == "length_bias" and threshold is not None and isinstance(n, (int, float)) \
                and value > threshold and threshold < 1:
            out["drop"] = str(math.ceil((value - threshold) * n / (1 - threshold)))
    return out


_TEMPLATES: dict[tuple[str, str], Any] = {}


def _template(name: str, status: str) -> Any:
    key = (name, status)
    if key not in _TEMPLATES:
        from jinja2 import Environment, Undefined

        class Placeholder(Undefined):
            """An unknown name renders as its placeholder (``LR/2``) and is false."""

            __slots__ = ()

            def __str__(self) -> str:
                n = self._undefined_name or ""
                return _DERIVED_PLACEHOLDERS.get(n) or REMEDY_CONTEXT.get(n, ("", n.upper()))[1]

        env = Environment(undefined=Placeholder, autoescape=False, keep_trailing_newline=False)
        _TEMPLATES[key] = env.from_string(REMEDIES[name][status])  # type: ignore[index]
    return _TEMPLATES[key]


def render_remedy(name: str, status: str, value: float | None = None,
                  threshold: float | None = None,
                  context: Mapping[str, Any] | None = None) -> str | None:
    """The remedy of gate ``name`` in ``status`` (None for ``pass`` or a gate without one),
    with the numbers filled in from ``value``, ``threshold`` and ``context``."""
    if status == "pass" or name not in REMEDIES or status not in REMEDIES[name]:
        return None
    fields = remedy_fields(name, value, threshold, context)
    return " ".join(str(_template(name, status).render(**fields)).split())


def remedy_table() -> list[tuple[str, str, str]]:
    """(gate, remedy when it fails, remedy when it is unmeasured) for every gate, with
    placeholders for the numbers (what docs/quality-thresholds.md shows)."""
    return [(n, render_remedy(n, "fail") or "", render_remedy(n, "unmeasured") or "")
            for n in GATE_SPECS]


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
    remedy: str | None = Field(
        default=None,
        description="what to do when the gate failed or is unmeasured: the next step, with "
                    "values (null for a pass)")

    @model_validator(mode="after")
    def _default_remedy(self) -> GateResult:
        """A failed or unmeasured gate always carries a remedy (the generic one from
        :data:`REMEDIES` when none was given, e.g. a verdict written before remedies)."""
        if self.remedy is None and self.status != "pass":
            self.remedy = render_remedy(self.name, self.status, self.value, self.threshold)
        return self


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
    context: dict[str, Any] = Field(
        default_factory=dict, exclude=True,
        description="what the remedies may name (REMEDY_CONTEXT): the run's config values "
                    "and run directory; the pipeline sets it (remedy_context_from_config)")

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
        remedy_context: Mapping[str, Any] | None = None,
    ) -> GateResult:
        """Compare ``value`` with the threshold; ``None`` or NaN gives ``unmeasured``.

        A failed or unmeasured gate gets its remedy (:data:`REMEDIES`) rendered with the
        value, the threshold, :attr:`context` and ``remedy_context`` (what the stage knows:
        lines to drop, the benchmark that lost most, ...)."""
        spec = GATE_SPECS[name]
        threshold = self.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            status: GateStatus = "unmeasured"
            value = None
        else:
            status = "pass" if _OPS[spec.op](value, threshold) else "fail"
        overridden = name in self.overrides
        remedy = render_remedy(name, status, value, threshold,
                               {**self.context, **(remedy_context or {})})
        return GateResult(
            name=name, value=value, threshold=threshold, op=spec.op, status=status,
            detail=detail, ci95=ci95, overridden=overridden,
            preset_threshold=float(PRESETS[self.preset][name]) if overridden else None,
            remedy=remedy,
        )

    def with_context(self, **context: Any) -> Thresholds:
        """A copy whose remedies also know ``context`` (None values are left out)."""
        return self.model_copy(update={"context": {
            **self.context, **{k: v for k, v in context.items() if v is not None}}})


def remedy_context_from_config(config: Any, run_dir: Any = None) -> dict[str, Any]:
    """The context a run's remedies name (:data:`REMEDY_CONTEXT`), from its
    :class:`realign.config.RunConfig` and run directory."""
    ctx: dict[str, Any] = {
        "data": getattr(config, "data", None),
        "lr": config.dpo.learning_rate, "beta": config.dpo.beta,
        "dpo_steps": config.dpo.max_steps if config.dpo.max_steps > 0 else None,
        "reward_steps": config.reward.max_steps if config.reward.max_steps > 0 else None,
        "on_breach": config.kl_monitor.on_breach, "heldout_min": config.heldout.min_pairs,
        "probe_size": config.kl_monitor.probe_size, "coverage": config.gap_min_coverage,
    }
    if run_dir is not None:
        ctx["run"] = str(run_dir)
    return {k: v for k, v in ctx.items() if v is not None}


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
