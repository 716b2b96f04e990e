"""The Hugging Face model card of a deployed model (``huggingface_hub.ModelCard``).

Written when stage 7 deploys the stage-5 model and when a rollback restores a model
(:func:`write_model_card`, called before ``deployed_model.json`` is repointed, so the
deploy record's digest covers the card). Where: ``README.md`` in the deployed model's
folder when that folder lies in the run directory, else ``<run>/model_card.md``
(:meth:`realign.rundir.RunDir.model_card_for`; a user's own model folder, or the shipped
default model, is never written).

Contents (``realign/templates/model_card.md.j2``, YAML metadata from
``huggingface_hub.ModelCardData``): the decision and the deployed model; every stage's
gate table; the deployed model's retention per benchmark with 95% CIs; the data summary
(pairs, usable pairs, the held-out split, decontamination and against which evaluation
sets and benchmarks); the training config and the package versions and hardware of
``run.json``; the deploy and rollback history.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from .errors import MissingDependencyError
from .gates import GateResult, StageVerdict, Thresholds
from .rundir import RunDir, load_run_config, run_status

__all__ = ["model_card_data", "render_model_card", "write_model_card"]

TEMPLATE = "model_card.md.j2"


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _gate_row(stage: str, g: GateResult) -> dict[str, str]:
    return {"stage": stage, "name": g.name, "value": _fmt(g.value),
            "threshold": f"{g.op} {g.threshold:g}" + (" (override)" if g.overridden else ""),
            "status": g.status,
            "ci95": f"{g.ci95[0]:.3f} – {g.ci95[1]:.3f}" if g.ci95 else ""}


def _hub_id(model: str) -> str | None:
    """The hub id of the base model for the card's ``base_model`` (None for a local
    folder: the metadata takes hub ids only)."""
    from .models import DEFAULT_MODEL

    if model in ("default", DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"):
        return f"HuggingFaceTB/{DEFAULT_MODEL}"
    if not Path(model).expanduser().exists() and model.count("/") == 1 and \
            not model.startswith((".", "/", "~")):
        return model
    return None


def _retention_rows(table: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, r in table.items():
        ci = r.get("ci95")
        rows.append({"suite": name, "metric": r.get("metric") or "",
                     "before": _fmt(r.get("before")), "after": _fmt(r.get("after")),
                     "retention": _fmt(r.get("retention")),
                     "ci95": f"{ci[0]:.3f} – {ci[1]:.3f}" if ci else "",
                     "n": str(r.get("n", "")), "note": r.get("unmeasured_reason") or ""})
    return rows


def _restored_retention(rd: RunDir, thresholds: Thresholds, benchmarks: str | None,
                        config: Any) -> dict[str, Any]:
    """Per-benchmark retention of a model rollback restored, from its benchmarks.json
    against stage 1's baseline (the same computation rollback gated on)."""
    from .assessment import retention_gates
    from .evaluation import BenchmarkResults

    base = rd.artifacts("sft_baseline")
    if not benchmarks or base is None or not base.baseline_benchmarks:
        return {}
    try:
        before = BenchmarkResults.model_validate_json(
            Path(base.baseline_benchmarks).read_text(encoding="utf-8"))
        after = BenchmarkResults.model_validate_json(Path(benchmarks).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    _, table = retention_gates(thresholds, before, after, n_boot=config.evaluation.n_boot,
                               seed=config.seed)
    return {k: v.model_dump(mode="json") for k, v in table.items()}


def model_card_data(run_dir: str | Path, *, model: str | Path, source: str, decided_by: str,
                    evaluation: StageVerdict | None = None,
                    rollback: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the card shows, read from the run directory. ``model``, ``source`` and
    ``decided_by``: the model being deployed now; ``evaluation``: stage 7's verdict when
    it is not on disk yet; ``rollback``: the rollback restoring ``model`` (its
    ``RollbackResult`` as a dict), when one does."""
    rd = RunDir(run_dir)
    config = load_run_config(rd.path)
    thresholds = Thresholds(preset=config.preset, overrides=config.thresholds)
    run_json: dict[str, Any] = {}
    try:
        import json

        run_json = json.loads(rd.run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    status = run_status(rd.path)
    gates: list[dict[str, str]] = []
    verdicts: dict[str, StageVerdict] = {}
    for s in status.stages:
        v = evaluation if (s.name == "evaluation" and evaluation is not None) else s.verdict
        if v is None:
            continue
        verdicts[s.name] = v
        gates += [_gate_row(f"{s.number} {s.name}", g) for g in v.gates]
    if evaluation is not None and "evaluation" not in verdicts:
        verdicts["evaluation"] = evaluation
        gates += [_gate_row("7 evaluation", g) for g in evaluation.gates]

    ev = verdicts.get("evaluation")
    restored_gates: list[dict[str, str]] = []
    if rollback is not None and rollback.get("evaluated"):
        last = rollback["evaluated"][-1]
        restored_gates = [_gate_row(last["candidate"]["name"], GateResult.model_validate(g))
                          for g in last.get("gates") or []]
        retention = _restored_retention(rd, thresholds, last.get("benchmarks"), config)
        retention_of = f"the restored model ({last['candidate']['name']})"
    else:
        retention = (ev.findings.get("retention") or {}) if ev is not None else {}
        retention_of = "the deployed model"

    d2 = verdicts.get("preference_data")
    data: dict[str, Any] = {"path": config.data or config.prompts, "counts": {}, "train": None, "heldout": None,
                            "sets": None, "unchecked": [], "decontamination": None}
    if d2 is not None:
        counts = d2.findings.get("counts") or {}
        cont = d2.findings.get("contamination") or {}
        data.update(
            counts=counts, train=d2.artifacts.get("train_pairs"),
            heldout=d2.artifacts.get("heldout_pairs"),
            sets=[f"{s['name']} ({s['kind']}, {s['items']} items)" for s in cont.get("sets") or []],
            unchecked=[f"{u['name']}: {u['reason']}" for u in cont.get("unchecked_benchmarks") or []],
            decontamination=next((_gate_row("", g) for g in d2.gates
                                  if g.name == "decontamination"), None))
    d5 = verdicts.get("dpo")
    deploys = rd.history(rd.deployed_json) + [{
        "model": str(model), "source": source, "decided_by": decided_by,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}]
    rollbacks = rd.history(rd.rollback_json) + ([rollback] if rollback is not None else [])
    cfg = config.model_dump(mode="json")
    return {
        "run_id": rd.run_id, "run_dir": str(rd.path), "created": run_json.get("created", ""),
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": str(model), "source": source, "decided_by": decided_by,
        "base_model": str(config.model), "base_hub_id": _hub_id(str(config.model)),
        "state": status.state, "preset": config.preset, "overrides": config.thresholds,
        "decision": (ev.findings.get("decision") if ev is not None else None),
        "reasons": (ev.findings.get("reasons") or []) if ev is not None else [],
        "gates": gates, "restored_gates": restored_gates,
        "retention": _retention_rows(retention), "retention_of": retention_of,
        "data": data, "stages": cfg["stages"], "dpo": cfg["dpo"],
        "kl_monitor": cfg["kl_monitor"], "reward": cfg["reward"], "sft": cfg["sft"],
        "seed": config.seed, "selected_step": d5.findings.get("selected_step") if d5 else None,
        "versions": run_json.get("versions") or {}, "hardware": run_json.get("hardware") or {},
        "deploys": deploys, "rollbacks": rollbacks,
    }


def render_model_card(data: dict[str, Any]) -> str:
    """The card's text: YAML metadata (``ModelCardData``) and the Markdown body."""
    try:
        from huggingface_hub import ModelCardData
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("the model card needs huggingface_hub: pip install "
                                     "'realign[train]'") from e
    from .report import _env, _md_cell

    meta = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         base_model=data["base_hub_id"], model_name=data["run_id"],
                         tags=["realign", "dpo", "trl"])
    env = _env()
    env.filters["cell"] = _md_cell
    body = env.get_template(TEMPLATE).render(**data)
    return f"---\n{meta.to_yaml()}\n---\n{body}"


def write_model_card(run_dir: str | Path, *, model: str | Path, source: str, decided_by: str,
                     evaluation: StageVerdict | None = None,
                     rollback: dict[str, Any] | None = None) -> Path:
    """Write the model card of ``model`` (being deployed now; see the module doc) and
    return its path. The card is checked to parse as a ``huggingface_hub.ModelCard``."""
    from huggingface_hub import ModelCard

    from .fileio import write_text_atomic

    rd = RunDir(run_dir)
    card = ModelCard(render_model_card(model_card_data(
        rd.path, model=model, source=source, decided_by=decided_by, evaluation=evaluation,
        rollback=rollback)))
    path = rd.model_card_for(model)
    write_text_atomic(path, str(card))
    return path
