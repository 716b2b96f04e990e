"""Decontamination: find training examples that contain an evaluation item.

The rule (documented in docs/preference-data-generation.md; defaults in
:class:`DecontamConfig`):

1. **Normalize** both sides the same way: Unicode NFKC, lower case, every run of
   characters that are not letters or digits becomes one space, split on spaces. Case,
   punctuation and whitespace edits therefore vanish. The number words ``two`` to
   ``twenty``, ``thirty`` ... ``ninety``, ``hundred`` and ``thousand`` match the same
   number written in digits ("twelve" = "12").
2. **Index** every evaluation item by its word n-grams (``ngram`` words, default 3).
   An n-gram found in more than ``max_item_df`` items of the same evaluation set is
   template text ("which of the following") and is not indexed.
3. **Coverage** of item *e* by training example *x*: the share of *e*'s coverable
   words (words inside at least one indexed n-gram of *e*) that lie inside an n-gram
   *x* shares with *e*::

       coverage(e, x) = |∪ {positions of g in e : g ∈ G(e) ∩ G(x)}| / |coverable(e)|

   Only shared n-grams that line up count together: a shared n-gram at word *i* of a
   text of *x* and word *j* of *e* has offset *i − j*, and coverage is that of the best
   window of offsets ``[8k, 8k + 16)`` (``ALIGN_SLACK`` = 8), so insertions or
   deletions of a few words are tolerated but common phrases scattered over a long
   text do not add up. *x* is contaminated by *e* when ``coverage >= min_coverage``
   (default 0.6) **and** every number of *e* (a word with a digit, or a number word
   above) occurs in that text of *x*: the same problem with other numbers is a
   different item. A verbatim or embedded copy covers 1.0. Changing a word uncovers that word
   and, when two changes are 2 or 3 words apart, the one or two words between them,
   so two or three changed words in a 15-60 word item almost always keep coverage
   ≥ 0.6 (98% of 3-word edits in the test corpus), while unrelated text on the same
   topic shares a few common trigrams and stays low (none of 501 such texts flagged).
4. Items with fewer than ``ngram`` words (but at least ``min_item_words``) match only
   as a whole: every word, in order.

An example is a whole preference pair: its prompt, its chosen and its rejected text are
checked one by one (no n-gram or window spans two of them); the pair is contaminated
when any of the three is.

Implementation: words and their 64-bit hashes come from the raw UTF-8 bytes
(:mod:`realign.text_hash`; only rows with non-ASCII text go through Arrow's Unicode
kernels first), n-gram hashes are combined with NumPy, a 4 MiB presence table discards
almost every n-gram absent from the items before a binary search confirms the rest. No
per-word Python. (We deliberately don't use a MinHash/LSH library: those estimate
Jaccard similarity of whole documents, which misses a short item embedded in a long
prompt.)
"""

from __future__ import annotations

import builtins
import itertools
import json
import keyword
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from .errors import InputError
from .text_hash import _ZW_RE, mix64, prepare, row_hashes, word_hashes

#: Fields looked for, in this order, when an evaluation set row names no text field.
DEFAULT_EVAL_FIELDS: tuple[str, ...] = (
    "prompt", "question", "text", "input", "problem", "instruction", "query",
    "content", "sentence", "context", "messages",
)

#: Number words read as digits (rule 1). "zero" and "one" are left out: "no one",
#: "one of the" are rarely numbers.
NUMBER_WORDS: dict[str, str] = {
    w: str(i) for i, w in enumerate(
        "_ _ two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()) if i >= 2
} | {w: str(10 * i) for i, w in enumerate(
    "_ _ _ thirty forty fifty sixty seventy eighty ninety".split()) if i >= 3
} | {"hundred": "100", "thousand": "1000"}

_HAS_DIGIT = re.compile(r"\d").search
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio)
_FILTER_BITS = 22  # presence table: 2^22 bytes
#: Rule 3: shared n-grams count together when their offsets lie in one window of
#: 2 * ALIGN_SLACK words (so insertions/deletions of a few words are tolerated).
ALIGN_SLACK = 8


def _unique(x: np.ndarray) -> np.ndarray:
    """Sorted unique values (sort-based; NumPy's hash path is slow on these keys)."""
    x = np.sort(x, axis=None)
    if len(x) < 2:
        return x
    return x[np.concatenate([[True], x[1:] != x[:-1]])]


class DecontamConfig(BaseModel):
    """Decontamination parameters. Defaults are the documented rule."""

    ngram: int = Field(3, ge=2, le=13, description="words per n-gram")
    min_coverage: float = Field(0.6, gt=0, le=1,
                                description="share of an item's words that must be covered")
    max_item_df: int = Field(20, ge=1,
                             description="n-grams in more items than this are template text")
    min_item_words: int = Field(3, ge=1,
                                description="shorter items are matched only as a whole text "
                                            "or a whole sentence (exact match)")


