"""Issue 14 item 12: bad paths for `realign validate` are bad input (exit 2), never a
crash, a hang, or a replaced input.

Each case: exit code 2, a one-line error naming the path (and the line where there is
one), no traceback, nothing written or left behind (no temporary file, no empty folder),
and the input as it was. Exit 1 stays reserved for a failed gate.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import realign.validation as validation
from realign.cli import app
from typer.testing import CliRunner

runner = CliRunner()
ROWS = [{"prompt": f"Question number {i} about the weather?", "chosen": f"Sunny {i}.",
         "rejected": f"It will rain all day {i}, I think."} for i in range(20)]


def pairs(tmp_path: Path, lines: list[str] | None = None) -> Path:
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(lines if lines is not None else [json.dumps(r) for r in ROWS]) + "\n")
    return p


def cli(*args: str) -> Any:
    return runner.invoke(app, ["validate", *[str(a) for a in args]])


def bad_input(r: Any, *needles: str) -> str:
    """Assert a clean exit 2; return the one-line message."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    msg = r.stderr.strip()
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert "Traceback" not in r.output
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _fresh(tmp_path: Path) -> Path:
    """A valid pairs file in its own folder."""
    d = tmp_path / "fresh"
    d.mkdir(exist_ok=True)
    return pairs(d)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_clean_onto_the_input_is_refused(tmp_path: Path) -> None:
    src = pairs(tmp_path)
    before = src.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    hard = tmp_path / "hard.jsonl"
    os.link(src, hard)
    for out in (src, link, hard, tmp_path / "." / "pairs.jsonl"):
        bad_input(cli(src, "--write-clean", out), str(out), "overwrite the input")
    bad_input(cli(link, "--write-clean", src), str(src), "overwrite the input")
    assert src.read_bytes() == before and leftovers(tmp_path) == []


def test_write_clean_onto_an_eval_set_is_refused(tmp_path: Path) -> None:
    src = pairs(tmp_path)
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"question": "What is the boiling point of mercury today?"}) + "\n")
    bad_input(cli(src, "--eval", ev, "--write-clean", ev), str(ev), "evaluation set")
    assert "boiling" in ev.read_text()


def test_write_clean_onto_a_device_or_fifo_is_refused(tmp_path: Path) -> None:
    src = pairs(tmp_path)
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    bad_input(cli(src, "--write-clean", fifo), str(fifo), "not a regular file")
    assert Path(fifo).is_fifo()
    # /dev/full itself is checked without the CLI: a regression must not replace it
    from realign.data import PairSource
    from realign.errors import InputError

    if Path("/dev/full").exists():
        with pytest.raises(InputError, match="not a regular file"):
            validation.check_clean_target(PairSource(src), "/dev/full")


def test_write_clean_onto_a_folder_or_under_a_file_is_refused(tmp_path: Path) -> None:
    src = pairs(tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep.txt").write_text("mine")
    bad_input(cli(src, "--write-clean", tmp_path / "dir"), str(tmp_path / "dir"), "folder")
    assert (tmp_path / "dir" / "keep.txt").read_text() == "mine"
    out = tmp_path / "pairs.jsonl" / "sub" / "clean.jsonl"  # a file where a folder must be
    bad_input(cli(src, "--write-clean", out), str(out), "not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_write_clean_into_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        bad_input(cli(pairs(tmp_path), "--write-clean", ro / "new" / "c.jsonl"),
                  str(ro / "new" / "c.jsonl"), "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_full_disk_while_writing_is_bad_input_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = pairs(tmp_path)

    def full(self: Any, block: Any, keep: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(validation.CleanWriter, "_write", full)
    out = tmp_path / "made" / "here" / "clean.jsonl"
    bad_input(cli(src, "--write-clean", out), str(out), "no space left")
    assert not (tmp_path / "made").exists() and leftovers(tmp_path) == []


def test_fifo_input_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    exe = [sys.executable, "-c", "import sys; from realign.cli import main; sys.exit(main())"]
    # a reader of a FIFO with no writer blocks forever: the timeout is the test
    p = subprocess.run([*exe, "validate", str(fifo)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 2 and str(fifo) in p.stderr and "FIFO" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    ev = tmp_path / "eval.jsonl"
    os.mkfifo(ev)
    bad_input(cli(_fresh(tmp_path), "--eval", ev), str(ev), "FIFO")


def test_eval_set_that_is_a_folder(tmp_path: Path) -> None:
    src = pairs(tmp_path)
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "e.jsonl").write_text('{"question": "x y z"}\n')
    bad_input(cli(src, "--eval", tmp_path / "evals"), str(tmp_path / "evals"),
              "not a saved `datasets` dataset")


def test_deep_nesting_is_bad_input_with_its_line(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    lines = [json.dumps(r) for r in ROWS]
    lines[1] = '{"prompt": "p", "chosen": "c", "rejected": "r", "meta": %s}' % deep
    out = tmp_path / "o" / "c.jsonl"
    src = pairs(tmp_path, lines)
    bad_input(cli(src, "--write-clean", out), f"{src}:2:", "nested too deeply")
    assert not (tmp_path / "o").exists()
    arr = tmp_path / "deep.json"
    arr.write_text(deep)
    bad_input(cli(arr), str(arr), "nested too deeply")
    ev = tmp_path / "e.jsonl"
    ev.write_text('{"question": "fine item here"}\n{"question": %s}\n' % deep)
    bad_input(cli(_fresh(tmp_path), "--eval", ev), f"{ev}:2:", "nested too deeply")


def test_lone_surrogate_is_bad_input_with_line_and_field(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in ROWS]
    lines[4] = '{"prompt": "p", "chosen": "ok \\ud800 then", "rejected": "r"}'
    src = pairs(tmp_path, lines)
    bad_input(cli(src, "--write-clean", tmp_path / "c.jsonl"), f"{src}:5: field 'chosen'",
              "lone surrogate")
    assert not (tmp_path / "c.jsonl").exists()
    # skipped and listed with --skip-bad-rows; the clean copy is valid UTF-8
    r = cli(src, "--skip-bad-rows", "--json", "--threshold", "min_pairs=1",
            "--write-clean", tmp_path / "c.jsonl")
    assert r.exit_code in (0, 3), r.output
    assert [m["line"] for m in json.loads(r.stdout)["findings"]["malformed"]] == [5]
    (tmp_path / "c.jsonl").read_bytes().decode("utf-8")
    ev = tmp_path / "e.jsonl"
    ev.write_text('{"question": "bad \\udc00 item"}\n')
    bad_input(cli(_fresh(tmp_path), "--eval", ev), f"{ev}:1:", "lone surrogate")


def test_exit_1_only_for_a_failed_gate(tmp_path: Path) -> None:
    r = cli(pairs(tmp_path))  # 20 pairs < min_pairs: a failed gate
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "min_pairs" in r.stdout
