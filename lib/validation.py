"""Stage 2 validation engine: stream a preference file once, compute every gate.

What makes a pair unusable (docs/quality-thresholds.md#definitions), each listed by line number:

* ``malformed``: rows that could not be parsed (only with ``skip_bad_rows``; by
  default the first one stops the run with exit code 2);
* ``duplicates``: a row whose (prompt, chosen, rejected), compared after lower-casing
  and collapsing whitespace, repeats an earlier row (the first occurrence is kept).
  Rows are compared by a 128-bit hash of their three lower-cased word sequences
  (:mod:`realign.text_hash`), so memory stays small on millions of rows;
* ``identical``: chosen equals rejected after collapsing whitespace (case counts);
* ``empty``: chosen or rejected is empty or whitespace only;
* ``contaminated``: the pair contains an evaluation item (see
  :mod:`realign.decontamination`).

Whitespace is ASCII whitespace (space, tab, newline, CR, vertical tab, form feed);
a word, for length bias, is a run of non-whitespace characters.

Bad rows: by default the first malformed row stops the run (exit code 2, nothing
written); ``skip_bad_rows=True`` (CLI ``--skip-bad-rows``) skips them, counts them
(``findings.counts.malformed``) and lists each under ``findings.malformed`` with its line,
field and error.

Gates: ``min_pairs`` (usable count), ``preference_gap`` (explicit scores only, else
``unmeasured``; pairs with a null score are left out of it), ``decontamination`` (over
all parsed pairs; ``unmeasured`` without evaluation sets), ``length_bias`` (over usable
pairs). Work runs on two threads: Arrow
and NumPy release the GIL, so parsing and scanning of consecutive blocks overlap.
"""

from __future__ import annotations

import json
import shutil
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
from .decontamination import DecontamConfig, EvalSet, Hit, NgramIndex, load_eval_set
from .errors import InputError
from .fileio import discard, replace_into, temp_sibling
from .gates import StageVerdict, Thresholds, make_verdict
from .metrics import (
    RunningDiff,
    decontamination_rate,
    infer_scale,
    length_bias,
    parse_scale,
    preference_gap,
)
from .text_hash import mix64, prepare, row_hashes, word_hashes

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


def _collapse_ws(col: pa.Array) -> pa.Array:
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(col, r"[ \t\n\v\f\r]+", " "))


def _lower_unicode(col: pa.Array) -> pa.Array:
    return pc.utf8_lower(col)


#: Salts of the two 64-bit halves of a duplicate key, and per field.
_SALTS = ((0x5851F42D4C957F2D, 0x14057B7EF767814F), (0x2545F4914F6CDD1D, 0x9E3779B97F4A7C15))


