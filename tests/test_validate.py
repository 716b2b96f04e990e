"""`realign validate` and :func:`realign.validation.validate_file`: findings, gates, files.

One synthetic set with planted problems at known rows is written in every input format;
the findings must name exactly the planted lines. Evaluation items and the ordinary
prompts are real text (paragraphs of standard-library docstrings, tests/data).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from realign.cli import app
from realign.errors import InputError
from realign.gates import Thresholds
from realign.validation import validate_file

CORPUS = json.loads((Path(__file__).parent / "data" / "stdlib_paragraphs.json").read_text())[
    "paragraphs"]
ITEMS = CORPUS[:8]
RECT = ("If a rectangle has a length of 12 centimeters and a width of 5 centimeters, "
        "what is its area in square centimeters?")
OTHER = CORPUS[8:]
N = 60

# 1-based lines (row index + 1) of the planted problems
DUPLICATES = [11, 12]
IDENTICAL = [13]
EMPTY = [14]
CONTAMINATED = [21, 22, 23, 24, 25, 26]
USABLE = N - len(DUPLICATES) - len(IDENTICAL) - len(EMPTY) - len(CONTAMINATED)


def change_words(text: str, positions: list[int]) -> str:
    words = text.split()
    for p in positions:
        words[p] = "zzyzx"
    return " ".join(words)


def make_rows() -> list[dict[str, Any]]:
    rows = []
    for i in range(N):
        long_, short = " ".join(OTHER[i + 100].split()[:25]), f"Reply number {i}."
        chosen, rejected = (long_, short) if i % 2 else (short, long_)
        # scores use both ends of 1-10, so `auto` reads that scale beyond doubt
        rows.append({"prompt": OTHER[i], "chosen": chosen, "rejected": rejected,
                     "score_chosen": 8 + i % 3, "score_rejected": 1 + i % 4})
    rows[10] = dict(rows[3])  # line 11: exact duplicate of line 4
    rows[11] = dict(rows[5], prompt="  " + rows[5]["prompt"].upper().replace(" ", " \t "))
    rows[12]["rejected"] = rows[12]["chosen"].replace(" ", "   ") + " "  # identical
    rows[13]["rejected"] = " \n "  # empty
    assert all(len(ITEMS[k].split()) >= 15 for k in range(4))
    rows[20]["prompt"] = ITEMS[0]  # verbatim
    rows[21]["prompt"] = ITEMS[1].upper().replace(",", " ;").replace(".", "!!")  # case/punct
    rows[22]["prompt"] = change_words(ITEMS[2], [3, 9])  # 2 words changed
    rows[23]["prompt"] = change_words(ITEMS[3], [2, 7, 12])  # 3 words changed
    rows[24]["prompt"] = f"{OTHER[200]} Now consider this: {ITEMS[4]} Answer in one line."
    rows[25]["chosen"] = f"As the documentation says: {ITEMS[5]}"  # in a response
    # not contaminated: the same template with other numbers, and same-topic text
    rows[26]["prompt"] = RECT.replace("12", "7").replace("5 ", "3 ")
    rows[27]["prompt"] = ("A rectangle is a quadrilateral with four right angles; its area is "
                          "its length times its width, in square units.")
    return rows


def eval_rows() -> list[dict[str, Any]]:
    return [{"id": k, "question": t} for k, t in enumerate(ITEMS + [RECT])]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows in the format the path names (.jsonl, .json, .parquet, else a dataset)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def read(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    import datasets

    return datasets.load_from_disk(str(path)).to_list()


@pytest.fixture
def evalset(tmp_path: Path) -> Path:
    return write(tmp_path / "eval.jsonl", eval_rows())


def relaxed(min_pairs: int = 10) -> Thresholds:
    return Thresholds(overrides={"min_pairs": min_pairs})


def findings(v: Any) -> dict[str, list[int]]:
    return {k: v.findings[k] for k in ("duplicates", "identical", "empty", "contaminated")}


EXPECTED = {"duplicates": DUPLICATES, "identical": IDENTICAL, "empty": EMPTY,
            "contaminated": CONTAMINATED}


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "p.parquet", "ds"])
def test_findings_match_planted_lines_in_every_format(tmp_path: Path, evalset: Path,
                                                      name: str) -> None:
    path = write(tmp_path / name, make_rows())
    v = validate_file(path, eval_sets=[evalset], thresholds=relaxed())
    assert findings(v) == EXPECTED
    assert v.findings["counts"]["usable"] == USABLE
    hits = {h["line"]: h["eval_line"] for h in v.findings["contamination"]["hits"]}
    assert hits == {21: 1, 22: 2, 23: 3, 24: 4, 25: 5, 26: 6}
    assert v.gate("min_pairs").value == USABLE
    assert v.gate("decontamination").value == pytest.approx(1 - 6 / N)


@pytest.mark.parametrize("block_bytes", [300, 4096])
def test_block_boundaries_and_blank_lines_keep_line_numbers(tmp_path: Path, evalset: Path,
                                                            block_bytes: int) -> None:
    rows = make_rows()
    lines = [json.dumps(r) for r in rows]
    lines.insert(15, "")  # a blank line after line 15 shifts every later line by one
    lines.insert(30, "   ")
    path = tmp_path / "blank.jsonl"
    path.write_text("\n".join(lines) + "\n")
    shift = {d: d + (d > 15) + (d > 29) for d in range(1, N + 1)}
    v = validate_file(path, eval_sets=[evalset], thresholds=relaxed(), block_bytes=block_bytes)
    assert findings(v) == {k: [shift[x] for x in xs] for k, xs in EXPECTED.items()}


def test_gates_scores_and_length(tmp_path: Path, evalset: Path) -> None:
    rows = make_rows()
    v = validate_file(write(tmp_path / "p.jsonl", rows), eval_sets=[evalset],
                      thresholds=relaxed())
    assert [g.name for g in v.gates] == ["min_pairs", "preference_gap", "decontamination",
                                         "length_bias"]
    bad = {d - 1 for xs in EXPECTED.values() for d in xs}
    usable = [r for i, r in enumerate(rows) if i not in bad]
    gap = sum((r["score_chosen"] - r["score_rejected"]) / 9 for r in usable) / len(usable)
    assert v.gate("preference_gap").value == pytest.approx(gap)
    assert "1-10" in v.gate("preference_gap").detail and "inferred" in v.gate("preference_gap").detail
    longer = sum(len(r["chosen"].split()) > len(r["rejected"].split()) for r in usable)
    assert v.gate("length_bias").value == pytest.approx(longer / len(usable))
    assert v.status == "pass"
    # a declared scale changes the mapping; a score outside it is an input error
    v2 = validate_file(tmp_path / "p.jsonl", eval_sets=[evalset], score_scale="0-20",
                       thresholds=relaxed())
    assert v2.gate("preference_gap").value == pytest.approx(gap * 9 / 20)
    with pytest.raises(InputError) as ei:
        validate_file(tmp_path / "p.jsonl", score_scale="1-5", write_clean=tmp_path / "c.jsonl")
    assert ei.value.field == "score_chosen" and ei.value.line == 1
    assert not (tmp_path / "c.jsonl").exists()


def test_scores_null_missing_and_unmeasured(tmp_path: Path) -> None:
    rows = [{"prompt": f"p {i} {OTHER[i]}", "chosen": f"c {i}", "rejected": f"r {i} longer"}
            for i in range(6)]
    v = validate_file(write(tmp_path / "n.jsonl", rows), thresholds=relaxed(1))
    g = v.gate("preference_gap")
    assert g.status == "unmeasured" and "no score" in g.detail
    assert v.gate("decontamination").status == "unmeasured"
    assert v.status == "incomplete"
    # 2 of 6 usable pairs scored (one more has a null score): under the 80% coverage
    # needed, the gap is unmeasured and the detail gives the count (it used to be
    # measured on the two pairs)
    rows[0].update(score_chosen=5, score_rejected=1)
    rows[1].update(score_chosen=None, score_rejected=2)
    rows[2].update(score_chosen=4, score_rejected=3)
    v = validate_file(write(tmp_path / "m.jsonl", rows), thresholds=relaxed(1))
    g = v.gate("preference_gap")
    assert g.status == "unmeasured" and g.value is None
    assert "only 2 of 6 usable pairs (33.3%) have both scores" in g.detail
    assert v.findings["preference_gap"]["scored_pairs"] == 2
    # the share is configurable: at 1/3 the same file is measured (scale 1-5, beyond
    # doubt: the scores reach 1 and 5), and the detail counts the pairs left out
    v = validate_file(tmp_path / "m.jsonl", thresholds=relaxed(1), gap_min_coverage=1 / 3)
    g = v.gate("preference_gap")
    assert g.value == pytest.approx(((5 - 1) + (4 - 3)) / 2 / 4)
    assert "of 6 usable (33.3%; 4 without both scores left out)" in g.detail
    # scores outside every standard scale: unmeasured, saying how to declare one
    for r in rows:
        r.update(score_chosen=400, score_rejected=3)
    v = validate_file(write(tmp_path / "o.jsonl", rows), thresholds=relaxed(1))
    assert v.gate("preference_gap").status == "unmeasured"
    assert "--score-scale" in v.gate("preference_gap").detail


def test_conversational_and_implicit_prompt(tmp_path: Path, evalset: Path) -> None:
    rows = make_rows()

    def conv(r: dict[str, Any]) -> dict[str, Any]:
        user = [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": r["prompt"]}]
        return {"chosen": user + [{"role": "assistant", "content": r["chosen"]}],
                "rejected": user + [{"role": "assistant", "content": r["rejected"]}],
                "score_chosen": r["score_chosen"], "score_rejected": r["score_rejected"]}

    implicit = [conv(r) for r in rows]
    v = validate_file(write(tmp_path / "ic.jsonl", implicit), eval_sets=[evalset],
                      thresholds=relaxed())
    assert findings(v) == EXPECTED
    assert v.artifacts["implicit_prompt"] and v.artifacts["style"] == "conversational"
    explicit = [{"prompt": c["chosen"][:2], "chosen": c["chosen"][2:],
                 "rejected": c["rejected"][2:]} for c in implicit]
    v = validate_file(write(tmp_path / "c.parquet", explicit), eval_sets=[evalset],
                      thresholds=relaxed())
    assert findings(v) == EXPECTED
    strings = [{"chosen": f"Q: {r['prompt']}\nA: {r['chosen']}",
                "rejected": f"Q: {r['prompt']}\nA: {r['rejected']}"} for r in rows]
    v = validate_file(write(tmp_path / "is.jsonl", strings), eval_sets=[evalset],
                      thresholds=relaxed())
    # string implicit prompts: the identical pair keeps its prompt in common, so it stays
    # identical; every planted line is still found
    assert findings(v) == EXPECTED


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt", "dataset"])
def test_eval_set_formats(tmp_path: Path, fmt: str) -> None:
    ev = eval_rows()
    if fmt == "txt":
        path = tmp_path / "e.txt"
        path.write_text("\n".join(r["question"] for r in ev) + "\n")
    else:
        path = write(tmp_path / ("e." + fmt if fmt != "dataset" else "eds"), ev)
    v = validate_file(write(tmp_path / "p.jsonl", make_rows()), eval_sets=[path],
                      thresholds=relaxed())
    assert v.findings["contaminated"] == CONTAMINATED
    assert v.findings["contamination"]["by_eval_set"] == {str(path): 6}


def test_eval_field_and_several_sets(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", [{"prompt": "ignore me", "body": t} for t in ITEMS[:3]])
    b = write(tmp_path / "b.jsonl", [{"body": t} for t in ITEMS[3:6]])
    v = validate_file(write(tmp_path / "p.jsonl", make_rows()), eval_sets=[a, b],
                      eval_field="body", thresholds=relaxed())
    assert v.findings["contaminated"] == CONTAMINATED
    assert v.findings["contamination"]["by_eval_set"] == {str(a): 3, str(b): 3}


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "p.parquet", "ds"])
def test_write_clean_keeps_exactly_the_usable_rows(tmp_path: Path, evalset: Path,
                                                   name: str) -> None:
    rows = make_rows()
    path = write(tmp_path / name, rows)
    out = tmp_path / ("clean_" + name)
    validate_file(path, eval_sets=[evalset], thresholds=relaxed(), write_clean=out)
    bad = {d - 1 for xs in EXPECTED.values() for d in xs}
    assert read(out) == [r for i, r in enumerate(rows) if i not in bad]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # the clean file validates clean
    v = validate_file(out, eval_sets=[evalset], thresholds=relaxed())
    assert all(not v.findings[k] for k in EXPECTED)


def test_write_clean_jsonl_keeps_original_bytes(tmp_path: Path) -> None:
    raw = ['{"prompt":"a b c","chosen":"x  y","rejected":"z","extra":{"k":[1,2]}}',
           '{"prompt": "A  B C", "chosen": "x y", "rejected": "z"}',
           '{"rejected": "w", "prompt": "d", "chosen": "é"}']
    (tmp_path / "r.jsonl").write_text("\r\n".join(raw) + "\r\n", encoding="utf-8")
    validate_file(tmp_path / "r.jsonl", thresholds=relaxed(1), write_clean=tmp_path / "o.jsonl")
    assert (tmp_path / "o.jsonl").read_bytes() == (raw[0] + "\r\n" + raw[2] + "\r\n").encode()


def test_nothing_written_on_bad_input(tmp_path: Path) -> None:
    rows = make_rows() * 20
    lines = [json.dumps(r) for r in rows]
    lines[1100] = lines[1100][:-5]  # truncated JSON after many blocks were written
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "deeper" / "clean.jsonl"
    with pytest.raises(InputError) as ei:
        validate_file(tmp_path / "bad.jsonl", write_clean=out, block_bytes=4096)
    assert ei.value.line == 1101
    # no file, no temporary file, and the folders it created are gone again
    assert not (tmp_path / "out").exists()
    out.parent.mkdir(parents=True)
    out.write_text("previous\n")  # an existing output is left as it was
    with pytest.raises(InputError):
        validate_file(tmp_path / "bad.jsonl", write_clean=out, block_bytes=4096)
    assert out.read_text() == "previous\n" and len(list(out.parent.iterdir())) == 1


def test_skip_bad_rows_counts_and_lists_them(tmp_path: Path) -> None:
    rows = make_rows()
    lines = [json.dumps(r) for r in rows]
    lines[40] = "{not json"
    lines[41] = json.dumps(dict(rows[41], chosen=7))
    lines[42] = json.dumps({k: v for k, v in rows[42].items() if k != "rejected"})
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "clean.jsonl"
    v = validate_file(tmp_path / "s.jsonl", skip_bad_rows=True, thresholds=relaxed(),
                      write_clean=out)
    assert [(m["line"], m["field"]) for m in v.findings["malformed"]] == [
        (41, None), (42, "chosen"), (43, "rejected")]
    assert v.findings["counts"]["malformed"] == 3
    assert v.findings["counts"]["rows"] == N and v.findings["counts"]["parsed"] == N - 3
    assert "of 60 rows" in v.gate("min_pairs").detail
    assert len(read(out)) == N - 3 - 4  # malformed, and duplicates/identical/empty


# ---------------------------------------------------------------------------- the CLI
runner = CliRunner()


def cli(*args: str) -> Any:
    return runner.invoke(app, ["validate", *args])


def test_cli_json_shape_and_exit_codes(tmp_path: Path, evalset: Path) -> None:
    path = write(tmp_path / "p.jsonl", make_rows())
    r = cli(str(path), "--eval", str(evalset), "--json", "--threshold", "min_pairs=10")
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert v["stage"] == "preference_data" and v["status"] == "pass"
    assert [g["name"] for g in v["gates"]] == ["min_pairs", "preference_gap",
                                               "decontamination", "length_bias"]
    assert {k: v["findings"][k] for k in EXPECTED} == EXPECTED
    for g in v["gates"]:
        assert set(g) >= {"name", "value", "threshold", "op", "status", "detail", "ci95"}
    assert cli(str(path), "--eval", str(evalset), "--json").exit_code == 1  # 47 < 1000 pairs
    assert cli(str(path), "--json", "--threshold", "min_pairs=10").exit_code == 3  # no eval set
    r = cli(str(path), "--eval", str(evalset), "--threshold", "min_pairs=10")
    assert r.exit_code == 0 and "decontamination" in r.stdout and "line 21" in r.stdout


@pytest.mark.parametrize(("name", "content", "expect"), [
    ("bad.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 5, '
     b'"rejected": "c"}\n', ":2: field 'chosen': expected a string"),
    ("trunc.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"\n',
     ":2: malformed JSON"),
    ("miss.jsonl", b'{"prompt": "a", "chosen": "b"}\n', ":1: field 'rejected': missing"),
    ("empty.jsonl", b"", ": empty file"),
    ("latin.jsonl", b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n',
     ":1: invalid UTF-8 byte 0xe9"),
    ("bom.json", b'\xef\xbb\xbf[{"prompt": "a", "chosen": "b", "rejected": 1}]',
     ":1: field 'rejected': expected a string"),
    ("data.csv", b"prompt,chosen,rejected\n", "unknown format '.csv'"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path: Path, name: str, content: bytes,
                                       expect: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "clean.jsonl"
    r = cli(str(path), "--write-clean", str(out))
    assert r.exit_code == 2
    msg = r.stderr.strip()
    assert msg.startswith("error: ") and str(path) in msg and expect in msg, msg
    assert "\n" not in msg and "Traceback" not in r.output
    assert not out.exists()


def test_cli_missing_files_and_bad_options(tmp_path: Path, evalset: Path) -> None:
    r = cli(str(tmp_path / "nope.jsonl"))
    assert r.exit_code == 2 and "file not found" in r.stderr
    path = write(tmp_path / "p.jsonl", make_rows())
    r = cli(str(path), "--eval", str(tmp_path / "missing_eval.jsonl"))
    assert r.exit_code == 2 and "evaluation set not found" in r.stderr
    assert cli(str(path), "--score-scale", "ten").exit_code == 2
    assert cli(str(path), "--min-coverage", "0").exit_code == 2
    assert cli(str(path), "--preset", "lenient").exit_code == 2
    r = cli(str(path), "--score-scale", "1-5")
    assert r.exit_code == 2 and ":1: field 'score_chosen': score 8" in r.stderr


def test_cli_eval_field_and_eval_formats(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", make_rows())
    body = write(tmp_path / "b.parquet", [{"prompt": "x", "body": t} for t in ITEMS])
    r = cli(str(path), "--json", "--eval", str(body), "--eval-field", "body")
    assert json.loads(r.stdout)["findings"]["contaminated"] == CONTAMINATED
    txt = tmp_path / "e.txt"
    txt.write_text("\n".join(ITEMS[:3]) + "\n")
    r = cli(str(path), "--json", "--eval", str(txt), "--eval", str(body), "--eval-field", "body")
    by_set = json.loads(r.stdout)["findings"]["contamination"]["by_eval_set"]
    # a pair counts for the set of its best-covered item; ties go to the first set given
    assert by_set == {str(txt): 3, str(body): 3}
    r = cli(str(path), "--eval", str(body), "--eval-field", "nope")
    assert r.exit_code == 2 and ":1: field 'nope'" in r.stderr


def test_cli_dataset_dict_split(tmp_path: Path, evalset: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = make_rows()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:30]),
                          "test": datasets.Dataset.from_list(rows[30:])}).save_to_disk(
        str(tmp_path / "dd"))
    r = cli(str(tmp_path / "dd"), "--json", "--split", "train", "--eval", str(evalset))
    assert json.loads(r.stdout)["findings"]["contaminated"] == CONTAMINATED
    r = cli(str(tmp_path / "dd"), "--json", "--split", "test")
    assert json.loads(r.stdout)["findings"]["counts"]["parsed"] == 30
    assert cli(str(tmp_path / "dd"), "--split", "dev").exit_code == 2


def _console_script() -> str:
    exe = Path(sys.executable).with_name("realign")
    return str(exe) if exe.exists() else shutil.which("realign") or "realign"


def test_real_console_script_exit_codes(tmp_path: Path, evalset: Path) -> None:
    path = write(tmp_path / "p.jsonl", make_rows())
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_console_script(), "validate", str(path), *args],
                              capture_output=True, text=True, env=env, timeout=120)

    ok = run("--eval", str(evalset), "--json", "--threshold", "min_pairs=10")
    assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "pass"
    assert run("--eval", str(evalset), "--json").returncode == 1
    assert run("--json", "--threshold", "min_pairs=10").returncode == 3
    bad = run("--score-scale", "1-5")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