def normalize_text(texts: pa.Array) -> pa.Array:
    """NFKC, zero-width characters removed, lower case, non-alphanumeric runs -> one
    space (Arrow kernels)."""
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        texts = pc.cast(texts, pa.string())
    t = pc.utf8_normalize(texts, "NFKC")
    t = pc.replace_substring_regex(t, _ZW_RE, "")  # invisible: "foo\u200bbar" is "foobar"
    t = pc.utf8_lower(t)
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(t, r"[^\pL\pN]+", " "))


def words_of(texts: pa.Array) -> pa.ListArray:
    """Normalized words per text (list<string>)."""
    return pc.utf8_split_whitespace(normalize_text(texts))


def text_word_hashes(texts: pa.Array) -> Any:
    """Rule-1 words of every text, hashed (:class:`realign.text_hash.WordHashes`)."""
    return word_hashes(prepare(texts, normalize_text), "alnum")


def gram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """Hash of words i..i+n-1 for every i: g = (...(h_i·M + h_i+1)·M + ...) mod 2^64."""
    w = len(h) - n + 1
    if w <= 0:
        return np.zeros(0, dtype=np.uint64)
    g = h[:w].copy()
    for k in range(1, n):
        g *= _MULT
        g += h[k: k + w]
    return g


@dataclass
class EvalSet:
    """An evaluation set: items (raw text) and where each came from (1-based line).

    ``name`` is what hits report: the file given, or the benchmark's name (a shipped suite
    or an lm-eval task). ``ids``: the items' own ids, when they have them.
    """

    name: str
    texts: list[str]
    lines: list[int]
    ids: list[str] | None = None


def load_eval_set(path: str | Path, field: str | None = None) -> EvalSet:
    """Read evaluation items from JSONL/JSON/Parquet/text files or a saved dataset.

    ``field`` names the text field; by default the first of :data:`DEFAULT_EVAL_FIELDS`
    present in the row is used. A ``messages``/list field uses the messages' contents.
    Plain text files (``.txt`` or anything not JSON/Parquet): one item per non-empty line.
    """
    from .data import check_readable

    p = Path(path)
    name = str(path)
    if not p.exists():
        raise InputError("evaluation set not found", file=name)
    check_readable(p, name)
    rows: list[tuple[int, Any]] = []
    suffix = p.suffix.lower()
    try:
        if p.is_dir() or suffix == ".parquet":
            rows = list(enumerate(_arrow_rows(p, name), start=1))
        elif suffix in (".jsonl", ".json", ".ndjson"):
            rows = _json_rows(p.read_bytes(), name)
        else:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise InputError("invalid UTF-8 (text evaluation sets are one item per line)",
                                 file=name) from None
            rows = [(i, ln) for i, ln in enumerate(text.split("\n"), start=1) if ln.strip()]
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", file=name) from None
    texts, lines, ids = [], [], []
    for line, row in rows:
        texts.append(_item_text(row, field, name, line))
        lines.append(line)
        ids.append(str(row["id"]) if isinstance(row, dict) and "id" in row else None)
    if not texts:
        raise InputError("evaluation set is empty", file=name)
    return EvalSet(name=name, texts=texts, lines=lines,
                   ids=ids if any(i is not None for i in ids) else None)


def _arrow_rows(p: Path, name: str) -> list[Any]:
    """Rows of a Parquet file or a saved ``datasets`` folder (a DatasetDict: its test split,
    else its first)."""
    if p.is_dir():
        if not any((p / f).exists() for f in ("dataset_info.json", "dataset_dict.json",
                                              "state.json")):
            raise InputError("is a folder but not a saved `datasets` dataset (no "
                             "dataset_info.json or dataset_dict.json); give a file",
                             file=name)
        try:
            import datasets
        except ImportError:
            raise InputError("reading a saved dataset needs `pip install datasets`",
                             file=name) from None
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds
            raise InputError(f"cannot load dataset: {' '.join(str(e).split())}",
                             file=name) from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["test"] if "test" in ds else ds[list(ds)[0]]
        table = ds.data.table
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
            raise InputError(f"cannot read Parquet: {e}", file=name) from None
    return table.to_pylist()


