"""Word splitting and word hashing of Arrow string arrays, on the raw UTF-8 bytes.

The validation engine needs, for millions of texts, (a) the words of each text and
(b) a 64-bit hash of every word, twice: whitespace-separated words for duplicates and
length bias, and letter/digit words for decontamination. Doing that with per-row Python
or with Arrow's list<string> kernels is the slow part of a 2 GB scan, so it is done here
with NumPy on the bytes:

1. a 256-entry table (``bytes.translate``) maps every byte to itself, to a lower-cased
   byte, or to 0 (a separator);
2. a separator (0xFF, which UTF-8 never uses) ends every row, so no word spans two rows;
3. word starts and ends are the edges of the non-zero runs;
4. a word's hash mixes its first 8 bytes (read as one little-endian integer, bytes past
   the word's end shifted out) and its length with the SplitMix64 finalizer; every
   further 8 bytes are folded in the same way. Words of up to 8 bytes therefore get
   distinct hashes; longer ones collide with probability about 2^-64.

Only ASCII bytes are classified by the tables. Rows that contain other characters are
first normalized by Arrow's Unicode kernels (the caller passes ``unicode_prepare``), and
their non-ASCII bytes are word bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_LEN = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _table(kind: str) -> np.ndarray:
    t = np.arange(256, dtype=np.uint8)
    upper = np.arange(ord("A"), ord("Z") + 1)
    if kind == "alnum":  # letters and digits are word bytes (lower-cased); other ASCII splits
        t[:128] = 0
        t[ord("a"): ord("z") + 1] = np.arange(ord("a"), ord("z") + 1)
        t[ord("0"): ord("9") + 1] = np.arange(ord("0"), ord("9") + 1)
        t[upper] = upper + 32
    elif kind in ("space", "space_lower"):  # ASCII whitespace splits, everything else is a word
        t[0] = 1
        for ch in " \t\n\v\f\r":
            t[ord(ch)] = 0
        if kind == "space_lower":
            t[upper] = upper + 32
    else:  # pragma: no cover - programming error
        raise ValueError(kind)
    t[0xFF] = 0
    return t


#: Byte tables: ``alnum`` (decontamination words), ``space_lower`` (duplicate keys).
TABLES = {k: _table(k) for k in ("alnum", "space", "space_lower")}
_SEP = b"\xff"  # row separator: 0xFF never occurs in UTF-8, and every table maps it to 0
TABLE_BYTES = {k: t.tobytes() for k, t in TABLES.items()}


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer (a bijection of uint64), vectorized. Returns a new array."""
    return _mix_inplace(np.array(z, dtype=np.uint64, copy=True))


def _mix_inplace(z: np.ndarray) -> np.ndarray:
    t = z >> _S30
    z ^= t
    z *= _C1
    np.right_shift(z, _S27, out=t)
    z ^= t
    z *= _C2
    np.right_shift(z, _S31, out=t)
    z ^= t
    return z


