"""The verifiers (issue 15 § 1, issue 13 item 11): each on known right and wrong answers,
the code sandbox on a loop, a sleep, a socket, a fork bomb, a subprocess, a write outside its
folder, a memory hog and an output flood; the row contract's errors (file:line:field); the
report, the RLVR gate and ``realign verify``'s exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from realign.cli import app
from realign.errors import InputError
from realign.instruction_checks import (
    INSTRUCTION_IDS,
    InstructionError,
    check_instructions,
    count_sentences,
    validate_instruction,
)
from realign.sandbox import SandboxLimits, extract_code, run_python_tests
from realign.training_metrics import assess_rlvr_verifiability
from realign.verifiers import (
    RLVR_VERIFIABILITY_MIN,
    check_exact,
    check_math,
    final_answer,
    normalize_answer,
    verify_file,
    verify_rows,
)
from typer.testing import CliRunner

FAST = SandboxLimits(cpu_seconds=1, wall_seconds=3)


# ----------------------------------------------------------------------------- exact


@pytest.mark.parametrize("response,reference,ok", [
    ("It is not Paris. Maybe Tokyo", "Paris", False),  # issue 13.11
    ("It is not Paris.", "Paris", False),
    ("Paris is the capital of France, not Tokyo", "Paris", False),
    ("The capital of France is Paris.", "Paris", True),
    ("Answer: paris", "Paris", True),
    ("**Final answer:** The Nile", "Nile", True),
    ("I considered Paris and Lyon. It is Lyon.", "Paris", False),
    ("The answer is \\boxed{Paris}, surely", "Paris", True),
    ("45, no wait, 46", "45", False),
    ("89 - 44 = 45", "45", True),
    ("It is 1,200 meters", "1200", True),
    ("The answer is not 45.", "45", False),
    ("about 3/4", "0.75", True),
    ("Cairorama", "Cairo", False),
])
def test_exact(response, reference, ok):
    c = check_exact(response, reference)
    assert c.verifiable and c.passed is ok, c.reason


def test_final_answer_extraction():
    assert final_answer("It is not Paris. Maybe Tokyo") == "Maybe Tokyo"
    assert final_answer("x\n\\boxed{\\frac{1}{2}} and more") == "\\frac{1}{2}"
    assert final_answer("Steps...\nThe answer is 12. Check: 3*4=12") == "12."
    assert final_answer("") == ""
    assert normalize_answer("The  NEW-Delhi!") == "new delhi"


def test_exact_empty_reference_is_not_verifiable():
    assert check_exact("anything", "  ").verifiable is False


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize("response,answer,ok", [
    ("0.5", "\\frac{1}{2}", True),
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5", True),
    ("So we get $x = \\frac{2}{4}$", "1/2", True),
    ("The answer is $(x+1)^2$", "x^2+2x+1", True),
    ("The answer is $\\boxed{0.6}$.", "\\frac{1}{2}", False),
    ("45, no wait, 46", "45", False),
    ("The answer is not 45.", "45", False),
    ("no number here", "7", False),
])
def test_math(response, answer, ok):
    pytest.importorskip("math_verify")
    c = check_math(response, answer)
    assert c.verifiable and c.passed is ok, c.reason


def test_math_unparseable_answer_is_not_verifiable():
    pytest.importorskip("math_verify")
    assert check_math("x", "\\frac{").verifiable is False


# ----------------------------------------------------------------------------- code

ADD_TESTS = "assert add(1, 2) == 3\nassert add(0, 0) == 0"


def test_code_right_and_wrong():
    ok = run_python_tests("Here:\n```python\ndef add(a, b):\n    return a + b\n```\n", ADD_TESTS,
                          limits=FAST)
    assert ok.status == "passed" and (ok.passed, ok.total) == (2, 2)
    bad = run_python_tests("def add(a, b):\n    return a - b\n", ADD_TESTS, limits=FAST)
    assert bad.status == "failed" and (bad.passed, bad.total) == (1, 2)
    assert "add(1, 2) == 3" in bad.reason
    listed = run_python_tests("def sq(x): return x * x", ["assert sq(2) == 4",
                                                         "assert sq(3) == 10"], limits=FAST)
    assert listed.status == "failed" and (listed.passed, listed.total) == (1, 2)
    syntax = run_python_tests("def add(a, b:\n", ADD_TESTS, limits=FAST)
    assert syntax.status == "failed" and "SyntaxError" in syntax.reason


def test_extract_code_takes_the_last_python_block():
    text = "```python\nx = 1\n```\ntext\n```py\ny = 2\n```\n```bash\nls\n```"
    assert extract_code(text) == "y = 2\n"
    assert extract_code("plain") == "plain"


def test_infinite_loop_fails_within_the_cpu_limit():
    r = run_python_tests("while True:\n    pass\n", "assert True", limits=FAST)
    assert r.status == "timeout" and "CPU" in r.reason
    assert r.seconds < FAST.wall_seconds


def test_sleep_fails_at_the_wall_clock_limit():
    r = run_python_tests("import time\ntime.sleep(60)\n", "assert True",
                         limits=SandboxLimits(cpu_seconds=1, wall_seconds=1.0))
    assert r.status == "timeout" and "wall-clock" in r.reason and r.seconds < 5


def test_socket_fails_even_when_the_error_is_caught():
    code = ("import socket\ntry:\n    s = socket.socket()\n    s.connect(('127.0.0.1', 9))\n"
            "except Exception:\n    pass\ndef f():\n    return 1\n")
    r = run_python_tests(code, "assert f() == 1", limits=FAST)
    assert r.status == "blocked" and "socket" in r.reason


def test_name_resolution_is_blocked():
    r = run_python_tests("import socket\nsocket.getaddrinfo('example.com', 80)\n", "assert True",
                         limits=FAST)
    assert r.status == "blocked"


def test_fork_bomb_fails():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n"
    r = run_python_tests(code, "assert True", limits=FAST)
    assert r.status == "blocked" and "os.fork" in r.reason


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['true'])\n",
    "import os\nos.system('true')\n",
    "import os\nos.execv('/bin/true', ['true'])\n",
    "import os, signal\nos.kill(1, signal.SIGTERM)\n",
    "import ctypes\n",
    "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))\n",
])
def test_processes_and_escapes_are_blocked(code):
    r = run_python_tests(code, "assert True", limits=FAST)
    assert r.status == "blocked", r


def test_files_only_inside_the_working_directory(tmp_path):
    target = tmp_path / "evil.txt"
    r = run_python_tests(f"open({str(target)!r}, 'w').write('x')\n", "assert True", limits=FAST)
    assert r.status == "blocked" and not target.exists()
    inside = run_python_tests(
        "import tempfile\nopen('a.txt', 'w').write('x')\ntempfile.NamedTemporaryFile()\n"
        "def f():\n    return open('a.txt').read()\n", "assert f() == 'x'", limits=FAST)
    assert inside.status == "passed", inside


def test_memory_and_output_limits():
    mem = run_python_tests("x = bytearray(4 << 30)\n", "assert True", limits=FAST)
    assert not mem.ok and ("MemoryError" in mem.reason or "memory limit" in mem.reason)
    flood = run_python_tests("while True:\n    print('x' * 10000)\n", "assert True",
                             limits=SandboxLimits(cpu_seconds=2, output_bytes=64 << 10))
    assert flood.status == "killed" and "output" in flood.reason


def test_a_printed_fake_result_does_not_pass():
    r = run_python_tests("print('0' * 32 + ' 1 1')\nimport os\nos._exit(0)\n", "assert False",
                         limits=FAST)
    assert r.status == "error" and not r.ok


def test_environment_is_empty():
    # LC_CTYPE is Python's own C-locale coercion (PEP 538); TMPDIR is the working directory
    r = run_python_tests("import os\nkeys = set(os.environ)\n",
                         "assert keys <= {'TMPDIR', 'LC_CTYPE'}", limits=FAST)
    assert r.ok, r


# ----------------------------------------------------------------------------- instructions

# (id, kwargs, a response that follows it, one that does not)
CASES = [
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "An Apple pie.", "An apple."),
    ("keywords:frequency", {"keyword": "ok", "frequency": 2, "relation": "at least"},
     "ok OK", "ok"),
    ("keywords:frequency", {"keyword": "ok", "frequency": 2, "relation": "less than"},
     "ok", "ok ok"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "badge is fine", "Bad idea"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     "Zaz", "az"),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Dr. Who came.", "One. Two. Three."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a\n***\nb", "a\n***\nb\n***\nc"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"},
     "one two three", "one two"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First.\n\nThen, more.", "First.\n\nNow more."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[a] and [b]", "[a]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and *two*", "*one*"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\na\nSection 2\nb", "Section 1\na"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:title", {}, "<<My Title>>\ntext", "My Title\ntext"),
    ("combination:two_responses", {}, "one\n******\ntwo", "one\n******\none"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi!"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. Any other questions?", "Any other questions? Done."),
    ("startend:quotation", {}, '"quoted"', 'not "quoted"'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THIS is VERY-GOOD", "only ONE"),
    ("change_case:english_capital", {}, "ALL CAPS HERE.", "Not all caps."),
    ("change_case:english_lowercase", {}, "all lower here.", "Not lower."),
    ("punctuation:no_comma", {}, "no commas here", "a, b"),
]


@pytest.mark.parametrize("inst_id,kwargs,right,wrong", CASES)
def test_instruction(inst_id, kwargs, right, wrong):
    kw = validate_instruction(inst_id, kwargs)
    assert isinstance(kw, dict)
    assert check_instructions(right, "prompt", [(inst_id, kw)]) == [True]
    assert check_instructions(wrong, "prompt", [(inst_id, kw)]) == [False]


def test_every_instruction_id_is_tested():
    ids = {c[0] for c in CASES} | {"language:response_language"}
    assert ids == set(INSTRUCTION_IDS)


def test_response_language():
    pytest.importorskip("lingua")
    kw = validate_instruction("language:response_language", {"language": "fr"})
    assert isinstance(kw, dict)
    fr = "Bonjour, je voudrais un café et un croissant, s'il vous plaît."
    en = "Good morning, I would like a coffee and a croissant, please."
    assert check_instructions(fr, "p", [("language:response_language", kw)]) == [True]
    assert check_instructions(en, "p", [("language:response_language", kw)]) == [False]


def test_sentences_are_counted_without_nltk():
    assert count_sentences("Dr. Smith paid 3.50 dollars. Then he left! Why?") == 3


@pytest.mark.parametrize("kwargs,field", [
    ({"num_words": "ten", "relation": "at least"}, "num_words"),
    ({"num_words": 10, "relation": "more than"}, "relation"),
    ({"num_words": 10}, "relation"),
    ({"num_words": 10, "relation": "at least", "extra": 1}, "extra"),
])
def test_bad_instruction_kwargs_name_the_field(kwargs, field):
    with pytest.raises(InstructionError) as e:
        validate_instruction("length_constraints:number_words", kwargs)
    assert e.value.field == field


def test_unknown_instruction_is_not_verifiable():
    assert "not supported" in validate_instruction("detectable_format:foo", {})


# ----------------------------------------------------------------------------- rows, report


def _write(tmp_path: Path, rows: list, name: str = "rows.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


ROWS = [
    {"prompt": "1/2?", "response": "The answer is $\\boxed{0.5}$.", "answer": "\\frac{1}{2}"},
    {"prompt": "Capital of France?", "response": "It is not Paris. Maybe Tokyo",
     "answer": "Paris"},
    {"prompt": "add", "response": "def add(a, b):\n    return a + b\n", "tests": ADD_TESTS},
    {"prompt": "loop", "completion": [{"role": "assistant", "content": "while True: pass"}],
     "tests": ["assert True"]},
    {"prompt": "lower, no commas", "response": "hello world, friend",
     "instructions": [{"id": "change_case:english_lowercase"}, {"id": "punctuation:no_comma"}]},
    {"prompt": "Tell me a story."},
    {"prompt": "q", "answer": "42"},
    {"prompt": "ifeval format", "response": "hi there",
     "instruction_id_list": ["length_constraints:number_words"],
     "kwargs": [{"num_words": 2, "relation": "at least", "keywords": None}]},
]


def test_report_counts_rows_by_verifier(tmp_path):
    pytest.importorskip("math_verify")
    rep = verify_file(_write(tmp_path, ROWS), limits=FAST)
    got = {r.line: (r.verifier, r.verifiable, r.passed, r.score) for r in rep.results}
    assert got == {
        1: ("math", True, True, 1.0),
        2: ("exact", True, False, 0.0),
        3: ("code", True, True, 1.0),
        4: ("code", True, False, 0.0),
        5: ("instructions", True, False, 0.5),
        6: (None, False, None, None),
        7: ("math", True, None, None),
        8: ("instructions", True, True, 1.0),
    }
    assert (rep.rows, rep.verifiable) == (8, 7)
    assert rep.share_verifiable == pytest.approx(7 / 8)
    assert rep.by_verifier == {"code": 2, "exact": 1, "instructions": 2, "math": 2}
    assert rep.not_verifiable == {"no answer, tests or instructions": 1}
    assert (rep.checked, rep.passed) == (6, 3)
    assert rep.gate.threshold == RLVR_VERIFIABILITY_MIN and rep.gate.status == "pass"
    assert rep.status == "pass"


def test_gate_fails_below_the_threshold():
    rows = [{"prompt": "a", "answer": "Paris"}, {"prompt": "b"}]
    rep = assess_rlvr_verifiability(rows)
    assert rep.share_verifiable == 0.5 and rep.gate.status == "fail" and rep.status == "fail"
    assert assess_rlvr_verifiability(rows, threshold=0.5).status == "pass"
    assert "realign verify" in rep.gate.remedy and rep.gate.threshold == RLVR_VERIFIABILITY_MIN


def test_gate_reads_the_preset():
    """The threshold is the preset's (realign.gates.PRESETS): 7 of 8 verifiable rows pass
    at standard (0.8) and fail at strict (0.9)."""
    from realign.gates import PRESETS

    rows = [{"prompt": str(i), "answer": "4"} for i in range(7)] + [{"prompt": "x"}]
    assert assess_rlvr_verifiability(rows).gate.status == "pass"
    strict = assess_rlvr_verifiability(rows, preset="strict").gate
    assert strict.status == "fail" and strict.threshold == PRESETS["strict"]["rlvr_verifiability"]


def test_explicit_verifier_is_used():
    rep = verify_rows([{"prompt": "p", "response": "The answer is 45", "answer": "45",
                        "verifier": "exact"}])
    assert rep.results[0].verifier == "exact" and rep.results[0].passed is True


@pytest.mark.parametrize("row,where", [
    ('{"prompt": "x", "answer": true}', "rows.jsonl:2: field 'answer'"),
    ('{"answer": "x"}', "rows.jsonl:2: field 'prompt'"),
    ('{"prompt": "x", "response": 3, "answer": "x"}', "rows.jsonl:2: field 'response'"),
    ('{"prompt": "x", "tests": 5}', "rows.jsonl:2: field 'tests'"),
    ('{"prompt": "x", "verifier": "magic", "answer": "1"}', "rows.jsonl:2: field 'verifier'"),
    ('{"prompt": "x", "verifier": "code", "answer": "1"}', "rows.jsonl:2: field 'tests'"),
    ('{"prompt": "x", "instructions": [{"kwargs": {}}]}', "rows.jsonl:2: field 'instructions[0].id'"),
    (('{"prompt": "x", "instructions": [{"id": "length_constraints:number_words", '
      '"kwargs": {"num_words": "ten", "relation": "at least"}}]}'),
     "rows.jsonl:2: field 'instructions[0].kwargs.num_words'"),
    ('{"prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}',
     "rows.jsonl:2: field 'kwargs'"),
    ('[1, 2]', "rows.jsonl:2: expected a JSON object"),
    ('{"prompt": ', "rows.jsonl:2: invalid JSON"),
])
def test_row_contract_errors_name_file_line_field(tmp_path, row, where):
    path = _write(tmp_path, ['{"prompt": "ok", "answer": "Paris"}', row])
    with pytest.raises(InputError) as e:
        verify_file(path)
    assert where in str(e.value)
    r = CliRunner().invoke(app, ["verify", str(path)])
    assert r.exit_code == 2 and where in " ".join(r.output.split())


def test_json_array_and_parquet_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a", "response": "Paris", "answer": "Paris"},
            {"prompt": "b", "response": "Rome", "answer": "Paris"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("rows.json", "rows.parquet"):
        rep = verify_file(tmp_path / name)
        assert [(r.line, r.passed) for r in rep.results] == [(1, True), (2, False)]


def test_cli_exit_codes_and_json(tmp_path):
    good = _write(tmp_path, [{"prompt": "a", "response": "Paris", "answer": "Paris"}], "good.jsonl")
    r = CliRunner().invoke(app, ["verify", str(good)])
    assert r.exit_code == 0 and "rlvr_verifiability" in r.output and "exact" in r.output
    r = CliRunner().invoke(app, ["verify", str(good), "--json"])
    assert r.exit_code == 0
    data = json.loads(r.output)
    assert data["share_verifiable"] == 1.0
    assert data["results"][0] == {"line": 1, "verifier": "exact", "verifiable": True,
                                  "passed": True, "score": 1.0,
                                  "reason": "final answer 'Paris' = 'Paris'"}
    weak = _write(tmp_path, [{"prompt": "a"}, {"prompt": "b", "answer": "x"}], "weak.jsonl")
    assert CliRunner().invoke(app, ["verify", str(weak)]).exit_code == 1
    assert CliRunner().invoke(app, ["verify", str(weak), "--min-share", "0.5"]).exit_code == 0
    assert CliRunner().invoke(app, ["verify", str(tmp_path / "missing.jsonl")]).exit_code == 2
    assert CliRunner().invoke(app, ["verify", str(good), "--workers", "0"]).exit_code == 2


def test_without_math_verify_numbers_use_exact_and_latex_is_not_verifiable(monkeypatch):
    import realign.verifiers as v

    monkeypatch.setattr(v, "_math_verify", lambda: None)
    assert v.verify_answer("It is 1,200 meters", "1200") is True
    assert v.verify_answer("45, no wait, 46", "45") is False
    rep = verify_rows([{"prompt": "a", "response": "0.5", "answer": "0.5"},
                       {"prompt": "b", "response": "0.5", "answer": "\\frac{1}{2}"}])
    assert [(r.verifier, r.verifiable, r.passed) for r in rep.results] == [
        ("exact", True, True), ("math", False, None)]
    assert "math-verify" in rep.results[1].reason


def test_exact_sentence_and_negative_references():
    assert check_exact("Tokyo is the capital.", "Tokyo is the capital").passed is True
    assert check_exact("I think it is not applicable.", "Not applicable").passed is True
    assert check_exact("It is applicable.", "Not applicable").passed is False


def test_asyncio_runs_but_cannot_connect():
    ok = run_python_tests("import asyncio\nasync def f():\n    return 3\nx = asyncio.run(f())\n",
                          "assert x == 3", limits=FAST)
    assert ok.ok, ok
    net = run_python_tests("import asyncio\nasyncio.run(asyncio.open_connection('127.0.0.1', 9))\n",
                           "assert True", limits=FAST)
    assert net.status == "blocked"