def _json_rows(raw: bytes, name: str) -> list[tuple[int, Any]]:
    """(line, value) of a JSON array (line = index + 1) or of JSONL (physical line)."""
    from .data import _check_surrogates, _max_depth, _parse_line

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError("invalid UTF-8", file=name,
                         line=raw.count(b"\n", 0, e.start) + 1) from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON: {e.msg}", file=name, line=e.lineno) from None
        except RecursionError:
            raise InputError(f"JSON nested too deeply to parse (more than about "
                             f"{_max_depth()} levels)", file=name) from None
        rows = list(enumerate(data, start=1))
        for i, row in rows:
            _check_surrogates(row, name, i)
        return rows
    out = []
    for i, ln in enumerate(raw.split(b"\n"), start=1):
        if i == 1 and ln.startswith(b"\xef\xbb\xbf"):
            ln = ln[3:]
        if ln.strip():
            out.append((i, _parse_line(ln, name, i)))
    return out


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
        value = "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m)
                          for m in value)
    if not isinstance(value, str):
        value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"lone surrogate \\u{ord(value[e.start]):04x}: not a Unicode "
                         "character", file=file, line=line, field=field) from None
    return value


@dataclass
class Hit:
    """Example ``doc`` (index within the scanned batch) contains item ``item``."""

    doc: int
    eval_set: str
    item_line: int
    coverage: float
    item_id: str | None = None
    method: str = "ngram"


# ------------------------------------------------------------------ identifiers in code
#: Every identifier a code text defines or calls is replaced by this one word before
#: normalization, so a copy with its function renamed throughout is the same item.
CODE_NAME_TOKEN = "xidentx"
_DEF = re.compile(r"\bdef\s+([A-Za-z_]\w*)\s*\(([^)]*)\)")
_CLASS = re.compile(r"\bclass\s+([A-Za-z_]\w*)\s*[:(]")
_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\(")
_PARAM = re.compile(r"^\s*\**\s*([A-Za-z_]\w*)")
_TRIPLE = re.compile(r"(\"\"\"|\'\'\')(.*?)(\1|$)", re.S)
#: What makes a text code (the same test in Python and, on Arrow arrays, in RE2): a
#: ``def``/``class`` statement, a doctest prompt ``>>>``, or a call of a snake_case or
#: camelCase name (``similar_elements(``, ``hasCloseElements(``). Prose that mentions
#: ``Note(`` or ``f(x)`` is not code and is never masked.
CODE_HINT = (r"(?m)^[ \t]*(def|class)[ \t]+[A-Za-z_][A-Za-z0-9_]*[ \t]*[(:]|>>>|"
             r"[A-Za-z][A-Za-z0-9]*_[A-Za-z0-9_]*\(|[a-z][a-z0-9]*[A-Z][A-Za-z0-9_]*\(")
_CODE_EVIDENCE = re.compile(CODE_HINT)
_NOT_NAMES = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins))


def code_names(text: str) -> set[str]:
    """The identifiers a text defines or calls: ``def NAME(PARAMS)`` (the name and its
    parameters), ``class NAME``, and ``NAME(`` calls that are not methods (``.NAME(``),
    Python keywords or builtins (``len``, ``print``, ...)."""
    names: set[str] = set()
    for m in _DEF.finditer(text):
        names.add(m.group(1))
        for part in m.group(2).split(","):
            pm = _PARAM.match(part.split(":")[0].split("=")[0])
            if pm:
                names.add(pm.group(1))
    names.update(m.group(1) for m in _CLASS.finditer(text))
    names.update(m.group(1) for m in _CALL.finditer(text))
    return {n for n in names if n not in _NOT_NAMES}


def mask_code(text: str) -> str:
    """Replace the identifiers of :func:`code_names` by :data:`CODE_NAME_TOKEN`.

    Outside docstrings (triple-quoted strings) every whole-word occurrence is replaced;
    inside them only doctest lines (``>>>`` / ``...``) and ``NAME(`` calls, so the
    docstring's prose keeps its words. Texts that are not code (:data:`CODE_HINT`) or
    name nothing are returned unchanged.
    """
    if not _CODE_EVIDENCE.search(text):
        return text
    names = code_names(text)
    if not names:
        return text
    alts = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    every = re.compile(rf"(?<![\w])(?:{alts})(?![\w])")
    called = re.compile(rf"(?<![\w.])(?:{alts})(?=\()")
    tok = f" {CODE_NAME_TOKEN} "

    def doc(body: str) -> str:
        out = []
        for ln in body.split("\n"):
            head = ln.lstrip()
            out.append(every.sub(tok, ln) if head.startswith((">>>", "...")) else
                       called.sub(tok, ln))
        return "\n".join(out)

    parts, pos = [], 0
    for m in _TRIPLE.finditer(text):
        parts.append(every.sub(tok, text[pos:m.start()]))
        parts.append(m.group(1) + doc(m.group(2)) + m.group(3))
        pos = m.end()
    parts.append(every.sub(tok, text[pos:]))
    return "".join(parts)