def _analyse(block: PairBlock, index: NgramIndex | None) -> _Analysis:
    """Per-block work (runs on a worker thread; NumPy and Arrow release the GIL).

    Words here are runs of non-whitespace (ASCII whitespace: space, \\t \\n \\v \\f \\r).
    Duplicate key: two 64-bit hashes of the lower-cased word sequences of prompt, chosen
    and rejected. ``identical``: chosen and rejected have the same words, case included
    (candidates from the hashes, confirmed on the text). ``empty``: no words.
    """
    t = block.table
    prompt, chosen, rejected = (t.column(c).combine_chunks() for c in ("prompt", "chosen", "rejected"))
    n = len(prompt)
    words = [word_hashes(prepare(col, _lower_unicode), "space_lower")
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
        identical[cand] = np.asarray(pc.equal(_collapse_ws(chosen.take(idx)),
                                              _collapse_ws(rejected.take(idx))), dtype=bool)
    word_diff = c_words - r_words
    sc = np.asarray(t.column("score_chosen").combine_chunks().fill_null(np.nan), dtype=np.float64)
    sr = np.asarray(t.column("score_rejected").combine_chunks().fill_null(np.nan), dtype=np.float64)
    hits: list[Hit] = []
    if index is not None and n:
        hits = index.scan_fields([prompt, chosen, rejected])
    return _Analysis(block, keys, identical, empty, word_diff, sc, sr, hits)


class CleanWriter:
    """Writes kept rows in the input's format to a temporary path; ``commit`` renames."""

    def __init__(self, source: PairSource, out: Path) -> None:
        self.source, self.out = source, out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.fmt = source.format
        self._objects: list[Any] = []
        self._tables: list[pa.Table] = []
        self._pq: Any = None
        self.tmp = temp_sibling(out, directory=self.fmt in ("dataset", "hub"))
        self._fh = open(self.tmp, "wb") if self.fmt == "jsonl" else None

    def write(self, block: PairBlock, keep: np.ndarray) -> None:
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
        if self.fmt == "jsonl":
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
        if self.fmt == "jsonl" and self._fh and not self._fh.closed:
            self._fh.close()
        if self._pq is not None:
            try:
                self._pq.close()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        discard(self.tmp)


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
    thresholds: Thresholds | None = None,
    score_scale: str = "auto",
    decontam: DecontamConfig | None = None,
    skip_bad_rows: bool = False,
    write_clean: str | Path | None = None,
    split: str | None = None,
    progress: Progress | None = None,
    block_bytes: int | None = None,
) -> StageVerdict:
    """Validate a preference-data file and return the stage-2 verdict.

    Raises :class:`InputError` on bad input; nothing is written then.
    """
    thresholds = thresholds or Thresholds()
    scale = parse_scale(score_scale)
    sets = [s if isinstance(s, EvalSet) else load_eval_set(s, eval_field) for s in eval_sets or []]
    index = NgramIndex(sets, decontam or DecontamConfig()) if sets else None
    source = PairSource(path, split=split, skip_bad_rows=skip_bad_rows,
                        **({"block_bytes": block_bytes} if block_bytes else {}))
    writer = CleanWriter(source, Path(write_clean)) if write_clean else None

    seen: set[int] = set()
    findings: dict[str, list[Any]] = {
        "duplicates": [], "identical": [], "empty": [], "contaminated": [], "malformed": [],
    }
    hit_details: list[dict[str, Any]] = []
    by_set: dict[str, int] = {s.name: 0 for s in sets}
    parsed = usable = contaminated = 0
    lengths = RunningDiff()
    scores = RunningDiff()
    s_lo, s_hi, scored = np.inf, -np.inf, 0
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
                    hit_details.append({"line": int(lines[h.doc]), "eval_set": h.eval_set,
                                        "eval_line": h.item_line,
                                        "coverage": round(h.coverage, 4)})
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

    # preference gap from explicit scores
    if scored == 0:
        why = ("no score_chosen/score_rejected fields" if not source.has_scores
               else "no usable pair has both scores")
        gates.append(thresholds.evaluate(
            "preference_gap", None,
            detail=f"unmeasured: {why}; score the pairs (explicit scores, a verifier, or "
                   "a reward model) to measure it"))
    else:
        used = scale or infer_scale(s_lo, s_hi)
        if used is None:
            gates.append(thresholds.evaluate(
                "preference_gap", None,
                detail=f"unmeasured: scores span [{s_lo:g}, {s_hi:g}], outside every standard "
                       "scale; pass --score-scale LO-HI"))
        else:
            gap, ci = preference_gap(scores, used)
            how = "declared" if scale else f"inferred from scores in [{s_lo:g}, {s_hi:g}]"
            unscored = usable - scored
            gates.append(thresholds.evaluate(
                "preference_gap", gap, ci95=ci,
                detail=f"{scored} scored pairs"
                       + (f" ({unscored} usable pairs without scores left out)" if unscored else "")
                       + f", scale {used[0]:g}-{used[1]:g} ({how}), "
                       f"s = (x - {used[0]:g}) / {used[1] - used[0]:g}"))

    rate = decontamination_rate(contaminated, parsed)
    if index is None:
        gates.append(thresholds.evaluate(
            "decontamination", None,
            detail="unmeasured: no evaluation sets given (pass --eval FILE)"))
    else:
        assert index is not None
        per_set = ", ".join(f"{Path(k).name}: {v}" for k, v in by_set.items())
        skipped = (f"; {index.skipped_items} items too short to check"
                   if index.skipped_items else "")
        gates.append(thresholds.evaluate(
            "decontamination", rate,
            detail=f"{contaminated} of {parsed} pairs contain an evaluation item ({per_set}); "
                   f"{index.n_checked} items checked{skipped}"))

    lb = length_bias(lengths)
    gates.append(thresholds.evaluate(
        "length_bias", lb.chosen_longer_share,
        detail=("unmeasured: no usable pairs" if lb.pairs == 0 else
                f"chosen has more words in {lb.chosen_longer_share:.1%} of {lb.pairs} pairs; "
                f"mean word difference {lb.mean_word_diff:+.1f}, effect size d_z "
                f"{lb.effect_size_dz:+.2f}")))

    out_findings: dict[str, Any] = dict(findings)
    out_findings["contamination"] = {
        "by_eval_set": by_set, "hits": hit_details,
        "hits_truncated": contaminated > len(hit_details),
    }
    out_findings["length"] = lb.model_dump()
    out_findings["counts"] = {
        "rows": parsed + len(findings["malformed"]), "parsed": parsed, "usable": usable,
        **{k: len(v) for k, v in findings.items()},
    }
    artifacts: dict[str, Any] = {"input": str(path), "format": source.format,
                                 "style": source.style, "implicit_prompt": source.implicit_prompt}
    if write_clean:
        artifacts["clean"] = str(write_clean)
    return make_verdict(STAGE_NAME, gates, thresholds, out_findings, artifacts)


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
