"""Reading preference data: JSONL, JSON, Parquet, saved ``datasets`` datasets.

Every source is streamed as :class:`PairBlock` objects: an Arrow table with the
normalized text columns ``line``, ``prompt``, ``chosen``, ``rejected``,
``score_chosen``, ``score_rejected`` plus the original rows (for writing a clean copy
in the input's own format). Nothing holds a whole large file as Python objects: JSONL
is read in byte blocks and parsed by Arrow's C++ JSON reader; Parquet and saved
datasets are read batch by batch. JSON arrays are the one exception (a JSON array must
be parsed whole; use JSONL for large data).

Accepted row shapes (TRL's preference formats):

* standard: ``{"prompt": str, "chosen": str, "rejected": str}``
* conversational: ``prompt``/``chosen``/``rejected`` are lists of
  ``{"role": str, "content": str}`` messages; text is the messages' contents joined
  with newlines
* implicit prompt: no ``prompt``; ``chosen``/``rejected`` hold the whole text or
  conversation. The prompt is their longest common prefix (whole messages for
  conversations, whole words for strings), as TRL's ``extract_prompt`` does.
* optional ``score_chosen``/``score_rejected`` numbers (finite: ``NaN`` and
  ``Infinity`` are bad input naming the row and field).

Which optional fields (``prompt``, the scores) a file has is learned from the whole file,
not from its first rows: a JSONL file's first rows are parsed, and the rest is searched
for each key not seen there (a byte search for ``"key":``, each candidate line confirmed
with a JSON parse), so a field that first appears on row 1,001 still counts.

Bad input is an :class:`~realign.errors.InputError` naming file, line and field, never a
traceback: invalid UTF-8, malformed JSON, JSON nested too deeply to parse, lone UTF-16
surrogates (``"\\ud800"``), wrong types, and an input that is not a regular file or a
folder (a FIFO or a device would block or never end).

Line numbers are 1-based physical lines for JSONL and row index + 1 otherwise.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from .errors import InputError

Format = Literal["jsonl", "json", "parquet", "dataset", "hub"]
Style = Literal["standard", "conversational"]

#: Bytes per JSONL block handed to Arrow's parser.
DEFAULT_BLOCK_BYTES = 16 << 20
#: Rows (and bytes) read up front to learn a JSONL file's row shape; optional fields
#: missing from them are then searched for in the whole file (:meth:`PairSource._sniff`).
SNIFF_ROWS = 1000
SNIFF_BYTES = 1 << 20
#: Fields whose presence anywhere in the file changes how every row is read.
OPTIONAL_FIELDS = ("prompt", "score_chosen", "score_rejected")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape in raw JSON
_BOM = b"\xef\xbb\xbf"
#: Arrow parses a JSONL block in pieces of this size, on its own thread pool.
ARROW_BLOCK_BYTES = 4 << 20
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*(?:\n|$)")  # a blank line after the first

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCORE_FIELDS = ("score_chosen", "score_rejected")
TEXT_FIELDS = ("prompt", "chosen", "rejected")

NORMALIZED_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
    ]
)


@dataclass
class BadRow:
    """A row that could not be used (only collected with ``skip_bad_rows``)."""

    line: int
    field: str | None
    message: str


@dataclass
class PairBlock:
    """One block of rows: normalized columns plus what is needed to write them back."""

    table: pa.Table  # NORMALIZED_SCHEMA
    raw_data: bytes | None = None  # jsonl fast path: the block's bytes, one row per line
    raw_table: pa.Table | None = None  # parquet/dataset: original rows
    raw_objects: list[Any] | None = None  # json arrays: original objects
    bad: list[BadRow] = field(default_factory=list)
    bytes_read: int = 0
    _lines: list[bytes] | None = None  # jsonl slow path: the kept rows' lines

    @property
    def raw_lines(self) -> list[bytes] | None:
        """JSONL: one entry per row of ``table``, without the newline (split lazily)."""
        if self._lines is None and self.raw_data is not None:
            lines = self.raw_data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            self._lines = lines
        return self._lines


def detect_format(path: Path) -> Format:
    """Choose the reader from the path: folder -> saved dataset, else by content/extension."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            return "dataset"
        raise InputError(
            "folder is not a saved `datasets` dataset (no dataset_info.json or "
            "dataset_dict.json)", file=path)
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        with path.open("rb") as fh:
            head = fh.read(4096).lstrip()
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:].lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"PAR1":
        return "parquet"
    raise InputError(
        f"unknown format '{suffix or '(no extension)'}': use .jsonl, .json, .parquet "
        "or a folder saved with datasets' save_to_disk", file=path)