@dataclass
class WordHashes:
    """Words of every row of a string array, in row order."""

    hashes: np.ndarray  # uint64, one per word
    counts: np.ndarray  # int64, words per row

    @property
    def row(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.counts), dtype=np.int64), self.counts)

    @property
    def first(self) -> np.ndarray:
        """Index of each row's first word (rows without words: where it would be)."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)


def _separated_bytes(arr: pa.Array) -> tuple[bytes, np.ndarray]:
    """The rows' UTF-8 bytes, each followed by 0xFF (never a UTF-8 byte), after a leading
    0xFF and with 9 bytes of 0xFF padding; and where each row starts in them."""
    if arr.null_count:
        arr = arr.fill_null("")
    b = pc.cast(arr, pa.binary())  # same layout: no copy
    if len(b):
        b = pc.binary_join_element_wise(b, pa.scalar(b"", pa.binary()),
                                        pa.scalar(_SEP, pa.binary()))
    bufs = b.buffers()
    off = np.frombuffer(bufs[1], dtype=np.int32, count=len(b) + 1, offset=b.offset * 4)
    off = off.astype(np.int64)
    lo, hi = int(off[0]), int(off[-1])
    body = memoryview(bufs[2])[lo:hi] if bufs[2] is not None else b""
    return b"".join([_SEP, body, _SEP * 9]), off - lo + 1


#: Characters a reader does not see, removed before texts are compared (``identical``,
#: ``duplicates``, ``empty``, word counts): zero width space, non-joiner and joiner, word
#: joiner, zero width no-break space (BOM), soft hyphen, Mongolian vowel separator.
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"
#: Unicode White_Space characters (besides ASCII space, tab, newline, \\v, \\f, \\r):
#: next line, no-break space, ogham space, the U+2000-U+200A spaces (en, em, thin, hair,
#: ...), line and paragraph separators, narrow no-break, medium mathematical and
#: ideographic space. Each run of whitespace collapses to one ASCII space.
UNICODE_WHITESPACE = ("\u0085\u00a0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B))
                      + "\u2028\u2029\u202f\u205f\u3000")
_ZW_RE = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in ZERO_WIDTH) + "]"
_WS_RE = "[ \\t\\n\\v\\f\\r" + "".join(f"\\x{{{ord(c):x}}}" for c in UNICODE_WHITESPACE) + "]+"


def reader_text(arr: pa.Array, *, lower: bool = False) -> pa.Array:
    """The text as a reader sees it: Unicode NFKC, zero-width characters
    (:data:`ZERO_WIDTH`) removed, every run of whitespace (ASCII or
    :data:`UNICODE_WHITESPACE`) one ASCII space, trimmed; lower-cased with ``lower``."""
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.string())
    t = pc.utf8_normalize(arr, "NFKC")
    t = pc.replace_substring_regex(t, _ZW_RE, "")
    t = pc.replace_substring_regex(t, _WS_RE, " ")
    t = pc.utf8_trim(t, " ")
    return pc.utf8_lower(t) if lower else t


def reader_text_lower(arr: pa.Array) -> pa.Array:
    """:func:`reader_text` lower-cased (the ``unicode_prepare`` of duplicate keys)."""
    return reader_text(arr, lower=True)


def prepare(arr: pa.Array, unicode_prepare: Callable[[pa.Array], pa.Array] | None) -> pa.Array:
    """Replace the rows that are not pure ASCII by ``unicode_prepare`` of them."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if unicode_prepare is None or len(arr) == 0:
        return arr
    ascii_ = pc.string_is_ascii(arr)
    if ascii_.null_count:
        ascii_ = ascii_.fill_null(True)
    if pc.all(ascii_).as_py():
        return arr
    mask = pc.invert(ascii_)
    fixed = unicode_prepare(arr.filter(mask))
    return pc.replace_with_mask(arr, mask, pc.cast(fixed, arr.type))


def word_hashes(arr: pa.Array, table: str) -> WordHashes:
    """Split every row of ``arr`` into words with byte table ``table`` and hash them."""
    raw, row_start = _separated_bytes(arr)
    c = np.frombuffer(raw.translate(TABLE_BYTES[table]), dtype=np.uint8)
    w = c != 0
    # c starts and ends with separators, so word edges alternate: start, end, start, ...
    edges = np.flatnonzero(w[1:] != w[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]
    counts = np.diff(np.searchsorted(starts, row_start)).astype(np.int64)
    if len(starts) == 0:
        return WordHashes(np.zeros(0, dtype=np.uint64), counts)
    length = ends - starts
    v8 = np.ndarray((len(c) - 8,), dtype="<u8", buffer=c, strides=(1,))
    h = _chunk(v8[starts], length)
    h ^= length.view(np.uint64) * _LEN
    _mix_inplace(h)
    long_ = np.flatnonzero(length > 8)
    k = 1
    while len(long_):
        rest = length[long_] - 8 * k
        chunk = _chunk(v8[starts[long_] + 8 * k], rest)
        hl = h[long_]
        hl *= _C1
        hl += chunk
        h[long_] = _mix_inplace(hl)
        long_ = long_[rest > 8]
        k += 1
    return WordHashes(h, counts)


def _chunk(x: np.ndarray, remaining: np.ndarray) -> np.ndarray:
    """Keep the low ``min(remaining, 8)`` bytes of each little-endian word ``x`` (in place).

    ``remaining`` is int64 and at least 1, so the shift is 0..56 bits.
    """
    sh = np.minimum(remaining, 8)
    sh *= -8
    sh += 64
    np.left_shift(x, sh.view(np.uint64), out=x)
    return x


def row_hashes(words: WordHashes, salt: int) -> np.ndarray:
    """One uint64 per row from its word sequence: sum over words of mix(h_j + salt·(j+1)).

    Position-salted and mixed, then summed modulo 2^64, so the order of words matters;
    rows without words get ``mix(salt)``.
    """
    n = len(words.counts)
    if len(words.hashes) == 0:
        return np.full(n, mix64(np.array([salt], dtype=np.uint64))[0], dtype=np.uint64)
    pos = np.arange(len(words.hashes), dtype=np.int64) - np.repeat(words.first, words.counts)
    terms = pos.view(np.uint64)
    terms += np.uint64(1)
    terms *= np.uint64(salt)
    terms += words.hashes
    _mix_inplace(terms)
    first = words.first
    has = words.counts > 0
    out = np.full(n, mix64(np.array([salt], dtype=np.uint64))[0], dtype=np.uint64)
    out[has] = np.add.reduceat(terms, first[has])
    return out
