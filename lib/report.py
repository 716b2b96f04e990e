"""The run report: ``report.html`` (one self-contained file, inline SVG plots) and ``report.md``.

:func:`write_report` reads only the run directory (``run.json``, ``status.json``, each
stage's ``verdict.json``, stage 5's ``metrics.jsonl``, stage 4's ``metrics.jsonl``,
``rollback.json``, ``deployed_model.json``) and renders the jinja2 templates in
``realign/templates/``. It runs at the end of every ``run_stages`` and on
``realign report RUN``.

Contents: the run state (``passed_with_failures`` names the failed gates the config
allows; a stale or unreadable stage verdict is marked with why); the decision (stage 7
deploy/reject with its reasons) and the deployed model;
a gate table per stage that ran (value, threshold, status, CI, detail, and the remedy of
a failed or unmeasured gate) with its warnings; plots over training steps of the DPO loss, KL(π‖π_ref) per token at each KL
check (with the gate threshold), reward margins (TRL's per-batch ``rewards/margins``
and the held-out margin of each check) and reward accuracies (per batch and held-out);
retention per benchmark with its 95% CI and the two retention thresholds; the rollback
record. The plots are drawn here as SVG (no plotting dependency).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from .fileio import write_text_atomic
from .rundir import RunDir, load_run_config, run_status

TEMPLATES = Path(__file__).resolve().parent / "templates"

#: Plot colours (colour-blind safe, Okabe–Ito).
COLORS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00"]
FAIL_COLOR = "#D55E00"
PASS_COLOR = "#009E73"


# ----------------------------------------------------------------------------- SVG plots


@dataclass
class Series:
    """One line of a chart: (x, y) points; ``markers`` draws dots, ``bad`` marks points red."""

    name: str
    points: list[tuple[float, float]]
    color: str = COLORS[0]
    markers: bool = False
    dashed: bool = False
    bad: list[bool] = field(default_factory=list)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (steps of 1, 2 or 5 × 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def line_chart(title: str, series: Sequence[Series], *, x_label: str = "step", y_label: str = "",
               hlines: Sequence[tuple[float, str, str]] = (), width: int = 540,
               height: int = 250, y_range: tuple[float, float] | None = None) -> str:
    """An SVG line chart. ``hlines``: (y, label, colour) reference lines (a gate threshold);
    a line far outside the data (beyond 3 data spans) is not drawn but named under the
    title, so it does not flatten the curve. ``y_range``: fixed y limits."""
    pts = [p for s in series for p in s.points if math.isfinite(p[1])]
    if not pts:
        return (f'<svg class="chart" viewBox="0 0 {width} 60" width="{width}" height="60" '
                f'role="img"><text x="10" y="35" class="empty">{escape(title)}: no data</text></svg>')
    ml, mr, mt, mb = 58, 12, 30, 58
    pw, ph = width - ml - mr, height - mt - mb
    xs = [p[0] for p in pts]
    dys = [p[1] for p in pts]
    span = (max(dys) - min(dys)) or (abs(max(dys)) or 1.0)
    near = [h for h in hlines if min(dys) - 3 * span <= h[0] <= max(dys) + 3 * span]
    far = [h for h in hlines if h not in near]
    hlines = near
    ys = dys + [h[0] for h in hlines]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or (abs(y1) * 0.1 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    if y_range is not None:
        y0, y1 = min(y_range[0], y0 + pad), max(y_range[1], y1 - pad)
    elif min(ys) >= 0 > y0:  # a non-negative quantity: the axis starts at 0
        y0 = 0.0
    yt = nice_ticks(y0, y1)
    y0, y1 = min(y0, yt[0]), max(y1, yt[-1])
    xt = [t for t in nice_ticks(x0, x1, 6) if x0 <= t <= x1]
    if all(float(x).is_integer() for x in xs):  # steps: integer ticks only
        xt = [t for t in xt if float(t).is_integer()] or xt

    def X(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def Y(y: float) -> float:
        return mt + (1 - (y - y0) / (y1 - y0)) * ph

    o = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
         f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
         f'<text x="{ml}" y="18" class="title">{escape(title)}</text>']
    for k, (y, label, color) in enumerate(far):
        where = "above" if y > y1 else "below"
        o.append(f'<text x="{ml + pw}" y="{18 + 12 * k}" class="tick" text-anchor="end" '
                 f'fill="{color}">{escape(label)} ({where} the plot)</text>')
    for t in yt:
        o.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" class="grid"/>'
                 f'<text x="{ml - 6}" y="{Y(t) + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>')
    for t in xt:
        o.append(f'<text x="{X(t):.1f}" y="{mt + ph + 16}" class="tick" text-anchor="middle">{_fmt(t)}</text>')
    o.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="frame"/>')
    o.append(f'<text x="{ml + pw / 2:.1f}" y="{mt + ph + 32}" class="axis" text-anchor="middle">{escape(x_label)}</text>')
    if y_label:
        o.append(f'<text transform="translate(14 {mt + ph / 2:.1f}) rotate(-90)" class="axis" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    for y, label, color in hlines:
        o.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" stroke="{color}" '
                 f'stroke-dasharray="6 4" stroke-width="1.5"/>'
                 f'<text x="{ml + pw - 4}" y="{Y(y) - 5:.1f}" class="tick" text-anchor="end" '
                 f'fill="{color}">{escape(label)}</text>')
    for s in series:
        sp = [(x, y) for x, y in s.points if math.isfinite(y)]
        if len(sp) > 1:
            d = " ".join(f"{'M' if i == 0 else 'L'}{X(x):.1f},{Y(y):.1f}" for i, (x, y) in enumerate(sp))
            dash = ' stroke-dasharray="4 3"' if s.dashed else ""
            o.append(f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="1.8"{dash}/>')
        if s.markers or len(sp) == 1:
            for i, (x, y) in enumerate(sp):
                bad = i < len(s.bad) and s.bad[i]
                o.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="{4 if bad else 3}" '
                         f'fill="{FAIL_COLOR if bad else s.color}"><title>{escape(s.name)} '
                         f'step {_fmt(x)}: {_fmt(y)}</title></circle>')
    # legend below the plot
    lx = ml
    for s in series:
        o.append(f'<rect x="{lx}" y="{height - 14}" width="14" height="4" fill="{s.color}"/>'
                 f'<text x="{lx + 18}" y="{height - 9}" class="legend">{escape(s.name)}</text>')
        lx += 30 + 6.5 * len(s.name)
    o.append("</svg>")
    return "".join(o)


def interval_chart(title: str, rows: Sequence[tuple[str, float | None, tuple[float, float] | None]],
                   *, vlines: Sequence[tuple[float, str, str]] = (), width: int = 540) -> str:
    """Horizontal point-and-whisker chart (one row per label: value and 95% CI)."""
    shown = [(lab, v, ci) for lab, v, ci in rows if v is not None]
    if not shown:
        return (f'<svg class="chart" viewBox="0 0 {width} 60" width="{width}" height="60" '
                f'role="img"><text x="10" y="35" class="empty">{escape(title)}: no data</text></svg>')
    ml, mr, mt, rh = 150, 16, 30, 34
    height = mt + rh * len(shown) + 40
    pw = width - ml - mr
    vals = [v for _, v, _ in shown] + [x for _, v, ci in shown if ci for x in ci] + [v[0] for v in vlines]
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.08 or 0.05
    ticks = nice_ticks(lo - pad, hi + pad)
    lo, hi = min(lo - pad, ticks[0]), max(hi + pad, ticks[-1])

    def X(x: float) -> float:
        return ml + (x - lo) / (hi - lo) * pw

    bottom = mt + rh * len(shown)
    o = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
         f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
         f'<text x="10" y="18" class="title">{escape(title)}</text>']
    for t in ticks:
        o.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{mt}" y2="{bottom}" class="grid"/>'
                 f'<text x="{X(t):.1f}" y="{bottom + 16}" class="tick" text-anchor="middle">{_fmt(t)}</text>')
    for x, label, color in vlines:
        o.append(f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{mt - 4}" y2="{bottom}" stroke="{color}" '
                 f'stroke-dasharray="6 4" stroke-width="1.5"/>')
    for k, (x, label, color) in enumerate(vlines):
        o.append(f'<text x="{X(x) + 4:.1f}" y="{bottom + 30 + 0 * k}" class="tick" fill="{color}">'
                 f'{escape(label)}</text>' if k == 0 else
                 f'<text x="{X(x) - 4:.1f}" y="{bottom + 30}" class="tick" text-anchor="end" '
                 f'fill="{color}">{escape(label)}</text>')
    for i, (lab, v, ci) in enumerate(shown):
        y = mt + rh * i + rh / 2
        o.append(f'<text x="{ml - 8}" y="{y + 4:.1f}" class="label" text-anchor="end">{escape(lab)}</text>')
        if ci:
            o.append(f'<line x1="{X(ci[0]):.1f}" x2="{X(ci[1]):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#444" stroke-width="2"/>'
                     f'<line x1="{X(ci[0]):.1f}" x2="{X(ci[0]):.1f}" y1="{y - 6:.1f}" y2="{y + 6:.1f}" stroke="#444" stroke-width="2"/>'
                     f'<line x1="{X(ci[1]):.1f}" x2="{X(ci[1]):.1f}" y1="{y - 6:.1f}" y2="{y + 6:.1f}" stroke="#444" stroke-width="2"/>')
        o.append(f'<circle cx="{X(v):.1f}" cy="{y:.1f}" r="5" fill="{COLORS[0]}"><title>{escape(lab)}: '
                 f'{v:.3f}{f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else ""}</title></circle>'
                 f'<text x="{X(v):.1f}" y="{y - 9:.1f}" class="tick" text-anchor="middle">{v:.3f}</text>')
    o.append("</svg>")
    return "".join(o)


# ----------------------------------------------------------------------------- data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:  # a line cut by a kill: skip it
                        continue
    except OSError:
        pass
    return out


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    pts = []
    for r in records:
        v, s = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and isinstance(s, (int, float)) and math.isfinite(v):
            pts.append((float(s), float(v)))
    return pts


def _iteration_rows(v: Any) -> list[dict[str, str]]:
    """Stage 6's iterations as report rows: score, the gains with their CIs, win rate,
    KL to π0, the failed gates, and which one the stage kept."""
    def ci(g: Any) -> str:
        if not g or g.get("mean") is None:
            return "—"
        lo_hi = g.get("ci95")
        return f"{g['mean']:+.3f}" + (f" ({lo_hi[0]:+.3f} – {lo_hi[1]:+.3f})" if lo_hi else "")

    rows = []
    kept = v.findings.get("selected_iteration")
    for r in v.findings.get("iterations") or []:
        score = (r.get("score") or {}).get("mean")
        kl = ((r.get("kl") or {}).get("sampled") or {}).get("kl")
        rows.append({
            "iteration": str(r.get("iteration")), "kept": "yes" if r.get("iteration") == kept else "",
            "score": "—" if score is None else f"{score:.3f}",
            "gain_previous": ci(r.get("gain_vs_previous")),
            "gain_baseline": ci(r.get("gain_vs_baseline")),
            "win_rate": _fmt_value((r.get("win_rate") or {}).get("value")),
            "kl": _fmt_value(kl), "failed": ", ".join(r.get("failed") or []) or "—"})
    return rows


def _dedupe_steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record per step (a resumed run may have logged a step twice)."""
    by: dict[Any, dict[str, Any]] = {}
    for r in records:
        by[r.get("step")] = r
    return [by[k] for k in sorted(by, key=lambda s: (s is None, s))]


