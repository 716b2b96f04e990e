"""Offline suites and evaluate_model (lm-eval in-process) on a tiny random model."""

from __future__ import annotations

import importlib.util
import json

import pytest

from realign.errors import InputError
from realign.evaluation import (DEFAULT_SUITES, SUITES_DIR, BenchmarkResults, evaluate_model,
                                list_suites, retention_by_suite)


def _load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_realign_test_{name}", SUITES_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(data_file: str) -> list[dict]:
    text = (SUITES_DIR / "data" / data_file).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_shipped_suites_listed_with_item_counts():
    suites = {s.name: s for s in list_suites()}
    assert set(suites) == set(DEFAULT_SUITES) == {"realign_knowledge", "realign_arith", "realign_format"}
    for s in suites.values():
        rows = _rows(s.data_file)
        assert s.n_items == len(rows) >= 100
        assert len({r["id"] for r in rows}) == len(rows)  # item ids are unique
        assert (SUITES_DIR / f"{s.name}.yaml").is_file()
    assert suites["realign_knowledge"].chance == 0.25


def test_data_files_are_reproduced_by_the_generator(tmp_path):
    gen = _load_module("generate")
    gen.main(tmp_path)
    for name in ("knowledge.jsonl", "arith.jsonl", "format.jsonl"):
        assert (tmp_path / name).read_bytes() == (SUITES_DIR / "data" / name).read_bytes()


def test_knowledge_items_are_well_formed():
    for r in _rows("knowledge.jsonl"):
        assert len(r["choices"]) == 4 == len(set(r["choices"]))
        assert 0 <= r["answer"] < 4


def test_arith_answers_are_correct():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "times": lambda a, b: a * b}
    for r in _rows("arith.jsonl"):
        _, _, a, op, b = r["question"].rstrip("?").split(" ")
        assert int(r["answer"]) == ops[op](int(a), int(b))


@pytest.mark.parametrize("check,arg,response,ok", [
    ("all_caps", "", "PARIS IS THE CAPITAL.", True),
    ("all_caps", "", "Paris", False),
    ("all_caps", "", "123", False),
    ("lowercase", "", "the sky is blue.", True),
    ("lowercase", "", "The sky", False),
    ("one_word", "", " Blue. ", True),
    ("one_word", "", "Light blue", False),
    ("json_key", "answer", '{"answer": "blue"}', True),
    ("json_key", "answer", '```json\n{"answer": 1}\n```', True),
    ("json_key", "answer", '{"result": "blue"}', False),
    ("json_key", "answer", "answer: blue", False),
    ("starts_with", "Sure", "Sure, the sky is blue.", True),
    ("starts_with", "Sure", "The sky is blue. Sure", False),
    ("yes_no", "", "Yes.", True),
    ("yes_no", "", "Yes, it is.", False),
    ("number_only", "", "7", True),
    ("number_only", "", "7 days", False),
    ("three_items", "", "- apple\n- pear\n- plum", True),
    ("three_items", "", "1. apple\n\n2. pear\n3. plum\n", True),
    ("three_items", "", "- apple\n- pear", False),
    ("three_items", "", "Fruits:\n- apple\n- pear\n- plum", False),
])
def test_format_checks(check, arg, response, ok):
    utils = _load_module("_suite_utils")
    assert utils.check_format(check, arg, response) is ok
    assert utils.process_format({"check": check, "arg": arg}, [response]) == {"follows": float(ok)}


@pytest.mark.needs("lm_eval")
def test_unknown_suite_is_input_error():
    with pytest.raises(InputError, match="unknown suite"):
        from realign.evaluation import _task_manager
        # search_lm_eval=False: skip indexing lm-eval's own ~200 task folders (slow)
        _task_manager(["realign_knowledge", "no_such_suite_xyz"], search_lm_eval=False)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.testing import tiny_model

    path = tiny_model()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), path


