"""Where everything of a run lives. The only module that spells the layout::

    <runs>/<run-id>/run.json                        config, seed, package versions, hardware
    <runs>/<run-id>/status.json                     state, current stage, progress (pollers)
    <runs>/<run-id>/run.lock                        the running job's pid
    <runs>/<run-id>/stages/<k>-<name>/verdict.json  gate results + artifacts (stage complete)
    <runs>/<run-id>/stages/<k>-<name>/...           checkpoints, metrics.jsonl, data
    <runs>/<run-id>/report.html, report.md          the human report
    <runs>/<run-id>/deployed_model.json             the model stage 7 or a rollback deployed
    <runs>/<run-id>/rollback.json, rollback/        the last rollback and its re-evaluations
    <deployed model folder>/README.md               its model card, when the folder is in
                                                    the run directory; else:
    <runs>/<run-id>/model_card.md                   (a user's own folder is never written)

Older records are kept, never overwritten: ``deployed_model.<n>.json``, ``rollback.<n>.json``.

Staleness: every verdict records, in ``inputs``, a digest of the artifacts of each
earlier stage it read (the registry's ``reads``; :meth:`RunDir.input_digests`). When an
earlier stage is rerun and its artifacts change, the later verdict no longer matches
and is stale (:meth:`RunDir.stale_stages`); ``resume`` reruns it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from ..distributed import is_main_process
from ..errors import InputError
from ..fileio import clean_temp_files, file_digest, json_digest, keep_old, write_json_atomic
from ..gates import GateResult, StageVerdict
from ..stages.artifacts import StageArtifacts
from ..stages.registry import REGISTRY, stage_spec

A = TypeVar("A", bound=StageArtifacts)

#: Artifact files a stage wrote in its own folder, up to this size, are hashed into its
#: artifacts digest (larger ones, and model folders, are covered by the ``*_digest``
#: values their stage records).
DIGEST_FILE_MAX = 16 << 20
#: The artifacts digest of a stage whose verdict is unreadable.
CORRUPT = "corrupt"


class CorruptVerdictError(InputError):
    """A stage's ``verdict.json`` exists but cannot be read (0 bytes, cut short, not a
    verdict). The stage counts as not complete: ``resume`` reruns it."""


class RunDir:
    """A run directory: its paths, its verdicts, its deploy record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def run_id(self) -> str:
        return self.path.name

    # ---------------------------------------------------------------- files
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def status_json(self) -> Path:
        return self.path / "status.json"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def deployed_json(self) -> Path:
        return self.path / "deployed_model.json"

    @property
    def rollback_json(self) -> Path:
        return self.path / "rollback.json"

    @property
    def rollback_root(self) -> Path:
        """Where rollback writes each candidate's re-evaluation."""
        return self.path / "rollback"

    @property
    def model_card_fallback(self) -> Path:
        """Where the model card goes when the deployed model is not a folder of this run."""
        return self.path / "model_card.md"

    def model_card_for(self, model: str | Path) -> Path:
        """The model card of ``model`` (a deployed model folder): ``README.md`` inside it
        when the folder lies in this run directory (stage 5's model, a checkpoint, stage
        1's SFT model; symlinks resolved), else :attr:`model_card_fallback` (the baseline
        may be the user's own folder, or the shipped default model: never written)."""
        p = Path(model)
        try:
            inside = p.is_dir() and p.resolve().is_relative_to(self.path.resolve())
        except OSError:
            inside = False
        return p / "README.md" if inside else self.model_card_fallback

    @property
    def model_card(self) -> Path | None:
        """The model card of the deployed model (``deployed_model.json``); None when
        nothing was deployed."""
        rec = self.deployed()
        return self.model_card_for(rec["model"]) if rec and rec.get("model") else None

    def exists(self) -> bool:
        """True when this is a run directory (it has ``run.json``)."""
        return self.run_json.exists()

    # ---------------------------------------------------------------- stages
    def stage_dir(self, name: str, *, create: bool = False) -> Path:
        """``stages/<k>-<name>/`` of a registered stage (created when ``create``)."""
        d = self.path / "stages" / stage_spec(name).folder
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def verdict_path(self, name: str) -> Path:
        return self.stage_dir(name) / "verdict.json"

    def metrics_path(self, name: str) -> Path:
        """The stage's ``metrics.jsonl`` (training curves, KL checks)."""
        return self.stage_dir(name) / "metrics.jsonl"

    def read_verdict(self, name: str) -> StageVerdict | None:
        """The stage's verdict, or None when the stage has not completed.

        Raises :class:`CorruptVerdictError` (an :class:`InputError` naming the file) when
        ``verdict.json`` exists but is empty or not a valid verdict.
        """
        p = self.verdict_path(name)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CorruptVerdictError(f"verdict of stage {name} cannot be read "
                                      f"({type(e).__name__}: {e.strerror or e})", file=p) from None
        if not raw.strip():
            raise CorruptVerdictError(f"verdict of stage {name} is empty ({len(raw)} bytes): the "
                                      "stage did not complete; resume reruns it", file=p)
        try:
            return StageVerdict.model_validate_json(raw)
        except (ValidationError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CorruptVerdictError(f"verdict of stage {name} is corrupt ({len(raw)} bytes; "
                                      f"{first}); resume reruns the stage", file=p) from None

    def write_verdict(self, name: str, verdict: StageVerdict) -> Path:
        """Write the verdict atomically (rank 0 only): the stage is complete after this."""
        p = self.verdict_path(name)
        if is_main_process():
            write_json_atomic(p, verdict)
        return p

    def artifacts(self, name: str, model: type[A] | None = None) -> A | None:
        """The stage's artifacts, validated by its registry model (None: not run)."""
        v = self.read_verdict(name)
        if v is None:
            return None
        cls = model or stage_spec(name).artifacts
        return cls.model_validate(v.artifacts)  # type: ignore[return-value]

    def set_aside(self, name: str) -> Path | None:
        """Move a stage folder out of the way before a rerun (nothing is deleted): to
        ``.<k>-<name>.replaced-<time>`` (``-2``, ``-3``, ... when that exists)."""
        d = self.stage_dir(name)
        if not d.exists():
            return None
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        dest, k = d.with_name(f".{d.name}.replaced-{stamp}"), 2
        while dest.exists():
            dest, k = d.with_name(f".{d.name}.replaced-{stamp}-{k}"), k + 1
        os.replace(d, dest)
        return dest

    def set_aside_verdict(self, name: str) -> Path | None:
        """Move an unreadable ``verdict.json`` aside (``verdict.corrupt-<n>.json``) so the
        stage can run again in its folder (stage 5 continues from its checkpoints)."""
        p = self.verdict_path(name)
        if not p.exists() and not p.is_symlink():
            return None
        k = 1
        while p.with_name(f"verdict.corrupt-{k}.json").exists():
            k += 1
        dest = p.with_name(f"verdict.corrupt-{k}.json")
        os.replace(p, dest)
        return dest

    def clean_temp_files(self) -> list[Path]:
        """Remove the temp files a killed job left in the run directory
        (:func:`realign.fileio.clean_temp_files`); call it with the run lock held."""
        return clean_temp_files(self.path)

    # ---------------------------------------------------------------- staleness
    def artifacts_digest(self, name: str) -> str | None:
        """A digest of what stage ``name`` hands to later stages: its verdict's
        ``artifacts`` (a path counts by its file name, so a moved or copied run directory
        keeps its digests) plus the content of each artifact file up to
        :data:`DIGEST_FILE_MAX` that the stage wrote in its own folder
        (``stages/<k>-<name>/``; larger files and model folders are covered by the
        ``*_digest`` values the stage records, as is a file whose ``<key>_digest`` it
        records). None: the stage has no verdict;
        :data:`CORRUPT`: its verdict is unreadable."""
        try:
            v = self.read_verdict(name)
        except CorruptVerdictError:
            return CORRUPT
        if v is None:
            return None
        folder = stage_spec(name).folder
        values: dict[str, Any] = {}
        files: dict[str, str] = {}
        for key, value in sorted(v.artifacts.items()):
            if not (isinstance(value, str) and ("/" in value or os.sep in value)):
                values[key] = value
                continue
            p = Path(value)
            if not p.is_absolute():  # recorded relative to the run directory
                p = self.path / p
            values[key] = p.name
            parts = p.parts
            own = any(parts[i] == "stages" and parts[i + 1] == folder for i in range(len(parts) - 1))
            if not own or f"{key}_digest" in v.artifacts:  # the stage recorded its digest
                continue
            try:
                if p.is_file() and p.stat().st_size <= DIGEST_FILE_MAX:
                    files[key] = file_digest(p)
            except OSError:
                files[key] = "unreadable"
        return json_digest({"artifacts": values, "files": files})

    def input_digests(self, name: str) -> dict[str, str | None]:
        """The digest (:meth:`artifacts_digest`) of every stage ``name`` reads, now: what
        its verdict records in ``inputs`` when it runs."""
        return {r: self.artifacts_digest(r) for r in stage_spec(name).reads}

    def stale_inputs(self, name: str, verdict: StageVerdict | None = None, *,
                     digests: dict[str, str | None] | None = None) -> list[str]:
        """The earlier stages whose artifacts changed since ``name``'s verdict was written
        (its recorded ``inputs`` no longer match). Empty for a verdict without ``inputs``
        (written before they were recorded) or with no verdict. ``digests``: a cache of
        :meth:`artifacts_digest` by stage, filled as needed."""
        v = verdict if verdict is not None else self.read_verdict(name)
        if v is None or not v.inputs:
            return []
        cache = digests if digests is not None else {}
        out = []
        for r, d in v.inputs.items():
            if r not in REGISTRY:
                continue
            if r not in cache:
                cache[r] = self.artifacts_digest(r)
            if cache[r] != d:
                out.append(r)
        return out

    def stale_stages(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """Stage name -> why its verdict is stale, for the stages among ``names`` (default:
        every stage) that have a readable verdict: an input changed since it ran, or it
        reads a stage that is itself stale (that one will be rerun first)."""
        out: dict[str, str] = {}
        digests: dict[str, str | None] = {}
        for name in sorted(names if names is not None else REGISTRY, key=lambda n: REGISTRY[n].number):
            try:
                v = self.read_verdict(name)
            except CorruptVerdictError:
                continue
            if v is None:
                continue
            changed = self.stale_inputs(name, v, digests=digests)
            upstream = [r for r in stage_spec(name).reads if r in out]
            if changed:
                out[name] = "rerun since it ran: " + ", ".join(changed)
            elif upstream:
                out[name] = "reads a stale stage: " + ", ".join(upstream)
        return out

    # ---------------------------------------------------------------- deploy record
    def history(self, record: Path) -> list[dict[str, Any]]:
        """Every version of a kept record (``deployed_model.json``, ``rollback.json``),
        oldest first: ``<stem>.1<suffix>``, ``<stem>.2<suffix>``, ..., then the current one
        (unreadable versions are left out)."""
        out: list[dict[str, Any]] = []
        k = 1
        while True:
            p = record.with_name(f"{record.stem}.{k}{record.suffix}")
            if not p.exists():
                break
            try:
                out.append(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                pass
            k += 1
        try:
            out.append(json.loads(record.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
        return out

    def deployed(self) -> dict[str, Any] | None:
        """``deployed_model.json`` (None when nothing was deployed or restored)."""
        try:
            return json.loads(self.deployed_json.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def write_deployed(self, model: str | Path, *, source: str, decided_by: str,
                       gates: Sequence[GateResult] = ()) -> dict[str, Any]:
        """Point ``deployed_model.json`` at ``model`` (the previous pointer is kept as
        ``deployed_model.<n>.json``; nothing is deleted)."""
        keep_old(self.deployed_json)
        rec = {"model": str(model), "source": source, "decided_by": decided_by,
               "digest": file_digest(Path(model)) if Path(model).exists() else None,
               "gates": {g.name: g.status for g in gates},
               "time": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        write_json_atomic(self.deployed_json, rec)
        return rec


@contextmanager
def metrics_log(path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Append JSON lines to a ``metrics.jsonl`` (flushed per line, so a kill loses nothing;
    rank 0 only)."""
    if not is_main_process():
        yield lambda record: None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        def write(record: dict[str, Any]) -> None:
            fh.write(json.dumps(record, default=float) + "\n")
            fh.flush()

        yield write