def _fmt_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return _fmt(v)
    return str(v)


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Everything the templates show, read from the run directory."""
    from .gates import GATE_SPECS

    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    config = load_run_config(run_dir)
    run_json = _read_json(rd.run_json) or {}
    status = run_status(run_dir)
    stages = []
    for s in status.stages:
        v = s.verdict
        gates = []
        for g in (v.gates if v else []):
            gates.append({
                "name": g.name, "value": _fmt_value(g.value), "op": g.op,
                "threshold": _fmt(g.threshold), "status": g.status, "detail": g.detail,
                "ci95": f"{_fmt(g.ci95[0])} – {_fmt(g.ci95[1])}" if g.ci95 else "",
                "overridden": g.overridden, "description": GATE_SPECS[g.name].description
                if g.name in GATE_SPECS else "", "remedy": g.remedy or "",
            })
        stages.append({"number": s.number, "name": s.name, "status": s.status, "gates": gates,
                       "note": s.note, "warnings": list(v.warnings) if v else [],
                       "allowed": (v.findings.get("allowed_failures") or []) if v else [],
                       "iterations": _iteration_rows(v) if v and s.name == "iterative" else [],
                       "stopped": v.findings.get("stopped") if v else None})

    from .gates import Thresholds

    thresholds = Thresholds(preset=config.preset, overrides=config.thresholds)
    charts: list[str] = []
    events = _read_jsonl(rd.metrics_path("dpo"))
    train = _dedupe_steps([e for e in events if e.get("event") == "train_log" and "loss" in e])
    checks = _dedupe_steps([e for e in events if e.get("event") == "kl_check"])
    metrics_summary: list[dict[str, str]] = []
    if train or checks:
        kl_thr = thresholds.get("kl_divergence")
        charts.append(line_chart("DPO training loss", [Series("loss (per logged step)", _series(train, "loss"))],
                                 y_label="loss"))
        charts.append(line_chart(
            "KL(π‖π_ref) per token at each KL check",
            [Series("held-out probe KL", _series(checks, "kl"), markers=True,
                    bad=[not c.get("passed", True) for c in checks if isinstance(c.get("kl"), (int, float))])],
            y_label="nats/token", hlines=[(kl_thr, f"kl_divergence ≤ {kl_thr:g}", FAIL_COLOR)]))
        charts.append(line_chart(
            "Reward margins",
            [Series("rewards/margins (train batch)", _series(train, "rewards/margins")),
             Series("held-out margin (KL check)", _series(checks, "heldout_margin"), color=COLORS[1],
                    markers=True)],
            y_label="β·Δ log-ratio", hlines=[(0.0, "0", "#888")]))
        charts.append(line_chart(
            "Reward accuracies",
            [Series("rewards/accuracies (train batch)", _series(train, "rewards/accuracies")),
             Series("held-out accuracy (KL check)", _series(checks, "heldout_accuracy"), color=COLORS[1],
                    markers=True)],
            y_label="share of pairs", y_range=(0.0, 1.0)))
        for label, recs, key in (("DPO loss", train, "loss"), ("rewards/margins", train, "rewards/margins"),
                                 ("rewards/accuracies", train, "rewards/accuracies"),
                                 ("KL per token (checks)", checks, "kl"),
                                 ("held-out margin (checks)", checks, "heldout_margin")):
            pts = _series(recs, key)
            if pts:
                metrics_summary.append({"metric": label, "first": f"step {int(pts[0][0])}: {_fmt(pts[0][1])}",
                                        "last": f"step {int(pts[-1][0])}: {_fmt(pts[-1][1])}",
                                        "n": str(len(pts))})
    rm_events = _read_jsonl(rd.metrics_path("reward_model"))
    rm_train = _dedupe_steps([e["train_log"] for e in rm_events
                              if isinstance(e.get("train_log"), dict) and "loss" in e["train_log"]])
    if rm_train:
        charts.append(line_chart("Reward model training loss (stage 4)",
                                 [Series("loss", _series(rm_train, "loss"), color=COLORS[2])],
                                 y_label="loss"))

    ev = next((s.verdict for s in status.stages if s.name == "evaluation" and s.verdict), None)
    retention_rows: list[dict[str, Any]] = []
    retention_chart = ""
    decision = None
    if ev is not None:
        decision = {"decision": ev.findings.get("decision"), "reasons": ev.findings.get("reasons") or []}
        ret = ev.findings.get("retention") or {}
        plot_rows = []
        for name, r in ret.items():
            ci = tuple(r["ci95"]) if r.get("ci95") else None
            retention_rows.append({
                "suite": name, "metric": r.get("metric", ""), "before": _fmt_value(r.get("before")),
                "after": _fmt_value(r.get("after")), "retention": _fmt_value(r.get("retention")),
                "ci95": f"{ci[0]:.3f} – {ci[1]:.3f}" if ci else "", "n": r.get("n", 0),
                "note": r.get("unmeasured_reason") or ""})
            plot_rows.append((name, r.get("retention"), ci))
        if plot_rows:
            mean_t = thresholds.get("capability_retention")
            worst_t = thresholds.get("worst_benchmark_retention")
            retention_chart = interval_chart(
                "Retention per benchmark (after ÷ before, 95% CI)", plot_rows,
                vlines=[(worst_t, f"worst ≥ {worst_t:g}", FAIL_COLOR),
                        (mean_t, f"mean ≥ {mean_t:g}", COLORS[1])])
    rollback = _read_json(rd.rollback_json)
    deployed = rd.deployed()
    cfg = run_json.get("config", {})
    return {
        "run_id": run_dir.name, "run_dir": str(run_dir), "created": run_json.get("created", ""),
        "state": status.state, "message": status.message, "preset": config.preset,
        "model": cfg.get("model"), "data": cfg.get("data"), "seed": cfg.get("seed"),
        "versions": run_json.get("versions", {}), "hardware": run_json.get("hardware", {}),
        "overrides": config.thresholds, "allowed": config.allow_gate_failures,
        "allowed_failed": status.allowed_failures,
        "stages": stages, "charts": charts, "metrics_summary": metrics_summary,
        "retention": retention_rows, "retention_chart": retention_chart,
        "decision": decision, "rollback": rollback, "deployed": deployed,
        "n_gates": sum(len(s["gates"]) for s in stages),
    }


def _env() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    return Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined,
                       autoescape=lambda name: bool(name and name.endswith(".html.j2")),
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render_html(data: dict[str, Any]) -> str:
    from markupsafe import Markup

    d = dict(data)
    d["charts"] = [Markup(c) for c in data["charts"]]
    d["retention_chart"] = Markup(data["retention_chart"])
    return str(_env().get_template("report.html.j2").render(**d))


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(data: dict[str, Any]) -> str:
    env = _env()
    env.filters["cell"] = _md_cell
    return str(env.get_template("report.md.j2").render(**data))


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` in the run directory (atomically)."""
    rd = RunDir(run_dir)
    data = collect(rd.path)
    html_path, md_path = rd.report_html, rd.report_md
    write_text_atomic(html_path, render_html(data))
    write_text_atomic(md_path, render_markdown(data))
    return html_path, md_path
