"""Decontamination: find training examples that contain an evaluation item.

The rule (documented in docs/preference-data-generation.md; defaults in
:class:`DecontamConfig`):

1. **Normalize** both sides the same way: Unicode NFKC, lower case, every run of
   characters that are not letters or digits becomes one space, split on spaces. Case,
   punctuation and whitespace edits therefore vanish.
2. **Index** every evaluation item by its word n-grams (``ngram`` words, default 3).
   An n-gram found in more than ``max_item_df`` items of the same evaluation set is
   template text ("which of the following") and is not indexed.
3. **Coverage** of item *e* by training example *x*: the share of *e*'s coverable
   words (words inside at least one indexed n-gram of *e*) that lie inside an n-gram
   *x* shares with *e*::

       coverage(e, x) = |∪ {positions of g in e : g ∈ G(e) ∩ G(x)}| / |coverable(e)|

   *x* is contaminated by *e* when ``coverage >= min_coverage`` (default 0.75).
   A verbatim or embedded copy covers 1.0. Changing *k* words leaves every word
   outside a window of ``ngram - 1`` around each change covered, so two or three
   changed words in a 20-word item still cover ≥ 0.75 in typical placements, while
   unrelated text on the same topic shares a few common trigrams and stays low.
4. Items with fewer than ``ngram`` words (but at least ``min_item_words``) match only
   as a whole: every word, in order.

An example is a whole preference pair: its prompt, chosen and rejected texts joined.

Implementation: Arrow compute kernels normalize and split text, Arrow hash tables
look up word ids and n-gram hashes, NumPy does the window arithmetic. No per-word
Python. (We deliberately don't use a MinHash/LSH library: those estimate Jaccard
similarity of whole documents, which misses a short item embedded in a long prompt.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from .errors import InputError

#: Fields looked for, in this order, when an evaluation set row names no text field.
DEFAULT_EVAL_FIELDS: tuple[str, ...] = (
    "prompt", "question", "text", "input", "problem", "instruction", "query",
    "content", "sentence", "context", "messages",
)

_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio)


class DecontamConfig(BaseModel):
    """Decontamination parameters. Defaults are the documented rule."""

    ngram: int = Field(3, ge=2, le=13, description="words per n-gram")
    min_coverage: float = Field(0.75, gt=0, le=1,
                                description="share of an item's words that must be covered")
    max_item_df: int = Field(20, ge=1,
                             description="n-grams in more items than this are template text")
    min_item_words: int = Field(3, ge=1, description="shorter items are not checked")


def normalize_text(texts: pa.Array) -> pa.Array:
    """NFKC, lower case, non-alphanumeric runs -> one space (Arrow kernels)."""
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        texts = pc.cast(texts, pa.string())
    t = pc.utf8_normalize(texts, "NFKC")
    t = pc.utf8_lower(t)
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(t, r"[^\pL\pN]+", " "))


def words_of(texts: pa.Array) -> pa.ListArray:
    """Normalized words per text (list<string>)."""
    return pc.utf8_split_whitespace(normalize_text(texts))


def _hash_windows(ids: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of ids[s:s+n] for each start s (uint64 wrap-around arithmetic)."""
    h = np.zeros(len(starts), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _MULT + ids[starts + k].astype(np.uint64) + np.uint64(1)
    return h


@dataclass
class EvalSet:
    """An evaluation set: items (raw text) and where each came from (1-based line)."""

    name: str
    texts: list[str]
    lines: list[int]


def load_eval_set(path: str | Path, field: str | None = None) -> EvalSet:
    """Read evaluation items from JSONL/JSON/Parquet/text files or a saved dataset.

    ``field`` names the text field; by default the first of :data:`DEFAULT_EVAL_FIELDS`
    present in the row is used. A ``messages``/list field uses the messages' contents.
    Plain text files (``.txt`` or anything not JSON/Parquet): one item per non-empty line.
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise InputError("evaluation set not found", file=name)
    rows: list[tuple[int, Any]] = []
    suffix = p.suffix.lower()
    if p.is_dir() or suffix == ".parquet":
        if p.is_dir():
            try:
                import datasets
            except ImportError:
                raise InputError("reading a saved dataset needs `pip install datasets`",
                                 file=name) from None
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["test"] if "test" in ds else ds[list(ds)[0]]
            table = ds.data.table
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(p)
        rows = list(enumerate(table.to_pylist(), start=1))
    elif suffix in (".jsonl", ".json", ".ndjson"):
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InputError("invalid UTF-8", file=name,
                             line=raw.count(b"\n", 0, e.start) + 1) from None
        if text.lstrip().startswith("["):
            try:
                rows = list(enumerate(json.loads(text), start=1))
            except json.JSONDecodeError as e:
                raise InputError(f"malformed JSON: {e.msg}", file=name, line=e.lineno) from None
        else:
            for i, ln in enumerate(text.split("\n"), start=1):
                if ln.strip():
                    try:
                        rows.append((i, json.loads(ln)))
                    except json.JSONDecodeError as e:
                        raise InputError(f"malformed JSON: {e.msg}", file=name, line=i) from None
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError("invalid UTF-8 (text evaluation sets are one item per line)",
                             file=name) from None
        rows = [(i, ln) for i, ln in enumerate(text.split("\n"), start=1) if ln.strip()]
    texts, lines = [], []
    for line, row in rows:
        texts.append(_item_text(row, field, name, line))
        lines.append(line)
    if not texts:
        raise InputError("evaluation set is empty", file=name)
    return EvalSet(name=name, texts=texts, lines=lines)


def _item_text(row: Any, field: str | None, file: str, line: int) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise InputError("expected an object or a string per item", file=file, line=line)
    if field is not None:
        if field not in row:
            raise InputError(f"missing field (found: {', '.join(row)})", file=file, line=line,
                             field=field)
        value = row[field]
    else:
        key = next((k for k in DEFAULT_EVAL_FIELDS if k in row), None)
        if key is None:
            raise InputError(
                f"no text field; pass --eval-field (looked for: {', '.join(DEFAULT_EVAL_FIELDS)})",
                file=file, line=line)
        value = row[key]
    if isinstance(value, list):
        value = "\n".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in value)
    if not isinstance(value, str):
        value = str(value)
    return value


@dataclass
class Hit:
    """Example ``doc`` (index within the scanned batch) contains item ``item``."""

    doc: int
    eval_set: str
    item_line: int
    coverage: float


@dataclass
class _Table:
    """One gram length: sorted-unique hashes and a CSR posting list (item, position)."""

    n: int
    hashes: pa.Array  # uint64, hash -> row via pc.index_in
    ptr: np.ndarray
    item: np.ndarray
    pos: np.ndarray


@dataclass
class NgramIndex:
    """The evaluation items, indexed for fast containment scans of many documents."""

    sets: list[EvalSet]
    config: DecontamConfig = field(default_factory=DecontamConfig)

    def __post_init__(self) -> None:
        cfg = self.config
        self.item_set: list[int] = []
        self.item_line: list[int] = []
        all_texts: list[str] = []
        for s_idx, s in enumerate(self.sets):
            all_texts.extend(s.texts)
            self.item_set.extend([s_idx] * len(s.texts))
            self.item_line.extend(s.lines)
        self.n_items = len(all_texts)
        word_lists = words_of(pa.array(all_texts, pa.string())).to_pylist()
        vocab: dict[str, int] = {}
        item_ids = [[vocab.setdefault(w, len(vocab)) for w in ws] for ws in word_lists]
        self.vocab = pa.array(list(vocab), pa.string())
        self.skipped_items = 0
        n = cfg.ngram
        by_len: dict[int, list[tuple[int, int, int]]] = {}  # length -> (hash-input, item, pos)
        # postings for full n-grams, with per-set document frequency
        grams: dict[int, list[tuple[int, int]]] = {}
        self.coverable = np.zeros(self.n_items, dtype=np.int64)
        self.item_len = np.array([len(x) for x in item_ids], dtype=np.int64)
        for it, ids in enumerate(item_ids):
            m = len(ids)
            if m < cfg.min_item_words:
                self.skipped_items += 1
                continue
            arr = np.asarray(ids, dtype=np.int64)
            if m < n:
                h = int(_hash_windows(arr, np.array([0]), m)[0])
                by_len.setdefault(m, []).append((h, it, 0))
                continue
            hs = _hash_windows(arr, np.arange(m - n + 1), n)
            seen: set[int] = set()
            for pos, h in enumerate(hs.tolist()):
                if h in seen:
                    continue
                seen.add(h)
                grams.setdefault(h, []).append((it, pos))
        tables: list[_Table] = []
        kept: dict[int, list[tuple[int, int]]] = {}
        for h, posts in grams.items():
            per_set: dict[int, int] = {}
            for it, _ in posts:
                per_set[self.item_set[it]] = per_set.get(self.item_set[it], 0) + 1
            if max(per_set.values()) > cfg.max_item_df:
                continue
            kept[h] = posts
        tables.append(self._build(n, kept, all_positions=True))
        for m, entries in sorted(by_len.items()):
            d: dict[int, list[tuple[int, int]]] = {}
            for h, it, pos in entries:
                d.setdefault(h, []).append((it, pos))
            tables.append(self._build(m, d, all_positions=False))
        self.tables = [t for t in tables if len(t.hashes)]
        self.n_checked = self.n_items - self.skipped_items
        # items whose every n-gram was template text cannot be checked either
        no_cover = (self.coverable == 0) & (self.item_len >= cfg.min_item_words)
        self.skipped_items += int(no_cover.sum())
        self.n_checked = self.n_items - self.skipped_items
        self.coverable = np.maximum(self.coverable, 1)

    def _build(self, n: int, postings: dict[int, list[tuple[int, int]]], *,
               all_positions: bool) -> _Table:
        keys = sorted(postings)
        ptr = np.zeros(len(keys) + 1, dtype=np.int64)
        items: list[int] = []
        poss: list[int] = []
        covered: dict[int, set[int]] = {}
        for i, h in enumerate(keys):
            for it, pos in postings[h]:
                items.append(it)
                poss.append(pos)
                covered.setdefault(it, set()).update(range(pos, pos + n))
            ptr[i + 1] = len(items)
        for it, s in covered.items():
            self.coverable[it] = max(self.coverable[it], len(s))
        return _Table(n=n, hashes=pa.array(np.array(keys, dtype=np.uint64), pa.uint64()),
                      ptr=ptr, item=np.asarray(items, dtype=np.int64),
                      pos=np.asarray(poss, dtype=np.int64))

    def scan(self, texts: pa.Array) -> list[Hit]:
        """Return, for each contaminated document, its best-covered item."""
        n_docs = len(texts)
        if n_docs == 0 or not self.tables:
            return []
        lists = words_of(texts)
        if isinstance(lists, pa.ChunkedArray):
            lists = lists.combine_chunks()
        offsets = np.asarray(lists.offsets)
        offsets = offsets - offsets[0]
        flat = lists.flatten()
        ids_arr = pc.index_in(flat, value_set=self.vocab)
        ids = np.asarray(ids_arr.fill_null(-1), dtype=np.int64)
        if len(ids) == 0:
            return []
        good = (ids >= 0).astype(np.int32)
        csum = np.concatenate([[0], np.cumsum(good)])
        lengths = np.diff(offsets)
        doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)
        best_cov = np.zeros(n_docs)
        best_item = np.full(n_docs, -1, dtype=np.int64)
        for t in self.tables:
            w = len(ids) - t.n + 1
            if w <= 0:
                continue
            starts = np.arange(w)
            valid = (csum[starts + t.n] - csum[starts] == t.n) & (doc_of[:w] == doc_of[t.n - 1:])
            starts = starts[valid]
            if not len(starts):
                continue
            h = _hash_windows(ids, starts, t.n)
            row = pc.index_in(pa.array(h, pa.uint64()), value_set=t.hashes)
            found = np.asarray(row.is_valid())
            if not found.any():
                continue
            g = np.asarray(row.filter(row.is_valid()), dtype=np.int64)
            docs = doc_of[starts[found]]
            # expand each hit to the (item, position) postings of its n-gram
            cnt = t.ptr[g + 1] - t.ptr[g]
            total = int(cnt.sum())
            base = np.repeat(t.ptr[g], cnt)
            within = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            post = base + within
            d = np.repeat(docs, cnt)
            item = t.item[post]
            pos = t.pos[post]
            pair = d * self.n_items + item
            if t.n == self.config.ngram:
                # covered word positions of the item, per (doc, item) pair
                maxlen = int(self.item_len.max()) + 1
                cov = (pair[:, None] * maxlen + pos[:, None] + np.arange(t.n)[None, :]).ravel()
                cov = np.unique(cov)
                pairs, counts = np.unique(cov // maxlen, return_counts=True)
            else:
                pairs, counts = np.unique(pair, return_counts=True)
                counts = counts * t.n  # a whole short item matched
            p_doc = pairs // self.n_items
            p_item = pairs % self.n_items
            coverage = counts / self.coverable[p_item]
            better = coverage > best_cov[p_doc]
            # several pairs may share a doc: keep the best
            order = np.argsort(coverage[better], kind="stable")
            bd, bi, bc = p_doc[better][order], p_item[better][order], coverage[better][order]
            best_cov[bd] = bc
            best_item[bd] = bi
        hit_docs = np.nonzero(best_cov >= self.config.min_coverage)[0]
        return [
            Hit(doc=int(d), eval_set=self.sets[self.item_set[best_item[d]]].name,
                item_line=self.item_line[best_item[d]], coverage=float(min(best_cov[d], 1.0)))
            for d in hit_docs
        ]


def iter_scan(index: NgramIndex, texts: Iterator[str]) -> list[Hit]:
    """Scan an iterable of plain strings (small inputs, tests)."""
    return index.scan(pa.array(list(texts), pa.string()))