def mask_code_array(texts: pa.Array) -> pa.Array:
    """:func:`mask_code` of every text that :data:`CODE_HINT` marks as possible code."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if len(texts) == 0:
        return texts
    hint = pc.match_substring_regex(texts, CODE_HINT).fill_null(False)
    idx = np.flatnonzero(np.asarray(hint, dtype=bool))
    if not len(idx):
        return texts
    values = texts.take(pa.array(idx)).to_pylist()
    masked = pa.array([mask_code(v) for v in values], pa.string())
    mask = np.zeros(len(texts), dtype=bool)
    mask[idx] = True
    return pc.replace_with_mask(texts, pa.array(mask), pc.cast(masked, texts.type))


# ------------------------------------------------------------------ exact match (rule 5)
_SENTENCE_END = r"([.!?])\s+"
_EXACT_SALT = 0x2545F4914F6CDD1D


def sentence_segments(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Each text whole, then each of its sentences (split after ``.``, ``!`` or ``?``
    followed by whitespace, and at line breaks), with the index of the text each came
    from."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = texts.fill_null("")
    marked = pc.replace_substring_regex(texts, _SENTENCE_END, "\\1\n")
    parts = pc.split_pattern(marked, "\n")
    flat = pc.list_flatten(parts)
    parent = np.asarray(pc.list_parent_indices(parts), dtype=np.int64)
    segs = pa.concat_arrays([pc.cast(texts, pa.string()), pc.cast(flat, pa.string())])
    return segs, np.concatenate([np.arange(len(texts), dtype=np.int64), parent])


def _sequence_keys(wh: Any) -> np.ndarray:
    """One 64-bit key per text from its word sequence and its length."""
    k = row_hashes(wh, _EXACT_SALT)
    return mix64(k ^ (wh.counts.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))


@dataclass
class _Table:
    """One gram length: sorted unique hashes, a presence table and CSR postings."""

    n: int
    keys: np.ndarray  # uint64, sorted
    present: np.ndarray  # uint8[2^_FILTER_BITS], 1 where some key has that top-bit prefix
    ptr: np.ndarray
    item: np.ndarray
    pos: np.ndarray

    slot_row: np.ndarray  # int32[2^_FILTER_BITS]: the key row with that prefix, -2: several

    def lookup(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(window indices, key rows) of the hashes in ``g`` that are keys."""
        slot = (g >> np.uint64(64 - _FILTER_BITS)).view(np.int64)
        cand = np.flatnonzero(self.present[slot])
        if not len(cand):
            return cand, cand
        gc = g[cand]
        row = self.slot_row[slot[cand]].astype(np.int64)
        several = np.flatnonzero(row == -2)
        if len(several):  # prefixes shared by several keys: binary search
            r = np.searchsorted(self.keys, gc[several])
            row[several] = np.minimum(r, len(self.keys) - 1)
        ok = self.keys[row] == gc
        return cand[ok], row[ok]


def _make_table(n: int, gram: np.ndarray, item: np.ndarray, pos: np.ndarray) -> _Table:
    order = np.lexsort((pos, item, gram))
    gram, item, pos = gram[order], item[order], pos[order]
    keys, first = np.unique(gram, return_index=True)
    ptr = np.append(first, len(gram)).astype(np.int64)
    prefix = (keys >> np.uint64(64 - _FILTER_BITS)).view(np.int64)
    present = np.zeros(1 << _FILTER_BITS, dtype=np.uint8)
    present[prefix] = 1
    slot_row = np.full(1 << _FILTER_BITS, -1, dtype=np.int32)
    slot_row[prefix] = np.arange(len(keys), dtype=np.int32)
    shared = prefix[1:][prefix[1:] == prefix[:-1]]  # keys are sorted, so are prefixes
    slot_row[shared] = -2
    return _Table(n=n, keys=keys, present=present, ptr=ptr, item=item.astype(np.int64),
                  pos=pos.astype(np.int64), slot_row=slot_row)