@pytest.mark.needs("torch", "transformers", "lm_eval")
@pytest.mark.integration
def test_evaluate_model_tiny_all_shipped_suites(tiny):
    model, tok, _ = tiny
    model.train()
    res = evaluate_model(model, tok, list(DEFAULT_SUITES), limit=5, batch_size=4)
    assert model.training  # mode restored
    assert isinstance(res, BenchmarkResults) and set(res.suites) == set(DEFAULT_SUITES)
    for name, r in res.suites.items():
        info = {s.name: s for s in list_suites()}[name]
        assert r.shipped and r.metric == info.metric
        assert r.n == 5 == len(r.items)
        # stable item order: the first five documents of the data file
        assert [i.id for i in r.items] == [row["id"] for row in _rows(info.data_file)[:5]]
        assert all(0.0 <= i.score <= 1.0 for i in r.items)
        assert r.score == pytest.approx(sum(r.scores()) / 5)
        assert r.apply_chat_template is info.chat_template  # tiny tokenizer has the template
        generated = [i.response for i in r.items]
        if name == "realign_knowledge":  # log-likelihood: nothing generated
            assert generated == [None] * 5
        else:
            assert all(isinstance(g, str) for g in generated)
    # same model twice → identical per-item results → retention exactly 1 (or unmeasured at 0)
    again = evaluate_model(model, tok, ["realign_knowledge"], limit=5, batch_size=4)
    assert again.suites["realign_knowledge"].items == res.suites["realign_knowledge"].items
    ret = retention_by_suite(res, again, n_boot=200)
    assert set(ret) == set(DEFAULT_SUITES)  # nothing dropped silently
    for name in set(DEFAULT_SUITES) - {"realign_knowledge"}:
        assert ret[name].retention is None
        assert "not in the evaluated model's results" in ret[name].unmeasured_reason
    k = ret["realign_knowledge"]
    # the tiny random model gets none of the first five right: retention is undefined (the
    # defined case, same items twice → exactly 1.0, is in test_retention.py)
    assert res.suites["realign_knowledge"].score == 0
    assert k.retention is None and "undefined" in k.unmeasured_reason


@pytest.mark.needs("torch", "transformers", "lm_eval")
@pytest.mark.integration
def test_cli_eval_json_and_list(tiny):
    from typer.testing import CliRunner

    from realign.cli import app

    _, _, path = tiny
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "--model", str(path), "--suite", "realign_knowledge",
                            "--limit", "3", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout.strip().splitlines()[-1])
    items = data["suites"]["realign_knowledge"]["items"]
    assert len(items) == 3 and all(0 <= i["score"] <= 1 for i in items)
    r = runner.invoke(app, ["eval", "--model", str(path), "--suite", "realign_knowledge",
                            "--limit", "0", "--device", "cpu"])
    assert r.exit_code == 2 and "--limit" in r.output
    r = runner.invoke(app, ["eval", "--list", "--json"])
    assert r.exit_code == 0
    assert {s["name"]: s["n_items"] for s in json.loads(r.stdout)} == {
        s.name: s.n_items for s in list_suites()}


@pytest.mark.needs("torch", "transformers", "lm_eval")
@pytest.mark.e2e
def test_hub_task_fails_offline_with_clear_error(tiny, monkeypatch):
    # Indexes lm-eval's whole task tree (tens of seconds on a busy CPU): e2e only.
    from realign.evaluation import EvaluationError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok, _ = tiny
    with pytest.raises(EvaluationError, match="arc_easy.*Hugging Face hub"):
        evaluate_model(model, tok, ["arc_easy"], limit=2)
    with pytest.raises(InputError, match="unknown suite"):
        evaluate_model(model, tok, ["no_such_task_xyz"], limit=2)


@pytest.mark.needs("torch", "transformers", "lm_eval")
@pytest.mark.integration
def test_user_task_folder_via_include_path(tiny, tmp_path):
    # The documented way to add your own offline lm-eval task (docs/capability-assessment.md).
    data = tmp_path / "colors.jsonl"
    rows = [{"id": f"c{i}", "question": f"Is color {i} a color?", "choices": ["yes", "no"],
             "answer": 0} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "my_colors.yaml").write_text(
        "task: my_colors\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    model, tok, _ = tiny
    res = evaluate_model(model, tok, ["my_colors"], include_path=[tmp_path], batch_size=4)
    r = res.suites["my_colors"]
    assert not r.shipped and r.metric == "acc,none" and r.chance is None
    assert [i.id for i in r.items] == [f"c{i}" for i in range(6)]
    assert r.score == pytest.approx(sum(r.scores()) / 6)
    assert not r.apply_chat_template
    with pytest.raises(InputError, match="does not exist"):
        evaluate_model(model, tok, ["my_colors"], include_path=[tmp_path / "nope"])
