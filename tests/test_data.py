"""PairSource: every input format and row shape, streamed, with exact line numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from realign.data import PairSource, detect_format, iter_rows
from realign.errors import InputError

ROWS = [
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five.",
     "score_chosen": 9, "score_rejected": 2},
    {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Green, maybe.",
     "score_chosen": 8, "score_rejected": 4},
    {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito.",
     "score_chosen": 10, "score_rejected": 1},
]


def msgs(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def conv_rows() -> list[dict[str, Any]]:
    return [{"prompt": msgs("user", r["prompt"]), "chosen": msgs("assistant", r["chosen"]),
             "rejected": msgs("assistant", r["rejected"])} for r in ROWS]


def write_jsonl(path: Path, rows: list[Any], *, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_all(path: Path, **kw: Any) -> list[dict[str, Any]]:
    return list(iter_rows(path, **kw))


def test_jsonl_standard_with_scores(tmp_path: Path) -> None:
    src = PairSource(write_jsonl(tmp_path / "p.jsonl", ROWS))
    assert (src.format, src.style, src.implicit_prompt, src.has_scores) == (
        "jsonl", "standard", False, True)
    rows = read_all(src.path)
    assert [r["line"] for r in rows] == [1, 2, 3]
    assert rows[2]["chosen"] == "Lima." and rows[2]["score_rejected"] == 1.0


def test_json_array_and_parquet_and_dataset_agree(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps(ROWS, indent=2))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    expected = read_all(write_jsonl(tmp_path / "p.jsonl", ROWS))
    for name, fmt in (("p.json", "json"), ("p.parquet", "parquet"), ("ds", "dataset")):
        assert detect_format(tmp_path / name) == fmt
        assert read_all(tmp_path / name) == expected, name


def test_dataset_dict_needs_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"a": datasets.Dataset.from_list(ROWS[:1]),
                               "b": datasets.Dataset.from_list(ROWS[1:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="--split"):
        PairSource(tmp_path / "dd")
    rows = read_all(tmp_path / "dd", split="b")
    assert [r["prompt"] for r in rows] == [ROWS[1]["prompt"], ROWS[2]["prompt"]]
    assert [r["line"] for r in rows] == [1, 2]


def test_conversational_with_extra_message_keys(tmp_path: Path) -> None:
    rows = conv_rows()
    rows[0]["chosen"] = [{"role": "assistant", "content": "Four.", "name": "bot", "weight": 1}]
    rows[1]["prompt"] = [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": ROWS[1]["prompt"]}]
    for path in (write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "c.parquet"):
        if path.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(rows), path)
        src = PairSource(path)
        assert src.style == "conversational" and not src.implicit_prompt
        got = read_all(path)
        assert got[0]["chosen"] == "Four."
        assert got[1]["prompt"] == "Be brief.\n" + ROWS[1]["prompt"]
        assert [r["line"] for r in got] == [1, 2, 3]


def test_implicit_prompt_strings_and_conversations(tmp_path: Path) -> None:
    rows = [{"chosen": "Q: capital of Peru? A: Lima.", "rejected": "Q: capital of Peru? A: Quito."},
            {"chosen": "Say hi. Hello there", "rejected": "Say hi. Hey"}]
    got = read_all(write_jsonl(tmp_path / "i.jsonl", rows))
    assert PairSource(tmp_path / "i.jsonl").implicit_prompt
    # the prompt is cut back to a word boundary: "A:" stays with the prompt, not "Lima."
    assert (got[0]["prompt"], got[0]["chosen"], got[0]["rejected"]) == (
        "Q: capital of Peru? A: ", "Lima.", "Quito.")
    assert (got[1]["prompt"], got[1]["chosen"], got[1]["rejected"]) == (
        "Say hi. ", "Hello there", "Hey")
    conv = [{"chosen": msgs("user", "Capital of Peru?") + msgs("assistant", "Lima."),
             "rejected": msgs("user", "Capital of Peru?") + msgs("assistant", "Quito.")}]
    got = read_all(write_jsonl(tmp_path / "ic.jsonl", conv))
    assert (got[0]["prompt"], got[0]["chosen"], got[0]["rejected"]) == (
        "Capital of Peru?", "Lima.", "Quito.")


def test_scores_optional_fields_seen_after_first_row(tmp_path: Path) -> None:
    rows = [dict(ROWS[0]), dict(ROWS[1]), dict(ROWS[2])]
    for k in ("score_chosen", "score_rejected"):
        del rows[0][k]
    rows[1]["score_chosen"] = None
    src = PairSource(write_jsonl(tmp_path / "s.jsonl", rows))
    assert src.has_scores
    got = read_all(src.path)
    assert got[0]["score_chosen"] is None and got[1]["score_chosen"] is None
    assert got[2]["score_chosen"] == 10.0


@pytest.mark.parametrize("block_bytes", [7, 64, 150, 1 << 20])
def test_jsonl_block_boundaries_keep_every_row_and_line(tmp_path: Path, block_bytes: int) -> None:
    rows = [{"prompt": f"question number {i} " + "x" * (i % 13), "chosen": f"a{i}",
             "rejected": f"b{i}"} for i in range(60)]
    path = write_jsonl(tmp_path / "b.jsonl", rows, blank_after=17)
    # and no trailing newline at the end of the file
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    got = read_all(path, block_bytes=block_bytes)
    assert [r["chosen"] for r in got] == [f"a{i}" for i in range(60)]
    assert [r["line"] for r in got] == [i + 1 if i < 17 else i + 2 for i in range(60)]


def test_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in ROWS) + b"\r\n")
    got = read_all(path)
    assert [r["line"] for r in got] == [1, 2, 3]
    assert got[0]["prompt"] == ROWS[0]["prompt"] and got[2]["rejected"] == "Quito."


@pytest.mark.parametrize(
    ("content", "line", "field", "what"),
    [
        (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{bad json\n', 2, None, "malformed JSON"),
        (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
         2, "rejected", "missing required field"),
        (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 5, "rejected": "c"}\n',
         2, "chosen", "expected a string, got number"),
        (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": ["x"], "rejected": "c"}\n',
         2, "chosen", "expected a string, got array"),
        (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n\n{"prompt": "a", "chosen": null, "rejected": "c"}\n',
         4, "chosen", "missing required field"),
        (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff", "chosen": "b", "rejected": "c"}\n',
         2, None, "invalid UTF-8"),
        (b'{"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 1, "score_rejected": 2}\n'
         b'{"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": "9", "score_rejected": 2}\n',
         2, "score_chosen", "expected a number, got string"),
        (b'{"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 1, "score_rejected": 2}\n'
         b'{"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": true, "score_rejected": 2}\n',
         2, "score_chosen", "expected a number, got boolean"),
        (b'{"prompt": "a", "chosen": "b"}\n', 1, "rejected", "missing required field"),
        (b'[1, 2]\n', 1, None, "expected a JSON object"),
        (b'\n\n', None, None, "empty file"),
        (b'', None, None, "empty file"),
    ],
)
def test_bad_jsonl_names_file_line_field(tmp_path: Path, content: bytes, line: int | None,
                                         field: str | None, what: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError) as ei:
        read_all(path)
    e = ei.value
    assert (e.file, e.line, e.field) == (str(path), line, field)
    assert what in e.message
    assert "\n" not in str(e)


def test_conversational_bad_rows(tmp_path: Path) -> None:
    rows = conv_rows()
    rows[2]["rejected"] = [{"role": "assistant"}]
    with pytest.raises(InputError) as ei:
        read_all(write_jsonl(tmp_path / "c.jsonl", rows))
    assert (ei.value.line, ei.value.field) == (3, "rejected")
    rows = conv_rows()
    rows[1]["chosen"] = "plain text in a conversational file"
    with pytest.raises(InputError) as ei:
        read_all(write_jsonl(tmp_path / "c2.jsonl", rows))
    assert (ei.value.line, ei.value.field) == (2, "chosen")


def test_parquet_bad_types_and_nulls(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[1]["rejected"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "n.parquet")
    with pytest.raises(InputError) as ei:
        read_all(tmp_path / "n.parquet")
    assert (ei.value.line, ei.value.field) == (2, "rejected")
    pq.write_table(pa.table({"prompt": ["a"], "chosen": [1], "rejected": ["b"]}),
                   tmp_path / "t.parquet")
    with pytest.raises(InputError) as ei:
        read_all(tmp_path / "t.parquet")
    assert (ei.value.line, ei.value.field) == (1, "chosen")
    # messages without a content field at all
    pq.write_table(pa.table({"prompt": [[{"role": "user", "text": "a"}]],
                             "chosen": [[{"role": "assistant", "text": "b"}]],
                             "rejected": [[{"role": "assistant", "text": "c"}]]}),
                   tmp_path / "m.parquet")
    with pytest.raises(InputError, match="content"):
        read_all(tmp_path / "m.parquet")


def test_large_string_parquet(tmp_path: Path) -> None:
    t = pa.Table.from_pylist(ROWS).cast(pa.schema(
        [("prompt", pa.large_string()), ("chosen", pa.large_string()),
         ("rejected", pa.large_string()), ("score_chosen", pa.int64()),
         ("score_rejected", pa.int64())]))
    pq.write_table(t, tmp_path / "l.parquet")
    assert read_all(tmp_path / "l.parquet")[1]["rejected"] == "Green, maybe."


def test_skip_bad_rows_collects_them(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
        b'{oops\n'
        b'{"prompt": "a", "chosen": 3, "rejected": "c"}\n'
        b'\n'
        b'{"prompt": "d", "chosen": "e", "rejected": "f"}\n')
    src = PairSource(path, skip_bad_rows=True)
    blocks = list(src.blocks())
    bad = [(b.line, b.field) for blk in blocks for b in blk.bad]
    assert bad == [(2, None), (3, "chosen")]
    assert [r for blk in blocks for r in blk.table.column("line").to_pylist()] == [1, 5]


def test_unknown_and_missing(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(InputError, match="unknown format"):
        PairSource(tmp_path / "x.csv")
    with pytest.raises(InputError, match="not found"):
        PairSource(tmp_path / "nope.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="saved `datasets` dataset"):
        PairSource(tmp_path / "folder")


def test_optional_fields_are_learned_from_the_whole_file(tmp_path: Path) -> None:
    """Issue 13 item 6: a score or prompt field that first appears after the sniffed head
    counts; the word as a value, inside a string or as a nested key does not."""
    from realign.data import SNIFF_ROWS

    head = [{"chosen": f"c {i}", "rejected": f"r {i}", "kind": "prompt",
             "note": 'say "score_chosen": here', "meta": {"prompt": 1, "score_chosen": 2}}
            for i in range(SNIFF_ROWS + 50)]
    src = PairSource(write_jsonl(tmp_path / "decoys.jsonl", head))
    assert (src.implicit_prompt, src.has_scores) == (True, False)
    late = head + [{"chosen": "c", "rejected": "r", "score_chosen": 7, "score_rejected": 2}]
    src = PairSource(write_jsonl(tmp_path / "late.jsonl", late))
    assert src.has_scores and src.implicit_prompt
    assert read_all(src.path)[-1]["score_chosen"] == 7.0
    # JSON arrays: every object counts too
    (tmp_path / "late.json").write_text(json.dumps(late))
    assert PairSource(tmp_path / "late.json").has_scores


def test_non_regular_input_is_refused(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "p.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="FIFO"):
        PairSource(fifo)
    with pytest.raises(InputError, match="device"):
        PairSource("/dev/null")
