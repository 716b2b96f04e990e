"""``realign init``: a commented run config for this machine.

:func:`write_run_config` writes a YAML run config in which every field carries its
``description`` (from :mod:`realign.config`) as a comment, rendered from the jinja2
template ``realign/templates/run.yaml.j2``. The DPO batch size comes from this machine:

* ``calibrate=True`` measures it (:func:`realign.hardware_calibrator.calibrate`, the quick
  sweep: a few real DPO steps per batch size, minutes);
* otherwise a calibration cached earlier for this hardware, model and sequence length is
  used when there is one (``realign calibrate --model M`` writes it; reading it costs
  nothing);
* otherwise the config's default, and the file and the result say so and how to
  calibrate.

The hardware is always detected (:func:`realign.hardware_calibrator.detect_hardware`)
and named in the header. The written file is loaded back with
:func:`realign.config.load_config` before it replaces anything; an existing file is
refused unless ``force``. Paths of files that exist are written relative to the config's
folder when they lie below it, else absolute.
"""

from __future__ import annotations

import datetime as _dt
import os
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from .config import RunConfig, apply_overrides, load_config
from .errors import InputError
from .fileio import discard, replace_into, temp_sibling

__all__ = ["BatchChoice", "InitResult", "machine_batch", "render_run_config", "write_run_config"]

TEMPLATE = "run.yaml.j2"
#: Placeholder for ``data`` when none is given (the result's notes say to replace it).
DATA_PLACEHOLDER = "pairs.jsonl"
#: Comment lines are wrapped at this width.
WIDTH = 88


class BatchChoice(BaseModel):
    """The DPO batch size written into the config, and where it comes from."""

    batch_size: int
    gradient_accumulation_steps: int
    source: Literal["calibrated", "cached calibration", "default"]
    note: str
    hardware: str = Field(description="this machine, in one line")


class InitResult(BaseModel):
    """What ``realign init`` / the MCP tool ``create_run_config`` wrote."""

    path: str
    text: str = Field(description="the config as written (YAML with comments)")
    config: dict[str, Any] = Field(description="the config as realign reads it back")
    batch: BatchChoice
    notes: list[str] = Field(default_factory=list)
    next_command: str = Field(description="the command that runs this config")


# ----------------------------------------------------------------------------- hardware
def _describe(hw: Any) -> str:
    cpu = f"{hw.cpu.model} ({hw.cpu.logical_cores} threads"
    cpu += f", {hw.cpu.memory_gb:.0f} GiB)" if hw.cpu.memory_gb else ")"
    if hw.cuda:
        gpus = ", ".join(f"{d.name} ({d.memory_gb:.0f} GiB)" for d in hw.cuda)
        return f"{len(hw.cuda)} CUDA GPU(s): {gpus}; CPU {cpu}"
    if hw.apple is not None:
        return f"{hw.apple.chip}, MPS {'on' if hw.apple.mps_available else 'off'}; CPU {cpu}"
    return f"no GPU; CPU {cpu}"


def _cached(hw: Any, model: str, seq_len: int, device: str) -> Any:
    """The calibration cached for (this hardware, model, sequence length, device), or None.

    Never materializes the default model: when it is not on disk yet there is no
    calibration of it either."""
    from .hardware_calibrator import CalibrationResult, cache_path
    from .models import DEFAULT_MODEL, realign_home

    if model in ("default", DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}") and \
            not (realign_home() / "models" / DEFAULT_MODEL / "config.json").is_file():
        return None
    names = [model]
    if Path(model).expanduser().exists():
        names.append(str(Path(model).expanduser().resolve()))
    for name in dict.fromkeys(names):
        try:
            p = cache_path(hw, name, seq_len, device)
            if p.is_file():
                return CalibrationResult.model_validate_json(p.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - an unreadable cache entry is no calibration
            continue
    return None


def machine_batch(model: str, seq_len: int, *, calibrate: bool = False,
                  progress: Callable[[str], None] | None = None) -> BatchChoice:
    """The DPO per-device batch size and gradient accumulation for ``model`` at
    ``seq_len`` tokens on this machine (see the module doc for the three sources)."""
    from .config import DPOStageConfig
    from .hardware_calibrator import calibrate as run_calibration
    from .hardware_calibrator import detect_hardware

    hw = detect_hardware()
    where = _describe(hw)
    res, source = None, "default"
    if calibrate:
        res = run_calibration(model, seq_len=seq_len, quick=True, progress=progress)
        source = "cached calibration" if res.cached else "calibrated"
    else:
        res = _cached(hw, model, seq_len, hw.accelerator)
        source = "cached calibration" if res is not None else "default"
    rec = res.recommendation if res is not None else None
    if res is not None and rec is not None:
        tput = res.throughput
        return BatchChoice(
            batch_size=rec.per_device_batch,
            gradient_accumulation_steps=rec.gradient_accumulation_steps,
            source=source,  # type: ignore[arg-type]
            note=(f"measured on this machine ({res.device}, {res.seq_len} tokens, "
                  f"{res.created[:10]}): batch {res.recommended_batch_size} is within "
                  f"5% of the peak throughput"
                  + (f" ({tput:.3g} pairs/s)" if tput else "")
                  + f"; × {rec.gradient_accumulation_steps} accumulation for an effective "
                    f"batch of {rec.effective_batch}"),
            hardware=where)
    fields = DPOStageConfig.model_fields
    why = ("the calibration found no batch size that runs" if res is not None else
           "not calibrated on this machine for this model and length")
    return BatchChoice(
        batch_size=int(fields["batch_size"].default),
        gradient_accumulation_steps=int(fields["gradient_accumulation_steps"].default),
        source="default",
        note=(f"the default ({why}): `realign calibrate --model {model} --seq-len {seq_len}` "
              "measures it, then `realign init` again uses it (or `realign init --calibrate`)"),
        hardware=where)


# ----------------------------------------------------------------------------- rendering
def _yaml(value: Any) -> str:
    """One value in YAML flow style, on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, allow_unicode=True,
                          width=1 << 30).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.strip()


def _comment(text: str, indent: int) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width=max(40, WIDTH - indent - 2),
                         break_on_hyphens=False, break_long_words=False)


def _entries(model: type[BaseModel], values: dict[str, Any], indent: int = 0,
             notes: dict[str, str] | None = None, prefix: str = "") -> list[dict[str, Any]]:
    """The template's view of a config section: per field its key, comment lines, and the
    value (scalar) or its fields (a section)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        dotted = f"{prefix}{name}"
        comment = _comment(field.description or "", indent)
        if dotted in (notes or {}):
            comment += _comment("This machine: " + (notes or {})[dotted], indent)
        entry: dict[str, Any] = {"key": name, "comment": comment}
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            entry["children"] = _entries(ann, values.get(name) or {}, indent + 2, notes,
                                         f"{dotted}.")
        else:
            entry["value"] = _yaml(values.get(name))
        out.append(entry)
    return out


def render_run_config(config: RunConfig, *, batch: BatchChoice | None = None,
                      created: str | None = None, path: str = "run.yaml") -> str:
    """The commented YAML of ``config`` (every field, in the schema's order, with its
    description above it), from ``realign/templates/run.yaml.j2``."""
    from .report import _env

    notes = {}
    if batch is not None:
        notes = {"dpo.batch_size": batch.note,
                 "dpo.gradient_accumulation_steps": f"from the same {batch.source}"
                 if batch.source != "default" else "the default"}
    values = config.model_dump(mode="json")
    return str(_env().get_template(TEMPLATE).render(
        entries=_entries(RunConfig, values, notes=notes), batch=batch,
        created=created or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        path=path))


# ----------------------------------------------------------------------------- writing
def _relative(value: str | None, folder: Path) -> str | None:
    """An existing file as the config names it: relative to the config's folder when it
    lies below it, else absolute; anything else (a hub id, a placeholder) as given."""
    if not value or value == "default":
        return value
    p = Path(value).expanduser()
    if not p.exists():
        return value
    full = p.resolve()
    try:
        return full.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(full)


def _validated(raw: dict[str, Any], overrides: Sequence[str], target: Path) -> RunConfig:
    """``raw`` with ``overrides`` applied, validated; InputError naming the field (and the
    override that set it) otherwise."""
    from pydantic import ValidationError

    from .config import _validation_error

    data = apply_overrides(raw, list(overrides))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, target, None, data, list(overrides)) from None