@dataclass
class RowFile:
    """A small row file read whole: its format, the rows, each row's 1-based line (JSONL:
    physical line; JSON array / Parquet: row index + 1), and the raw rows to write a subset
    back unchanged (JSONL: the original lines; JSON: the objects; Parquet: ``[table]``)."""

    format: str
    rows: list[Any]
    lines: list[int]
    raw: list[Any]


def read_row_file(path: str | Path) -> RowFile:
    """Read a JSONL, JSON-array or Parquet file of rows (SFT, IFD, verifier data) with
    file:line errors: invalid UTF-8 (the line of the byte), invalid JSON (its line), a
    JSON document that is not an array, an unreadable Parquet file. For preference pairs
    at scale use :class:`PairSource` (streaming, typed)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found" if not p.exists() else "not a file", file=p)
    fmt = detect_format(p)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types
            raise InputError(f"cannot read Parquet: {e}", file=p) from None
        rows = table.to_pylist()
        return RowFile(fmt, rows, list(range(1, len(rows) + 1)), [table])
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 byte 0x{raw[e.start]:02x}", file=p,
                         line=raw.count(b"\n", 0, e.start) + 1) from None
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON: {e.msg}", file=p, line=e.lineno) from None
        except RecursionError:
            raise InputError("JSON nested too deeply", file=p) from None
        if not isinstance(data, list):
            raise InputError("expected a JSON array of rows", file=p, line=1)
        return RowFile(fmt, data, list(range(1, len(data) + 1)), data)
    rows, lines, kept = [], [], []
    for i, ln in enumerate(text.split("\n"), start=1):
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON: {e.msg} (column {e.colno})", file=p, line=i) from None
        except RecursionError:
            raise InputError("JSON nested too deeply", file=p, line=i) from None
        lines.append(i)
        kept.append(ln)
    return RowFile(fmt, rows, lines, kept)


class PairSource:
    """A preference-data source. Iterate :meth:`blocks` to stream it.

    ``skip_bad_rows=False`` (default): the first malformed row raises
    :class:`InputError` naming file, line and field. ``True``: malformed rows are
    skipped, each reported as a :class:`BadRow` in its block.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        split: str | None = None,
        skip_bad_rows: bool = False,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> None:
        self.name = str(path)
        self.path = Path(path)
        self.split = split
        self.skip_bad_rows = skip_bad_rows
        self.block_bytes = block_bytes
        if not self.path.exists():
            if re.fullmatch(r"[\w.-]+/[\w.-]+", self.name) and not self.name.endswith(
                    (".jsonl", ".json", ".parquet")):
                self.format: Format = "hub"
            else:
                raise InputError("file not found", file=self.name)
        else:
            check_readable(self.path, self.name)
            self.format = detect_format(self.path)
        self.total_bytes = _size(self.path) if self.format != "hub" else 0
        self._columns: list[str] = []
        self.style, self.implicit_prompt, self.has_scores = self._sniff()

    # -- sniffing -----------------------------------------------------------------
    def _sniff(self) -> tuple[Style, bool, bool]:
        if self.format in ("jsonl", "json"):
            records = self._head_records()
            first, line = records[0]
            if self.skip_bad_rows:  # learn the shape from the first well-formed row
                first, line = next(
                    ((r, i) for r, i in records if isinstance(r, dict)
                     and isinstance(r.get("chosen"), (str, list))), records[0])
            if not isinstance(first, dict):
                raise InputError(f"expected a JSON object per row, got {_type_name(first)}",
                                 file=self.name, line=line)
            # optional fields (prompt, scores) may be absent from the first rows: learn
            # them from the whole file
            keys = set().union(*(r for r, _ in records if isinstance(r, dict)))
            chosen = first.get("chosen")
            if "chosen" not in first:
                keys.discard("chosen")
            if self.format == "json":
                keys |= {k for o in self._load_json_array() if isinstance(o, dict)
                         for k in OPTIONAL_FIELDS if k in o}
            else:
                keys |= self._keys_in_file([k for k in OPTIONAL_FIELDS if k not in keys])
        else:
            schema = self._arrow_schema()
            keys = set(schema.names)
            chosen = None
            if "chosen" in keys:
                t = schema.field("chosen").type
                chosen = [] if (pa.types.is_list(t) or pa.types.is_large_list(t)) else ""
            line = 1
        self._columns = sorted(keys)
        for name in ("chosen", "rejected"):
            if name not in keys:
                raise InputError(
                    f"missing required field (found: {', '.join(sorted(keys)) or 'none'})",
                    file=self.name, line=line, field=name)
        if isinstance(chosen, list):
            style: Style = "conversational"
        elif isinstance(chosen, str):
            style = "standard"
        else:
            raise InputError(
                f"expected a string or a list of messages, got {_type_name(chosen)}",
                file=self.name, line=line, field="chosen")
        has_scores = all(s in keys for s in SCORE_FIELDS)
        return style, "prompt" not in keys, has_scores

    def _head_records(self, max_rows: int = SNIFF_ROWS, max_bytes: int = SNIFF_BYTES
                      ) -> list[tuple[Any, int]]:
        """The first rows (at most ``max_rows`` / about ``max_bytes``) with their lines."""
        if self.format == "json":
            objs = self._load_json_array()
            if not objs:
                raise InputError("empty file: the JSON array has no rows", file=self.name)
            return [(o, i) for i, o in enumerate(objs[:max_rows], start=1)]
        out: list[tuple[Any, int]] = []
        size = 0
        with self.path.open("rb") as fh:
            for i, raw in enumerate(fh, start=1):
                if i == 1 and raw.startswith(_BOM):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    out.append((_parse_line(raw, self.name, i), i))
                except InputError:
                    if not self.skip_bad_rows:
                        raise
                size += len(raw)
                if len(out) >= max_rows or size >= max_bytes:
                    break
        if not out:
            raise InputError("empty file: no rows", file=self.name)
        return out

    def _keys_in_file(self, wanted: list[str]) -> set[str]:
        """Which of ``wanted`` are top-level keys of some row anywhere in a JSONL file.

        A byte search for ``"key"`` followed by ``:`` (inside a JSON string a quote is
        escaped, so an unescaped ``"key":`` is a key of some object); the line of each
        candidate is parsed to confirm the key is a top-level one. Lines that do not parse
        are passed over (the reader reports them in order).
        """
        found: set[str] = set()
        if not wanted:
            return found
        with self.path.open("rb") as fh:
            try:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (ValueError, OSError):  # empty file, or a file that cannot be mapped
                return found
            with mm:
                size = len(mm)
                scores = [k for k in wanted if k.startswith("score_")]
                if len(scores) > 1 and mm.find(b'"score_') < 0:  # one pass rules both out
                    wanted = [k for k in wanted if k not in scores]
                for key in wanted:
                    pat = b'"' + key.encode() + b'"'
                    pos = 0
                    while True:
                        i = mm.find(pat, pos)
                        if i < 0:
                            break
                        j = i + len(pat)
                        while j < size and mm[j] in b" \t\r\n":
                            j += 1
                        if j >= size or mm[j] != ord(":"):
                            pos = i + 1
                            continue
                        start = mm.rfind(b"\n", 0, i) + 1
                        end = mm.find(b"\n", i)
                        end = size if end < 0 else end
                        try:
                            obj = json.loads(mm[start:end].decode("utf-8-sig"))
                        except (ValueError, RecursionError):
                            obj = None
                        if isinstance(obj, dict) and key in obj:
                            found.add(key)
                            break
                        pos = end + 1
        return found

    _json_cache: list[Any] | None = None

    def _load_json_array(self) -> list[Any]:
        if self._json_cache is None:
            raw = self.path.read_bytes()
            text = _decode_whole(raw, self.name)
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"malformed JSON: {e.msg} (column {e.colno})",
                                 file=self.name, line=e.lineno) from None
            except RecursionError:
                raise InputError(f"JSON nested too deeply to parse (more than about "
                                 f"{_max_depth()} levels)", file=self.name) from None
            if not isinstance(data, list):
                raise InputError("expected a JSON array of objects", file=self.name)
            if _SURROGATE_ESCAPE.search(raw):
                for i, obj in enumerate(data, start=1):
                    _check_surrogates(obj, self.name, i)
            self._json_cache = data
        return self._json_cache

    def _arrow_schema(self) -> pa.Schema:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            try:
                return pq.ParquetFile(self.path).schema_arrow
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
                raise InputError(f"cannot read Parquet: {e}", file=self.name) from None
        return self._dataset().data.table.schema

    _ds: Any = None

    def _dataset(self) -> Any:
        if self._ds is None:
            try:
                import datasets
            except ImportError:
                from .errors import MissingDependencyError

                raise MissingDependencyError(
                    "reading a saved or hub dataset needs the `datasets` package: "
                    "pip install 'realign[datasets]'") from None
            try:
                if self.format == "hub":
                    ds = datasets.load_dataset(self.name, split=self.split or "train")
                else:
                    ds = datasets.load_from_disk(str(self.path))
            except Exception as e:  # noqa: BLE001
                why = " ".join(str(e).split())
                if self.format == "hub":
                    raise InputError("not a local file or folder, and loading it from the "
                                     f"Hugging Face hub failed: {why}", file=self.name) from None
                raise InputError(f"cannot load dataset: {why}", file=self.name) from None
            if isinstance(ds, datasets.DatasetDict):
                splits = list(ds)
                split = self.split or ("train" if "train" in ds else None)
                if split is None and len(splits) == 1:
                    split = splits[0]
                if split not in ds:
                    raise InputError(
                        f"choose a split with --split (available: {', '.join(splits)})",
                        file=self.name)
                ds = ds[split]
            ds = ds.flatten_indices() if ds._indices is not None else ds
            self._ds = ds
        return self._ds

    # -- streaming ----------------------------------------------------------------
    def blocks(self) -> Iterator[PairBlock]:
        if self.format == "jsonl":
            yield from self._jsonl_blocks()
        elif self.format == "json":
            yield from self._json_blocks()
        else:
            yield from self._arrow_blocks()

    def _jsonl_blocks(self) -> Iterator[PairBlock]:
        schema = self._input_schema()
        first_line = 1
        any_rows = False
        with self.path.open("rb") as fh:
            carry = b""
            while True:
                chunk = fh.read(self.block_bytes)
                if not chunk and not carry:
                    break
                data = carry + chunk
                if chunk:
                    cut = data.rfind(b"\n")
                    if cut < 0:
                        carry = data
                        continue
                    data, carry = data[: cut + 1], data[cut + 1:]
                else:
                    carry = b""
                if first_line == 1 and data.startswith(_BOM):
                    data = data[3:]
                block = self._parse_jsonl_block(data, first_line, schema)
                block.bytes_read = len(data)
                first_line += data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
                if block.table.num_rows or block.bad:
                    any_rows = True
                yield block
        if not any_rows:
            raise InputError("empty file: no rows", file=self.name)

    def _input_schema(self) -> pa.Schema:
        text = MESSAGE_TYPE if self.style == "conversational" else pa.string()
        fields = [pa.field(n, text) for n in TEXT_FIELDS if n in self._columns]
        fields += [pa.field(n, pa.float64()) for n in SCORE_FIELDS if n in self._columns]
        return pa.schema(fields)

    def _parse_jsonl_block(self, data: bytes, first_line: int, schema: pa.Schema) -> PairBlock:
        """Fast path: Arrow's JSON reader on the whole block; any doubt -> the slow path.

        Arrow rejects invalid UTF-8 and malformed JSON but drops blank lines (which would
        shift line numbers) and names no line: blocks with a blank line, an Arrow error,
        a row count that differs from the line count, or a bad value are parsed again
        line by line, which names the exact line and field.
        """
        body = data[:-1] if data.endswith(b"\n") else data
        n_lines = body.count(b"\n") + 1
        cut = body.find(b"\n")
        if not (body if cut < 0 else body[:cut]).strip() or _BLANK_LINE.search(body):
            return self._parse_jsonl_slow(data, first_line, schema)
        try:
            table = pj.read_json(
                io.BytesIO(data),
                read_options=pj.ReadOptions(use_threads=True, block_size=ARROW_BLOCK_BYTES),
                parse_options=pj.ParseOptions(
                    explicit_schema=schema, unexpected_field_behavior="ignore"),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return self._parse_jsonl_slow(data, first_line, schema)
        if table.num_rows != n_lines:
            return self._parse_jsonl_slow(data, first_line, schema)
        line_numbers = pa.array(np.arange(first_line, first_line + n_lines, dtype=np.int64))
        try:
            norm = self._normalize(table, line_numbers)
        except InputError:
            return self._parse_jsonl_slow(data, first_line, schema)
        return PairBlock(table=norm, raw_data=data)

    def _parse_jsonl_slow(self, data: bytes, first_line: int, schema: pa.Schema) -> PairBlock:
        """Line-by-line parse that names the exact line and field of every problem."""
        rows: list[dict[str, Any]] = []
        keep: list[bytes] = []
        numbers: list[int] = []
        bad: list[BadRow] = []
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for i, raw in enumerate(lines):
            line = first_line + i
            if not raw.strip():
                continue
            try:
                obj = _parse_line(raw, self.name, line)
                rows.append(self._check_row(obj, line))
                keep.append(raw)
                numbers.append(line)
            except InputError as e:
                if not self.skip_bad_rows:
                    raise
                bad.append(BadRow(line=line, field=e.field, message=e.message))
        table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
        norm = self._normalize(table, pa.array(numbers, pa.int64()))
        return PairBlock(table=norm, _lines=keep, bad=bad)

    def _check_row(self, obj: Any, line: int) -> dict[str, Any]:
        """Validate one decoded row; return it reduced to the known fields."""
        if not isinstance(obj, dict):
            raise InputError(f"expected a JSON object, got {_type_name(obj)}",
                             file=self.name, line=line)
        out: dict[str, Any] = {}
        for name in TEXT_FIELDS:
            if name == "prompt" and self.implicit_prompt:
                continue
            if name not in obj or obj[name] is None:
                raise InputError("missing required field", file=self.name, line=line,
                                 field=name)
            value = obj[name]
            if self.style == "standard":
                if not isinstance(value, str):
                    raise InputError(f"expected a string, got {_type_name(value)}",
                                     file=self.name, line=line, field=name)
            else:
                _check_messages(value, self.name, line, name)
            out[name] = value
        for name in SCORE_FIELDS:
            if name in self._columns:
                value = obj.get(name)
                if value is None:  # an unscored pair: left out of the preference gap
                    out[name] = None
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(f"expected a number, got {_type_name(value)}",
                                     file=self.name, line=line, field=name)
                try:
                    number = float(value)
                except OverflowError:
                    number = math.inf
                if not math.isfinite(number):
                    raise InputError(f"expected a finite number, got {_non_finite(value)}",
                                     file=self.name, line=line, field=name)
                out[name] = number
        return out

    def _json_blocks(self) -> Iterator[PairBlock]:
        objs = self._load_json_array()
        schema = self._input_schema()
        step = 10_000
        for start in range(0, len(objs), step):
            part = objs[start: start + step]
            rows, keep, numbers, bad = [], [], [], []
            for i, obj in enumerate(part):
                line = start + i + 1
                try:
                    rows.append(self._check_row(obj, line))
                    keep.append(obj)
                    numbers.append(line)
                except InputError as e:
                    if not self.skip_bad_rows:
                        raise
                    bad.append(BadRow(line=line, field=e.field, message=e.message))
            table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
            norm = self._normalize(table, pa.array(numbers, pa.int64()))
            yield PairBlock(table=norm, raw_objects=keep, bad=bad,
                            bytes_read=self.total_bytes * len(part) // max(len(objs), 1))

    def _arrow_batches(self) -> Iterator[pa.RecordBatch]:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(self.path).iter_batches(batch_size=8192)
        else:
            yield from self._dataset().data.table.to_batches(max_chunksize=8192)

    def _arrow_blocks(self) -> Iterator[PairBlock]:
        offset = 0
        total_rows = self._total_rows()
        if total_rows == 0:
            raise InputError("empty file: no rows", file=self.name)
        for batch in self._arrow_batches():
            table = pa.Table.from_batches([batch])
            n = table.num_rows
            numbers = pa.array(range(offset + 1, offset + n + 1), pa.int64())
            picked = {}
            for name in table.column_names:
                if name in TEXT_FIELDS or name in SCORE_FIELDS:
                    picked[name] = table.column(name)
            try:
                sub = pa.table(picked)
                norm = self._normalize(sub, numbers)
                bad: list[BadRow] = []
                raw = table
            except InputError:
                if not self.skip_bad_rows:
                    raise
                norm, raw, bad = self._arrow_rowwise(table, offset)
            offset += n
            yield PairBlock(table=norm, raw_table=raw, bad=bad,
                            bytes_read=self.total_bytes * n // max(total_rows, 1))

    def _arrow_rowwise(self, table: pa.Table, offset: int) -> tuple[pa.Table, pa.Table, list[BadRow]]:
        rows, keep_idx, numbers, bad = [], [], [], []
        for i, obj in enumerate(table.to_pylist()):
            line = offset + i + 1
            try:
                rows.append(self._check_row(obj, line))
                keep_idx.append(i)
                numbers.append(line)
            except InputError as e:
                bad.append(BadRow(line=line, field=e.field, message=e.message))
        schema = self._input_schema()
        t = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
        return self._normalize(t, pa.array(numbers, pa.int64())), table.take(keep_idx), bad

    def _total_rows(self) -> int:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        return self._dataset().num_rows

    # -- normalization --------------------------------------------------------------
    def _normalize(self, table: pa.Table, lines: pa.Array) -> pa.Table:
        """Map the input columns to NORMALIZED_SCHEMA, raising on nulls/wrong types."""
        cols: dict[str, pa.Array] = {"line": lines}
        for name in ("chosen", "rejected") + (() if self.implicit_prompt else ("prompt",)):
            col = table.column(name).combine_chunks()
            self._check_column(col, name, lines)
        if self.implicit_prompt:
            prompt, chosen, rejected = _split_implicit(
                table.column("chosen").to_pylist(), table.column("rejected").to_pylist(),
                conversational=self.style == "conversational")
            cols.update(prompt=prompt, chosen=chosen, rejected=rejected)
        else:
            for name in TEXT_FIELDS:
                col = table.column(name).combine_chunks()
                col = _messages_to_text(col) if self.style == "conversational" else col
                cols[name] = col if col.type == pa.string() else pc.cast(col, pa.string())
        for name in SCORE_FIELDS:
            if name in table.column_names:
                col = table.column(name).combine_chunks()
                if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
                        or pa.types.is_null(col.type)):
                    raise InputError(f"expected a number, got {col.type}", file=self.name,
                                     line=int(lines[0].as_py()) if len(lines) else None,
                                     field=name)
                col = pc.cast(col, pa.float64())
                bad = pc.invert(pc.is_finite(col)).fill_null(False)
                if pc.any(bad).as_py():
                    idx = pc.index(bad, True).as_py()
                    raise InputError(
                        f"expected a finite number, got {_non_finite(col[idx].as_py())}",
                        file=self.name, line=int(lines[idx].as_py()), field=name)
                cols[name] = col
            else:
                cols[name] = pa.nulls(len(lines), pa.float64())
        return pa.Table.from_pydict({k: cols[k] for k in NORMALIZED_SCHEMA.names},
                                    schema=NORMALIZED_SCHEMA)

    def _check_column(self, col: pa.Array, name: str, lines: pa.Array) -> None:
        want_list = self.style == "conversational"
        t = col.type
        ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) if want_list else (
            _is_text(t) or pa.types.is_null(t))
        if not ok:
            expected = "a list of messages" if want_list else "a string"
            raise InputError(f"expected {expected}, got {t}", file=self.name,
                             line=int(lines[0].as_py()) if len(lines) else None, field=name)
        if want_list:
            vt = t.value_type
            if not (pa.types.is_struct(vt) and vt.get_field_index("content") >= 0
                    and _is_text(vt.field("content").type)):
                raise InputError(
                    f"expected a list of {{role, content}} messages, got {t}", file=self.name,
                    line=int(lines[0].as_py()) if len(lines) else None, field=name)
        if col.null_count:
            idx = pc.index(pc.is_null(col), True).as_py()
            raise InputError("missing required field", file=self.name,
                             line=int(lines[idx].as_py()), field=name)
        if want_list:
            values = pc.list_flatten(col)
            if values.null_count or pc.any(pc.is_null(pc.struct_field(values, "content"))).as_py():
                parents = pc.list_parent_indices(col)
                bad = pc.or_(pc.is_null(values), pc.is_null(pc.struct_field(values, "content")))
                idx = parents[pc.index(bad, True).as_py()].as_py()
                raise InputError("message without 'content'", file=self.name,
                                 line=int(lines[idx].as_py()), field=name)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _messages_to_text(col: pa.Array) -> pa.Array:
    """list<struct<role, content>> -> the contents joined with newlines, per row."""
    contents = pc.struct_field(pc.list_flatten(col), "content")
    offsets = col.offsets
    if col.offset:  # sliced arrays: rebase offsets
        offsets = pc.subtract(offsets, offsets[0])
    make = pa.LargeListArray if pa.types.is_large_list(col.type) else pa.ListArray
    lists = make.from_arrays(offsets, contents)
    return pc.binary_join(lists, "\n")


def _split_implicit(chosen: list[Any], rejected: list[Any], *, conversational: bool
                    ) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Implicit-prompt rows: prompt = longest common prefix of chosen and rejected.

    Conversations: the common prefix of whole messages. Strings: the common prefix cut
    back to a word boundary (so a shared first word of the responses stays with them).
    """
    prompts, cs, rs = [], [], []
    for c, r in zip(chosen, rejected):
        if conversational:
            k = 0
            while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
                k += 1
            join = "\n".join
            prompts.append(join(m.get("content") or "" for m in c[:k]))
            cs.append(join(m.get("content") or "" for m in c[k:]))
            rs.append(join(m.get("content") or "" for m in r[k:]))
        else:
            k = len(os.path.commonprefix([c, r]))
            if k < min(len(c), len(r)):
                while k > 0 and not c[k - 1].isspace():
                    k -= 1
            prompts.append(c[:k])
            cs.append(c[k:])
            rs.append(r[k:])
    return pa.array(prompts, pa.string()), pa.array(cs, pa.string()), pa.array(rs, pa.string())


def _check_messages(value: Any, file: str, line: int, name: str) -> None:
    if not isinstance(value, list):
        raise InputError(f"expected a list of messages, got {_type_name(value)}",
                         file=file, line=line, field=name)
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InputError(
                f"message {j + 1} must be an object with a string 'content'",
                file=file, line=line, field=name)
        if "role" in m and not isinstance(m["role"], str):
            raise InputError(f"message {j + 1}: 'role' must be a string",
                             file=file, line=line, field=name)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "number", float: "number", type(None): "null"}.get(type(value),
                                                                   type(value).__name__)


def check_readable(path: Path, name: str | None = None) -> None:
    """Refuse what cannot be read as a file or a dataset folder: a FIFO, a socket or a
    device (reading one would block or never end), and paths without read permission."""
    name = str(path) if name is None else name
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", file=name) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise InputError(f"is {kind}, not a regular file or a folder", file=name)
    if not os.access(path, os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)):
        raise InputError("permission denied", file=name)


def _max_depth() -> int:
    import sys

    return sys.getrecursionlimit()


def _parse_line(raw: bytes, file: str, line: int) -> Any:
    """One JSONL line -> its JSON value, or an :class:`InputError` naming the line."""
    text = _decode(raw, file, line)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg} (column {e.colno})",
                         file=file, line=line) from None
    except RecursionError:
        raise InputError(f"JSON nested too deeply to parse (more than about {_max_depth()} "
                         "levels)", file=file, line=line) from None
    if _SURROGATE_ESCAPE.search(raw):
        _check_surrogates(obj, file, line)
    return obj


def _check_surrogates(obj: Any, file: str, line: int, field: str | None = None) -> None:
    """A JSON ``\\uD800``-``\\uDFFF`` escape that is not half of a pair decodes to a lone
    surrogate, which is not a character (it cannot be written as UTF-8): bad input."""
    stack: list[tuple[Any, str | None]] = [(obj, field)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(
                    f"lone surrogate \\u{ord(value[e.start]):04x} (character {e.start + 1}): "
                    "not a Unicode character", file=file, line=line, field=where) from None
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, where))
                stack.append((v, where if where is not None else k))
        elif isinstance(value, list):
            stack.extend((v, where) for v in value)


def _non_finite(value: Any) -> str:
    if isinstance(value, int):
        return "a number too large for a float"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _decode(raw: bytes, file: str, line: int) -> str:
    try:
        return raw.decode("utf-8-sig" if raw.startswith(b"\xef\xbb\xbf") else "utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 byte 0x{raw[e.start]:02x} (byte {e.start + 1} of "
                         "the line)", file=file, line=line) from None


def _decode_whole(raw: bytes, file: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"invalid UTF-8 byte 0x{raw[e.start]:02x}", file=file,
                         line=line) from None


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def iter_rows(path: str | Path, **kw: Any) -> Iterator[dict[str, Any]]:
    """Convenience: normalized rows as dicts (small data, tests, training prep)."""
    for block in PairSource(path, **kw).blocks():
        yield from block.table.to_pylist()