@dataclass
class NgramIndex:
    """The evaluation items, indexed for fast containment scans of many documents."""

    sets: list[EvalSet]
    config: DecontamConfig = field(default_factory=DecontamConfig)

    def __post_init__(self) -> None:
        cfg, n = self.config, self.config.ngram
        self.item_set: list[int] = []
        self.item_line: list[int] = []
        self.item_id: list[str | None] = []
        all_texts: list[str] = []
        for s_idx, s in enumerate(self.sets):
            all_texts.extend(s.texts)
            self.item_set.extend([s_idx] * len(s.texts))
            self.item_line.extend(s.lines)
            self.item_id.extend(s.ids if s.ids is not None else [None] * len(s.texts))
        self.n_items = len(all_texts)
        # rule 6: identifiers in code; documents are masked too only when some item is code
        masked = [mask_code(t) for t in all_texts]
        self.mask_code = any(m != t for m, t in zip(masked, all_texts))
        norm = normalize_text(pa.array(masked, pa.string()))
        words = [t.split() for t in norm.to_pylist()]
        wh = word_hashes(norm, "alnum")
        assert wh.counts.tolist() == [len(w) for w in words]
        flat_words = [w for ws in words for w in ws]
        prim = wh.hashes
        # the other spelling of each number word ("12" <-> "twelve"), else the word itself
        digit_to_word = {v: k for k, v in NUMBER_WORDS.items()}
        alt_text = [NUMBER_WORDS.get(w) or digit_to_word.get(w) or "" for w in flat_words]
        alt = prim.copy()
        has_alt = np.array([bool(a) for a in alt_text], dtype=bool)
        if has_alt.any():
            alt[has_alt] = word_hashes(
                pa.array([a for a in alt_text if a], pa.string()), "alnum").hashes
        anchor = np.array([w in NUMBER_WORDS or _HAS_DIGIT(w) is not None
                           for w in flat_words], dtype=bool)
        self.item_len = wh.counts.astype(np.int64)
        self.item_start = wh.first
        item_of = wh.row
        set_of = np.asarray(self.item_set, dtype=np.int64)
        covered = np.zeros(len(prim), dtype=bool)
        checkable = self.item_len >= cfg.min_item_words
        self.tables: list[_Table] = []
        # full n-grams of items with at least n words
        w = len(prim) - n + 1
        if w > 0:
            starts = np.arange(w)
            ok = (item_of[:w] == item_of[n - 1:]) & checkable[item_of[:w]]
            starts = starts[ok]
            it, pos = item_of[starts], starts - self.item_start[item_of[starts]]
            base = gram_hashes(prim, n)[starts]
            # template text: grams in more than max_item_df items of one set
            distinct = np.unique(np.stack([base.view(np.int64), set_of[it], it]), axis=1)
            per_set, df = np.unique(distinct[:2], axis=1, return_counts=True)
            too_common = per_set[0][df > cfg.max_item_df]
            keep = ~np.isin(base.view(np.int64), too_common)
            starts, it, pos, base = starts[keep], it[keep], pos[keep], base[keep]
            for k in range(n):
                covered[starts + k] = True
            grams, items, poss = [base], [it], [pos]
            alt_any = np.zeros(len(starts), dtype=bool)
            for k in range(n):
                alt_any |= has_alt[starts + k]
            if alt_any.any():
                sa = starts[alt_any]
                for combo in itertools.product((False, True), repeat=n):
                    if not any(combo):
                        continue
                    g = np.zeros(len(sa), dtype=np.uint64)
                    use = np.ones(len(sa), dtype=bool)
                    for k, flip in enumerate(combo):
                        src = alt if flip else prim
                        if flip:
                            use &= has_alt[sa + k]
                        g = g * _MULT + src[sa + k] if k else src[sa + k].copy()
                    grams.append(g[use])
                    items.append(it[alt_any][use])
                    poss.append(pos[alt_any][use])
            self.tables.append(_make_table(n, np.concatenate(grams), np.concatenate(items),
                                           np.concatenate(poss)))
        # items shorter than n words: matched whole
        short = np.flatnonzero(checkable & (self.item_len < n))
        for m in sorted(set(self.item_len[short].tolist())):
            its = short[self.item_len[short] == m]
            grams, items = [], []
            for combo in itertools.product((False, True), repeat=m):
                g = np.zeros(len(its), dtype=np.uint64)
                use = np.ones(len(its), dtype=bool)
                for k, flip in enumerate(combo):
                    idx = self.item_start[its] + k
                    if flip:
                        use &= has_alt[idx]
                    g = g * _MULT + (alt if flip else prim)[idx] if k else \
                        (alt if flip else prim)[idx].copy()
                grams.append(g[use])
                items.append(its[use])
            for i in its:
                covered[self.item_start[i]: self.item_start[i] + m] = True
            it_all = np.concatenate(items)
            self.tables.append(_make_table(m, np.concatenate(grams), it_all,
                                           np.zeros(len(it_all), dtype=np.int64)))
        self.tables = [t for t in self.tables if len(t.keys)]
        self.coverable = np.bincount(item_of, weights=covered, minlength=self.n_items
                                     ).astype(np.int64)
        self.n_anchor = np.bincount(item_of, weights=anchor, minlength=self.n_items
                                    ).astype(np.int64)
        # numbers inside an indexed n-gram must lie inside the matched window (rule 3)
        self.anchor_flat = anchor
        self.n_cov_anchor = np.bincount(item_of, weights=anchor & covered,
                                        minlength=self.n_items).astype(np.int64)
        # per item: its numbers, each as (hash as written, hash of the other spelling)
        pairs_ = np.stack([prim, alt], axis=1)
        self.anchor_hashes = [pairs_[self.item_start[i]: self.item_start[i] + self.item_len[i]][
            anchor[self.item_start[i]: self.item_start[i] + self.item_len[i]]].ravel()
            for i in range(self.n_items)]
        # how each item is checked (rule 5): n-gram coverage, whole (shorter than n words),
        # exact match of a whole text or sentence (fewer than min_item_words words, or only
        # template n-grams), or not at all (no words)
        has_words = self.item_len > 0
        by_ngram = checkable & (self.item_len >= n) & (self.coverable > 0)
        whole = checkable & (self.item_len < n)
        exact = has_words & ~by_ngram & ~whole
        self.item_method = np.where(by_ngram, 0, np.where(whole, 1, np.where(exact, 2, 3)))
        self.method_counts = {"ngram": int(by_ngram.sum()), "whole": int(whole.sum()),
                              "exact": int(exact.sum())}
        self.skipped_items = int((~has_words).sum())
        self.n_checked = self.n_items - self.skipped_items
        self.coverable = np.maximum(self.coverable, 1)
        ex = np.flatnonzero(exact)
        if len(ex):
            keys = _sequence_keys(wh)[ex]
            order = np.argsort(keys, kind="stable")  # equal keys: the earliest item first
            keys, ex = keys[order], ex[order]
            first = np.concatenate([[True], keys[1:] != keys[:-1]])
            self.exact_keys, self.exact_item = keys[first], ex[first]
        else:
            self.exact_keys = self.exact_item = np.zeros(0, dtype=np.uint64)
        self._maxlen = int(self.item_len.max()) + 1 if self.n_items else 1

    def _candidates(self, doc: np.ndarray, item: np.ndarray, n: int) -> np.ndarray:
        """Mask of the postings whose (document, item) pair can reach ``min_coverage``.

        k shared postings cover at most n·k words of the item, so a pair needs
        k >= min_coverage · coverable / n; most chance matches have fewer. (The keys come
        in runs sorted by document, which a stable sort exploits.)
        """
        need = self._need(n)
        key = doc * self.n_items + item
        order = np.argsort(key, kind="stable")
        sk = key[order]
        edge = np.flatnonzero(np.concatenate([[True], sk[1:] != sk[:-1], [True]]))
        counts = np.diff(edge)
        ok_pair = counts >= need[sk[edge[:-1]] % self.n_items]
        keep = np.zeros(len(key), dtype=bool)
        keep[order] = np.repeat(ok_pair, counts)
        return keep

    def _need(self, n: int) -> np.ndarray:
        if getattr(self, "_need_cache", None) is None:
            need = np.ceil(self.config.min_coverage * self.coverable / n - 1e-9)
            self._need_cache = np.maximum(need, 1).astype(np.int64)
        return self._need_cache

    def _aligned_coverage(self, doc: np.ndarray, item: np.ndarray, pos: np.ndarray,
                          wpos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rule 3 for every (document, item) pair that shares an n-gram.

        Each shared n-gram has an offset (word position in the text minus position in the
        item); only n-grams whose offsets fall in one window of ``2 * ALIGN_SLACK`` words
        count together (windows start every ``ALIGN_SLACK`` words), and a pair's coverage
        is that of its best window, set to 0 when a coverable number of the item is left
        uncovered. Returns (doc, item, coverage) per pair.
        """
        maxlen = self._maxlen
        pair, pair_id = np.unique(doc * self.n_items + item, return_inverse=True)
        band = (wpos - pos) // ALIGN_SLACK
        band = band - band.min() + 1
        n_band = int(band.max()) + 2
        window = np.concatenate([pair_id * n_band + band, pair_id * n_band + band - 1])
        pos2 = np.concatenate([pos, pos])
        w_key, w_id = np.unique(window, return_inverse=True)
        cells = _unique((w_id * maxlen + pos2)[:, None] + np.arange(n)[None, :])
        c_win = cells // maxlen
        edge = np.flatnonzero(np.concatenate([[True], c_win[1:] != c_win[:-1], [True]]))
        counts = np.diff(edge)
        w_pair = pair[w_key[c_win[edge[:-1]]] // n_band]
        w_item = w_pair % self.n_items
        cov = counts / self.coverable[w_item]
        need = self.n_cov_anchor[w_item]
        if need.any():  # every coverable number of the item lies inside the window
            c_item = np.repeat(w_item, counts)
            is_num = self.anchor_flat[self.item_start[c_item] + cells % maxlen]
            got = np.add.reduceat(is_num.astype(np.int64), edge[:-1])
            cov = np.where(got >= need, cov, 0.0)
        return w_pair // self.n_items, w_item, cov

    def _numbers_present(self, item: int, words: np.ndarray) -> bool:
        """Every number of the item occurs among ``words`` (hashes), in digits or in words."""
        need = self.anchor_hashes[item]
        return bool(np.isin(need, words).reshape(-1, 2).any(axis=1).all())

    def scan(self, texts: pa.Array) -> list[Hit]:
        """For each contaminated document, its best-covered item (see :meth:`scan_fields`)."""
        return self.scan_fields([texts])

    def scan_fields(self, fields: list[pa.Array]) -> list[Hit]:
        """Scan documents made of several text fields (equal lengths; row i is document i).

        Returns, for each contaminated document, the item with the highest coverage among
        those that pass the rule (ties: the earliest item, so the first evaluation set).
        """
        if not fields or len(fields[0]) == 0 or not (self.tables or len(self.exact_keys)):
            return []
        n_docs = len(fields[0])
        best_cov = np.zeros(n_docs)
        best_item = np.full(n_docs, -1, dtype=np.int64)

        def update(p_doc: np.ndarray, p_item: np.ndarray, coverage: np.ndarray) -> None:
            # best item per document: highest coverage; ties go to the earliest item
            # (the first evaluation set given). Last write wins in the assignment.
            better = (coverage > best_cov[p_doc]) | (
                (coverage == best_cov[p_doc]) & (coverage > 0)
                & ((best_item[p_doc] < 0) | (p_item < best_item[p_doc])))
            order = np.lexsort((-p_item[better], coverage[better]))
            bd, bi, bc = p_doc[better][order], p_item[better][order], coverage[better][order]
            best_cov[bd] = bc
            best_item[bd] = bi

        for col in fields:
            if self.mask_code:
                col = mask_code_array(col)
            if len(self.exact_keys):
                segs, parent = sentence_segments(col)
                keys = _sequence_keys(text_word_hashes(segs))
                pos = np.minimum(np.searchsorted(self.exact_keys, keys), len(self.exact_keys) - 1)
                ok = np.flatnonzero(self.exact_keys[pos] == keys)
                if len(ok):
                    update(parent[ok], self.exact_item[pos[ok]].astype(np.int64),
                           np.ones(len(ok)))
            if not self.tables:
                continue
            wh = text_word_hashes(col)
            if not len(wh.hashes):
                continue
            row_of = wh.row
            for t in self.tables:
                win, g = t.lookup(gram_hashes(wh.hashes, t.n))
                d0 = row_of[win]
                same = d0 == row_of[win + t.n - 1]  # the window lies inside one text
                win, g, d0 = win[same], g[same], d0[same]
                if not len(g):
                    continue
                # expand each hit to the (item, position) postings of its n-gram
                cnt = t.ptr[g + 1] - t.ptr[g]
                hit = np.repeat(np.arange(len(g)), cnt)
                post = t.ptr[g][hit] + (np.arange(len(hit)) - (np.cumsum(cnt) - cnt)[hit])
                d = d0[hit]
                item = t.item[post]
                if t.n == self.config.ngram:
                    keep = self._candidates(d, item, t.n)
                    if not keep.any():
                        continue
                    hit, post = hit[keep], post[keep]
                    wpos = win[hit] - wh.first[d0[hit]]  # word position inside the text
                    p_doc, p_item, coverage = self._aligned_coverage(
                        d[keep], item[keep], t.pos[post], wpos, t.n)
                else:
                    pairs = _unique(d * self.n_items + item)
                    p_doc, p_item = pairs // self.n_items, pairs % self.n_items
                    coverage = np.ones(len(pairs))  # a whole short item matched, in order
                # numbers: the same problem with other numbers is a different item
                check = np.flatnonzero((coverage >= self.config.min_coverage - 1e-12)
                                       & (self.n_anchor[p_item] > 0))
                for k in check.tolist():
                    lo = wh.first[p_doc[k]]
                    if not self._numbers_present(
                            int(p_item[k]), wh.hashes[lo: lo + wh.counts[p_doc[k]]]):
                        coverage[k] = 0.0
                update(p_doc, p_item, coverage)
        hit_docs = np.nonzero(best_cov >= self.config.min_coverage - 1e-12)[0]
        methods = ("ngram", "whole", "exact", "none")
        return [
            Hit(doc=int(d), eval_set=self.sets[self.item_set[best_item[d]]].name,
                item_line=self.item_line[best_item[d]], coverage=float(min(best_cov[d], 1.0)),
                item_id=self.item_id[best_item[d]],
                method=methods[int(self.item_method[best_item[d]])])
            for d in hit_docs
        ]


def iter_scan(index: NgramIndex, texts: Iterator[str]) -> list[Hit]:
    """Scan an iterable of plain strings (small inputs, tests)."""
    return index.scan(pa.array(list(texts), pa.string()))


# ------------------------------------------------------------------ benchmarks as eval sets
#: The field of a shipped suite's item that is checked: the question the model answers
#: (``realign_format`` wraps it in an instruction and a demonstration shared by 20 items,
#: so its ``prompt`` field would let a copied question go unnoticed).
SUITE_ITEM_FIELD = "question"


class BenchmarkUnavailable(Exception):
    """A benchmark's items could not be loaded; ``str()`` says why."""


def benchmark_eval_set(name: str, *, include_path: Sequence[str | Path] = ()) -> EvalSet:
    """The items of a benchmark stage 7 evaluates, as an :class:`EvalSet` named ``name``.

    A shipped suite (``realign_*``): its data file, field :data:`SUITE_ITEM_FIELD` (else the
    first of :data:`DEFAULT_EVAL_FIELDS`), every item (not only ``benchmark_limit``).
    Another lm-eval task: lm-eval loads the task and each document's ``doc_to_text`` is an
    item (a group: every task in it). Raises :class:`BenchmarkUnavailable` when that fails
    (lm-eval not installed, data not available offline, ...) and :class:`InputError` for
    a name that is neither a shipped suite nor an lm-eval task.
    """
    from .evaluation import SUITES_DIR, list_suites

    local = {s.name: s for s in list_suites()}
    if name in local:
        path = SUITES_DIR / "data" / local[name].data_file
        rows = _json_rows(path.read_bytes(), str(path))
        texts = [_item_text(r, SUITE_ITEM_FIELD if isinstance(r, dict) and SUITE_ITEM_FIELD in r
                            else None, str(path), line) for line, r in rows]
        ids = [str(r.get("id", line)) if isinstance(r, dict) else str(line) for line, r in rows]
        return EvalSet(name=name, texts=texts, lines=[line for line, _ in rows], ids=ids)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise BenchmarkUnavailable("lm-evaluation-harness is not installed") from None
    from .evaluation import _task_manager

    tm = _task_manager([name], include_path)  # an unknown name is bad input (InputError)
    from .evaluation import _quiet_lm_eval

    try:
        with _quiet_lm_eval(False):
            if hasattr(tm, "load"):  # lm-eval >= 0.4.10: flat {"tasks": {name: Task}}
                tasks = tm.load([name]).get("tasks", {})
            else:  # pragma: no cover - older lm-eval
                from lm_eval.tasks import get_task_dict

                tasks = get_task_dict([name], tm)
    except Exception as e:  # noqa: BLE001 - lm-eval/datasets raise many kinds
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise BenchmarkUnavailable(f"lm-eval could not load its items: {why}") from None
    texts, lines, ids = [], [], []
    for task in _leaf_tasks(tasks):
        try:
            docs = list(task.eval_docs)
            for i, doc in enumerate(docs, start=1):
                text = task.doc_to_text(doc)
                texts.append(text if isinstance(text, str) else str(text))
                lines.append(i)
                ids.append(f"{getattr(task, 'task_name', None) or name}:{i - 1}")
        except Exception as e:  # noqa: BLE001
            why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise BenchmarkUnavailable(f"lm-eval could not read its items: {why}") from None
    if not texts:
        raise BenchmarkUnavailable("lm-eval returned no items")
    return EvalSet(name=name, texts=texts, lines=lines, ids=ids)


def _leaf_tasks(tasks: Any) -> Iterator[Any]:
    if isinstance(tasks, dict):
        for v in tasks.values():
            yield from _leaf_tasks(v)
    elif tasks is not None and hasattr(tasks, "eval_docs"):
        yield tasks


def load_benchmarks(names: Sequence[str], *, include_path: Sequence[str | Path] = ()
                    ) -> tuple[list[EvalSet], dict[str, str]]:
    """:func:`benchmark_eval_set` of each name: (the sets loaded, {name: why not} for the
    others)."""
    sets, unchecked = [], {}
    for name in dict.fromkeys(names):
        try:
            sets.append(benchmark_eval_set(name, include_path=include_path))
        except BenchmarkUnavailable as e:
            unchecked[name] = str(e)
    return sets, unchecked