def write_run_config(
    path: str | Path = "run.yaml",
    *,
    model: str = "default",
    data: str | None = None,
    preset: str = "standard",
    overrides: Sequence[str] = (),
    force: bool = False,
    calibrate: bool = False,
    progress: Callable[[str], None] | None = None,
    check: Callable[[RunConfig], None] | None = None,
) -> InitResult:
    """Write a commented run config to ``path`` for ``model`` and ``data`` (see the module
    doc); return what was written. ``overrides``: ``KEY=VALUE`` strings as for
    ``realign run`` (applied last, so they win over the calibrated batch size).

    ``check``: called with the config as realign reads it back, before the file replaces
    anything; it may raise to refuse it (the MCP server confines paths so).

    Raises :class:`InputError` when ``path`` exists (unless ``force``) or is a folder, or
    when a value or override is bad (nothing is written then).
    """
    target = Path(path)
    if target.is_dir():
        raise InputError("is a folder; give the config file to write", file=target)
    if target.exists() and not force:
        raise InputError("exists; pass --force to overwrite it", file=target)
    folder = target.parent if str(target.parent) else Path(".")
    notes: list[str] = []
    if data is None:
        notes.append(f"data: {DATA_PLACEHOLDER} is a placeholder: set it to your preference "
                     "pairs (JSONL, JSON, Parquet, a saved dataset or a hub id)")
    if model != "default" and model.startswith((".", "/", "~")) and \
            not Path(model).expanduser().exists():
        notes.append(f"model: {model} does not exist yet")
    if data is None:
        pass
    elif not Path(data).expanduser().exists() and ("/" not in data or data.count("/") != 1
                                                   or data.startswith((".", "/", "~"))):
        notes.append(f"data: {data} does not exist yet")
    raw: dict[str, Any] = {"model": _relative(model, folder) or "default",
                           "data": _relative(data, folder) or DATA_PLACEHOLDER,
                           "preset": preset}
    staged = _validated(raw, overrides, target)
    batch = machine_batch(model, staged.dpo.max_length, calibrate=calibrate, progress=progress)
    cfg = _validated({**raw, "dpo": {"batch_size": batch.batch_size,
                                     "gradient_accumulation_steps":
                                         batch.gradient_accumulation_steps}},
                     overrides, target)
    if batch.source == "default":
        notes.append("dpo.batch_size is " + batch.note)
    shown = os.path.relpath(target)
    if shown.startswith(".."):
        shown = str(target.resolve())
    text = render_run_config(cfg, batch=batch, path=shown)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    try:
        tmp.write_text(text, encoding="utf-8")
        loaded = load_config(tmp)  # what `realign run` will read; raises on a bad value
        if check is not None:
            check(loaded)
        if target.exists() and not force:  # appeared meanwhile
            raise InputError("exists; pass --force to overwrite it", file=target)
        replace_into(tmp, target)
    finally:
        discard(tmp)
    return InitResult(path=str(target), text=text, config=loaded.model_dump(mode="json"),
                      batch=batch, notes=notes, next_command=f"realign run --config {shown}")
