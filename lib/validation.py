"""Stage 2 validation engine: stream a preference file once, compute every gate.

What makes a pair unusable (docs/quality-thresholds.md#definitions), each listed by line number:

* ``malformed``: rows that could not be parsed (only with ``skip_bad_rows``; by
  default the first one stops the run with exit code 2);
* ``duplicates``: a row whose (prompt, chosen, rejected), compared as a reader sees
  them and lower-cased, repeats an earlier row (the first occurrence is kept). Rows are
  compared by a 128-bit hash of their three word sequences (:mod:`realign.text_hash`),
  so memory stays small on millions of rows;
* ``identical``: chosen equals rejected as a reader sees them (case counts);
* ``empty``: chosen or rejected has no visible word;
* ``contaminated``: the pair contains an evaluation item (see
  :mod:`realign.decontamination`).

"As a reader sees them" (:func:`realign.text_hash.reader_text`): Unicode NFKC, zero-width
characters removed, every run of whitespace (ASCII or Unicode: no-break, thin, ideographic
space, ...) one space. A word, for duplicates and length bias, is a run of other
characters.

Bad rows: by default the first malformed row stops the run (exit code 2, nothing
written); ``skip_bad_rows=True`` (CLI ``--skip-bad-rows``) skips them, counts them
(``findings.counts.malformed``) and lists each under ``findings.malformed`` with its line,
field and error.

Gates: ``min_pairs`` (usable count); ``preference_gap`` (explicit scores only, on a
declared scale or one the scores leave no doubt about, and only when at least
``gap_min_coverage`` of the usable pairs carry both scores, else ``unmeasured``);
``decontamination`` (over all parsed pairs, against the evaluation files and the
benchmarks; ``unmeasured`` when no evaluation item could be checked); ``length_bias``
(over usable pairs). Work runs on two threads: Arrow and NumPy release the GIL, so
parsing and scanning of consecutive blocks overlap.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .data import PairBlock, PairSource
from .decontamination import (
    DecontamConfig,
    EvalSet,
    Hit,
    NgramIndex,
    load_benchmarks,
    load_eval_set,
)
from .errors import InputError
from .fileio import discard, replace_into, temp_sibling
from .gates import GAP_MIN_COVERAGE, StageVerdict, Thresholds, make_verdict
from .metrics import (
    STANDARD_SCALES,
    RunningDiff,
    decontamination_rate,
    infer_scale,
    length_bias,
    parse_scale,
    preference_gap,
)
from .text_hash import (
    mix64,
    prepare,
    reader_text,
    reader_text_lower,
    row_hashes,
    word_hashes,
)

#: At most this many contamination hits are detailed (all contaminated lines are listed).
MAX_HIT_DETAILS = 10_000
STAGE_NAME = "preference_data"

Progress = Callable[[int, int], None]


@dataclass
class _Analysis:
    """Per-block results computed off the main thread."""

    block: PairBlock
    keys: list[int]
    identical: np.ndarray
    empty: np.ndarray
    word_diff: np.ndarray
    score_c: np.ndarray
    score_r: np.ndarray
    hits: list[Hit]


#: Salts of the two 64-bit halves of a duplicate key, and per field.
_SALTS = ((0x5851F42D4C957F2D, 0x14057B7EF767814F), (0x2545F4914F6CDD1D, 0x9E3779B97F4A7C15))


def _analyse(block: PairBlock, index: NgramIndex | None) -> _Analysis:
    """Per-block work (runs on a worker thread; NumPy and Arrow release the GIL).

    Words here are runs of non-whitespace in the text as a reader sees it
    (:func:`realign.text_hash.reader_text`: NFKC, zero-width characters removed, Unicode
    whitespace collapsed; only rows with non-ASCII text need it). Duplicate key: two 64-bit
    hashes of the lower-cased word sequences of prompt, chosen and rejected.
    ``identical``: chosen and rejected have the same words, case included (candidates
    from the hashes, confirmed on the reader's text). ``empty``: no words.
    """
    t = block.table
    prompt, chosen, rejected = (t.column(c).combine_chunks() for c in ("prompt", "chosen", "rejected"))
    n = len(prompt)
    words = [word_hashes(prepare(col, reader_text_lower), "space_lower")
             for col in (prompt, chosen, rejected)]
    halves = []
    for salts in _SALTS:
        k = np.zeros(n, dtype=np.uint64)
        for w, salt in zip(words, salts + (salts[0] ^ salts[1],)):
            k = mix64(k ^ row_hashes(w, salt))
        halves.append(k)
    keys = ((halves[0].astype(object) << 64) | halves[1].astype(object)).tolist() if n else []
    c_words, r_words = words[1].counts, words[2].counts
    empty = (c_words == 0) | (r_words == 0)
    # identical: same lower-cased words is necessary; confirm case-sensitively on the text
    same = (c_words == r_words) & (row_hashes(words[1], 7) == row_hashes(words[2], 7))
    identical = np.zeros(n, dtype=bool)
    cand = np.flatnonzero(same)
    if len(cand):
        idx = pa.array(cand)
        identical[cand] = np.asarray(pc.equal(reader_text(chosen.take(idx)),
                                              reader_text(rejected.take(idx))), dtype=bool)
    word_diff = c_words - r_words
    sc = np.asarray(t.column("score_chosen").combine_chunks().fill_null(np.nan), dtype=np.float64)
    sr = np.asarray(t.column("score_rejected").combine_chunks().fill_null(np.nan), dtype=np.float64)
    hits: list[Hit] = []
    if index is not None and n:
        hits = index.scan_fields([prompt, chosen, rejected])
    return _Analysis(block, keys, identical, empty, word_diff, sc, sr, hits)


def check_clean_target(source: PairSource, out: str | Path,
                       protect: list[str | Path] = ()) -> Path:
    """Refuse a ``write_clean`` path that would destroy data or cannot be written.

    Refused (:class:`InputError` naming the path): the input itself, a symlink or hard
    link to it, a path inside an input folder, one of ``protect`` (the evaluation sets);
    an existing folder (unless the input is a saved dataset and the folder is one too);
    anything that is not a regular file (a device such as /dev/full, a FIFO, a socket);
    a path whose nearest existing parent is not a folder or is not writable.
    """
    out = Path(out)
    name = str(out)

    def same(a: Path, b: Path) -> bool:
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False

    dst = out.resolve()
    if source.format != "hub":
        src = source.path.resolve()
        if dst == src or same(out, source.path):
            raise InputError("--write-clean would overwrite the input; write the clean "
                             "pairs to another path", file=name)
        if source.path.is_dir() and dst.is_relative_to(src):
            raise InputError("--write-clean is inside the input folder; write the clean "
                             "pairs elsewhere", file=name)
    for p in protect:
        if Path(p).exists() and (dst == Path(p).resolve() or same(out, Path(p))):
            raise InputError(f"--write-clean would overwrite the evaluation set {p}",
                             file=name)
    if out.exists():
        mode = os.stat(out).st_mode
        if stat.S_ISDIR(mode):
            saved = any((out / f).exists() for f in ("dataset_info.json", "dataset_dict.json",
                                                     "state.json"))
            if source.format not in ("dataset", "hub") or not saved:
                raise InputError("is a folder; --write-clean needs a file path"
                                 if source.format not in ("dataset", "hub") else
                                 "is a folder that is not a saved dataset; it would be "
                                 "replaced: give a new path", file=name)
        elif not stat.S_ISREG(mode):
            raise InputError("is not a regular file (a device, FIFO or socket); "
                             "--write-clean needs a file path", file=name)
    parent = dst.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create the folder: {parent} is not a folder", file=name)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write: the folder {parent} is not writable", file=name)
    return out


def _write_error(e: OSError, out: Path) -> InputError:
    why = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EISDIR: "is a folder"}.get(e.errno or 0, e.strerror or str(e))
    return InputError(f"cannot write the clean pairs: {why}", file=str(out))


class CleanWriter:
    """Writes kept rows in the input's format to a temporary path; ``commit`` renames.

    Folders it had to create are removed again by :meth:`abort`; a write that fails
    (full disk, read-only file system, ...) raises :class:`InputError` naming ``out``.
    """

    def __init__(self, source: PairSource, out: Path) -> None:
        self.source, self.out = source, Path(out)
        self.fmt = source.format
        self._objects: list[Any] = []
        self._tables: list[pa.Table] = []
        self._pq: Any = None
        self._fh: Any = None
        self.tmp: Path | None = None
        self._made: list[Path] = []  # folders this writer created, deepest first
        parent = self.out.parent
        while not parent.exists():
            self._made.append(parent)
            parent = parent.parent
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = temp_sibling(self.out, directory=self.fmt in ("dataset", "hub"))
            self._fh = open(self.tmp, "wb") if self.fmt == "jsonl" else None
        except OSError as e:
            self.abort()
            raise _write_error(e, self.out) from None

    def write(self, block: PairBlock, keep: np.ndarray) -> None:
        try:
            self._write(block, keep)
        except OSError as e:
            raise _write_error(e, self.out) from None

    def _write(self, block: PairBlock, keep: np.ndarray) -> None:
        if self.fmt == "jsonl":
            if block.raw_data is not None and keep.all():
                data = block.raw_data
                self._fh.write(data if data.endswith(b"\n") else data + b"\n")
                return
            assert block.raw_lines is not None
            lines = [ln for ln, k in zip(block.raw_lines, keep) if k]
            if lines:
                self._fh.write(b"\n".join(lines) + b"\n")
        elif self.fmt == "json":
            assert block.raw_objects is not None
            self._objects.extend(o for o, k in zip(block.raw_objects, keep) if k)
        else:
            assert block.raw_table is not None
            kept = block.raw_table.filter(pa.array(keep, pa.bool_()))
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                if self._pq is None:
                    self._pq = pq.ParquetWriter(self.tmp, kept.schema)
                self._pq.write_table(kept)
            else:
                self._tables.append(kept)

    def commit(self) -> None:
        try:
            self._commit()
        except OSError as e:
            raise _write_error(e, self.out) from None

    def _commit(self) -> None:
        assert self.tmp is not None
        if self.fmt == "jsonl":
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        elif self.fmt == "json":
            with open(self.tmp, "w", encoding="utf-8") as fh:
                json.dump(self._objects, fh, ensure_ascii=False)
        elif self.fmt == "parquet":
            if self._pq is None:
                import pyarrow.parquet as pq

                pq.write_table(self.source._arrow_schema().empty_table(), self.tmp)
            else:
                self._pq.close()
        else:
            import datasets

            table = pa.concat_tables(self._tables) if self._tables else None
            ds = datasets.Dataset(table) if table is not None else datasets.Dataset.from_dict({})
            shutil.rmtree(self.tmp)
            ds.save_to_disk(str(self.tmp))
        replace_into(self.tmp, self.out)

    def abort(self) -> None:
        if self._fh is not None and not self._fh.closed:
            try:
                self._fh.close()
            except OSError:
                pass
        if self._pq is not None:
            try:
                self._pq.close()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        if self.tmp is not None:
            discard(self.tmp)
        for d in self._made:  # deepest first; only folders left empty
            try:
                d.rmdir()
            except OSError:
                break


def _prefetch(blocks: Iterator[PairBlock], index: NgramIndex | None, workers: int = 2
              ) -> Iterator[_Analysis]:
    """Analyse blocks on a thread pool, yielding results in input order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[Any] = []
        for block in blocks:
            pending.append(pool.submit(_analyse, block, index))
            if len(pending) > workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def validate_file(
    path: str | Path,
    *,
    eval_sets: list[str | Path | EvalSet] | None = None,
    eval_field: str | None = None,
    benchmarks: list[str] | None = None,
    thresholds: Thresholds | None = None,
    score_scale: str = "auto",
    gap_min_coverage: float | None = None,
    decontam: DecontamConfig | None = None,
    skip_bad_rows: bool = False,
    write_clean: str | Path | None = None,
    split: str | None = None,
    progress: Progress | None = None,
    block_bytes: int | None = None,
) -> StageVerdict:
    """Validate a preference-data file and return the stage-2 verdict.

    ``eval_sets``: evaluation files (or :class:`EvalSet` objects); ``benchmarks``: names
    of the benchmarks the model will be evaluated on (shipped ``realign_*`` suites or
    lm-eval tasks, :func:`realign.decontamination.load_benchmarks`); the pairs are
    decontaminated against both, and each hit names its set. ``score_scale``: ``LO-HI``
    or ``auto`` (a scale only when the scores leave no doubt,
    :func:`realign.metrics.infer_scale`). ``gap_min_coverage``: least share of usable
    pairs with both scores for the gap to be measured (default
    :data:`realign.gates.GAP_MIN_COVERAGE`).

    Raises :class:`InputError` on bad input; nothing is written then.
    """
    thresholds = thresholds or Thresholds()
    scale = parse_scale(score_scale)
    min_cov = GAP_MIN_COVERAGE if gap_min_coverage is None else float(gap_min_coverage)
    if not 0 < min_cov <= 1:
        raise ValueError(f"gap_min_coverage must be in (0, 1], got {gap_min_coverage}")
    sets = [s if isinstance(s, EvalSet) else load_eval_set(s, eval_field) for s in eval_sets or []]
    n_files = len(sets)
    bench_sets, unchecked = load_benchmarks(benchmarks or [])
    sets += bench_sets
    index = NgramIndex(sets, decontam or DecontamConfig()) if sets else None
    source = PairSource(path, split=split, skip_bad_rows=skip_bad_rows,
                        **({"block_bytes": block_bytes} if block_bytes else {}))
    writer = None
    if write_clean:
        target = check_clean_target(source, write_clean,
                                    [s for s in eval_sets or [] if not isinstance(s, EvalSet)])
        writer = CleanWriter(source, target)

    seen: set[int] = set()
    findings: dict[str, list[Any]] = {
        "duplicates": [], "identical": [], "empty": [], "contaminated": [], "malformed": [],
    }
    hit_details: list[dict[str, Any]] = []
    by_set: dict[str, int] = {s.name: 0 for s in sets}
    parsed = usable = contaminated = 0
    lengths = RunningDiff()
    scores = RunningDiff()
    s_lo, s_hi = np.inf, -np.inf
    scored = 0
    negative: list[int] = []  # lines whose chosen is scored below rejected
    done = 0
    try:
        for a in _prefetch(source.blocks(), index):
            block = a.block
            lines = np.asarray(block.table.column("line").combine_chunks(), dtype=np.int64)
            n = len(lines)
            parsed += n
            findings["malformed"].extend(
                {"line": b.line, "field": b.field, "error": b.message} for b in block.bad)
            dup = np.zeros(n, dtype=bool)
            for i, k in enumerate(a.keys):
                if k in seen:
                    dup[i] = True
                else:
                    seen.add(k)
            cont = np.zeros(n, dtype=bool)
            for h in a.hits:
                cont[h.doc] = True
                by_set[h.eval_set] += 1
                if len(hit_details) < MAX_HIT_DETAILS:
                    detail = {"line": int(lines[h.doc]), "eval_set": h.eval_set,
                              "eval_line": h.item_line, "coverage": round(h.coverage, 4),
                              "method": h.method}
                    if h.item_id is not None:
                        detail["eval_id"] = h.item_id
                    hit_details.append(detail)
            contaminated += int(cont.sum())
            findings["duplicates"].extend(lines[dup].tolist())
            findings["identical"].extend(lines[a.identical].tolist())
            findings["empty"].extend(lines[a.empty].tolist())
            findings["contaminated"].extend(lines[cont].tolist())
            keep = ~(dup | a.identical | a.empty | cont)
            usable += int(keep.sum())
            lengths.update(a.word_diff[keep])
            for name, col in (("score_chosen", a.score_c), ("score_rejected", a.score_r)):
                present = ~np.isnan(col)
                if not present.any():
                    continue
                if scale is not None:
                    out = present & ((col < scale[0]) | (col > scale[1]))
                    if out.any():
                        i = int(np.argmax(out))
                        raise InputError(
                            f"score {col[i]:g} is outside the declared scale "
                            f"{scale[0]:g}-{scale[1]:g}", file=str(path), line=int(lines[i]),
                            field=name)
                s_lo = min(s_lo, float(col[present].min()))
                s_hi = max(s_hi, float(col[present].max()))
            has = keep & ~np.isnan(a.score_c) & ~np.isnan(a.score_r)
            if has.any():
                scored += int(has.sum())
                scores.update(a.score_c[has] - a.score_r[has])
                negative.extend(lines[has & (a.score_c < a.score_r)].tolist())
            if writer:
                writer.write(block, keep)
            done += block.bytes_read
            if progress:
                progress(done, source.total_bytes)
        if writer:
            writer.commit()
    except BaseException:
        if writer:
            writer.abort()
        raise

    gates = [thresholds.evaluate(
        "min_pairs", float(usable),
        detail=f"{usable} usable of {parsed + len(findings['malformed'])} rows")]
    # what the remedies name: the data, the lines to drop, the sets not checked
    remedy = {"data": str(path), "negative_lines": negative, "negative_source": "the data's",
              "contaminated_lines": findings["contaminated"],
              "unchecked": list(unchecked), "coverage": min_cov}
    gap_gate, gap_findings = _gap_gate(thresholds.with_context(**remedy), scores, usable, scored,
                                       scale, score_scale, s_lo, s_hi, min_cov,
                                       source.has_scores)
    gap_findings["negative_lines"] = negative
    gates.append(gap_gate)
    decon_gate, decon_findings, warnings = _decontamination_gate(
        thresholds.with_context(**remedy), index, sets, n_files, unchecked, by_set,
        contaminated, parsed)
    gates.append(decon_gate)

    lb = length_bias(lengths)
    gates.append(thresholds.evaluate(
        "length_bias", lb.chosen_longer_share, remedy_context={"pairs": lb.pairs},
        detail=("unmeasured: no usable pairs" if lb.pairs == 0 else
                f"chosen has more words in {lb.chosen_longer_share:.1%} of {lb.pairs} pairs; "
                f"mean word difference {lb.mean_word_diff:+.1f}, effect size d_z "
                f"{lb.effect_size_dz:+.2f}")))

    out_findings: dict[str, Any] = dict(findings)
    out_findings["contamination"] = {
        "by_eval_set": by_set, "hits": hit_details,
        "hits_truncated": contaminated > len(hit_details), **decon_findings,
    }
    out_findings["preference_gap"] = gap_findings
    out_findings["length"] = lb.model_dump()
    out_findings["counts"] = {
        "rows": parsed + len(findings["malformed"]), "parsed": parsed, "usable": usable,
        **{k: len(v) for k, v in findings.items()},
    }
    artifacts: dict[str, Any] = {"input": str(path), "format": source.format,
                                 "style": source.style, "implicit_prompt": source.implicit_prompt}
    if write_clean:
        artifacts["clean"] = str(write_clean)
    return make_verdict(STAGE_NAME, gates, thresholds, out_findings, artifacts, warnings)


def _gap_gate(thresholds: Thresholds, scores: RunningDiff, usable: int, scored: int,
              scale: tuple[float, float] | None, scale_spec: str, s_lo: float, s_hi: float,
              min_cov: float, has_fields: bool) -> tuple[Any, dict[str, Any]]:
    """The ``preference_gap`` gate from explicit scores, and ``findings.preference_gap``.

    Measured only when the scale is declared or beyond doubt and at least ``min_cov`` of
    the usable pairs carry both scores; otherwise ``unmeasured`` saying why and how to
    measure it.
    """
    observed = None if scored == 0 and s_lo > s_hi else [s_lo, s_hi]
    if scale is not None:
        used, source = scale, "declared"
    else:
        used = infer_scale(s_lo, s_hi) if s_lo <= s_hi else None
        source = "inferred" if used is not None else None
    share = scored / usable if usable else None
    info: dict[str, Any] = {
        "scored_pairs": scored, "usable_pairs": usable,
        "coverage": None if share is None else round(share, 6), "min_coverage": min_cov,
        "scale": None if used is None else [used[0], used[1]], "scale_source": source,
        "scale_declared": scale_spec if scale is not None else None,
        "observed_range": observed,
    }
    measure = ("; score the pairs (explicit scores, or a reward model: `realign validate "
               "--reward-model`, stage 4 in a run) to measure it")
    declare = ("declare the scale: --score-scale LO-HI (realign validate) or score_scale: "
               "LO-HI in the run config")
    if usable == 0:
        return thresholds.evaluate("preference_gap", None,
                                   detail="unmeasured: no usable pairs"), info
    if scored == 0:
        why = ("no score_chosen/score_rejected fields" if not has_fields
               else "no usable pair has both scores")
        return thresholds.evaluate("preference_gap", None,
                                   detail=f"unmeasured: {why}{measure}"), info
    reasons = []
    if share is not None and share < min_cov:
        reasons.append(f"only {scored} of {usable} usable pairs ({share:.1%}) have both scores, "
                       f"under the {min_cov:.0%} needed (gap_min_coverage); score the others "
                       "or lower gap_min_coverage")
    if used is None:
        reasons.append(f"scores span [{s_lo:g}, {s_hi:g}], which does not settle the scale "
                       "(auto reads a scale only when the lowest and highest scores are its "
                       f"two ends: {', '.join(f'{a:g}-{b:g}' for a, b in STANDARD_SCALES)}); "
                       + declare)
    if reasons:
        return thresholds.evaluate("preference_gap", None,
                                   detail="unmeasured: " + "; ".join(reasons)), info
    assert used is not None
    gap, ci = preference_gap(scores, used)
    how = "declared" if source == "declared" else (
        f"inferred: the scores reach both ends, {s_lo:g} and {s_hi:g}")
    unscored = usable - scored
    detail = (f"{scored} scored pairs"
              + (f" of {usable} usable ({share:.1%}; {unscored} without both scores left out)"
                 if unscored else "")
              + f", scale {used[0]:g}-{used[1]:g} ({how}), "
              f"s = (x - {used[0]:g}) / {used[1] - used[0]:g}")
    return thresholds.evaluate("preference_gap", gap, ci95=ci, detail=detail), info


def _decontamination_gate(thresholds: Thresholds, index: NgramIndex | None, sets: list[EvalSet],
                          n_files: int, unchecked: dict[str, str], by_set: dict[str, int],
                          contaminated: int, parsed: int
                          ) -> tuple[Any, dict[str, Any], list[str]]:
    """The ``decontamination`` gate: measured only when some evaluation item was checked.

    The detail names every evaluation set with its hits, how many items each method
    checked (n-gram coverage, whole short items, exact match of a text or sentence), and
    the benchmarks that could not be checked, with why.
    """
    methods = dict(index.method_counts) if index is not None else {}
    info: dict[str, Any] = {
        "sets": [{"name": s.name, "kind": "file" if i < n_files else "benchmark",
                  "items": len(s.texts)} for i, s in enumerate(sets)],
        "items_checked": {**methods, "not_checkable": index.skipped_items if index else 0},
        "unchecked_benchmarks": [{"name": k, "reason": v} for k, v in unchecked.items()],
    }
    warnings = [f"benchmark {k} was not checked for contamination: {v}"
                for k, v in unchecked.items()]
    not_checked = "".join(f"; not checked: {k} ({v})" for k, v in unchecked.items())
    checked = index.n_checked if index is not None else 0
    if index is None and not unchecked:
        return thresholds.evaluate(
            "decontamination", None,
            detail="unmeasured: no evaluation sets given (pass --eval FILE or --benchmark "
                   "NAME; in a run, eval_sets and sft.benchmarks)"), info, warnings
    if checked == 0:
        skipped = (f"{index.skipped_items} items have no words to compare"
                   if index is not None else "no evaluation items")
        return thresholds.evaluate(
            "decontamination", None,
            detail=f"unmeasured: no evaluation item could be checked ({skipped})"
                   + not_checked), info, warnings
    assert index is not None
    per_set = ", ".join(f"{_short(k)}: {v}" for k, v in by_set.items())
    how = [f"{methods['ngram']} by n-gram coverage"]
    if methods["whole"]:
        how.append(f"{methods['whole']} whole (fewer than {index.config.ngram} words)")
    if methods["exact"]:
        how.append(f"{methods['exact']} by exact match of a text or sentence (under "
                   f"{index.config.min_item_words} words, or only template n-grams)")
    skipped = f"; {index.skipped_items} items have no words to compare"         if index.skipped_items else ""
    rate = decontamination_rate(contaminated, parsed)
    return thresholds.evaluate(
        "decontamination", rate,
        detail=f"{contaminated} of {parsed} pairs contain an evaluation item ({per_set}); "
               f"{checked} items checked: {', '.join(how)}{skipped}{not_checked}"
    ), info, warnings


def _short(name: str) -> str:
    """An evaluation file by its file name; a benchmark by its name."""
    return Path(name).name if ("/" in name or "\\" in name) else name


def validate_rows(rows: list[dict[str, Any]], **kwargs: Any) -> StageVerdict:
    """Validate in-memory rows (written to a temporary JSONL file first)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "pairs.jsonl"
        with open(p, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        verdict = validate_file(p, **kwargs)
    verdict.artifacts["input"] = "<rows>"
    return verdict
