"""Issue 13, stage 2: every gate number is measured on what it claims.

One test (or more) per item, each failing on the code before the fix:

1. decontamination covers the run's own benchmarks (sft.benchmarks), names the suite in
   each hit, and the shipped sample is clean of them;
2. no evaluation item checked is not a pass; short items are checked by exact match;
4. the gap needs a share of the usable pairs scored (``GAP_MIN_COVERAGE``);
5. no guessed scale: ``auto`` reads a scale only when the scores leave no doubt;
6. fields are learned from the whole file; NaN / Infinity scores are bad input;
7. identical / duplicate / empty compare texts as a reader sees them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import realign.validation as validation
from realign.cli import app
from realign.config import RunConfig
from realign.decontamination import EvalSet, load_benchmarks
from realign.errors import InputError
from realign.gates import GAP_MIN_COVERAGE, PRESETS, Thresholds
from realign.metrics import STANDARD_SCALES, infer_scale
from realign.validation import validate_file
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SUITES = ["realign_knowledge", "realign_arith", "realign_format"]
SUITE_DATA = ROOT / "lib" / "suites" / "data"
CORPUS = json.loads((Path(__file__).parent / "data" / "stdlib_paragraphs.json").read_text())[
    "paragraphs"]


def suite_items(name: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (SUITE_DATA / f"{name}.jsonl").read_text().splitlines() if x]


def clean_rows(n: int, **scores: Any) -> list[dict[str, Any]]:
    """n distinct pairs of real prose (no benchmark item in them)."""
    long_, short = "Answer {} in full, with the reason.", "No {}."
    return [{"prompt": CORPUS[i % len(CORPUS)] + f" (case {i})",
             "chosen": (long_ if i % 2 else short).format(i),
             "rejected": (short if i % 2 else long_).format(i), **scores} for i in range(n)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def relaxed(n: int = 1) -> Thresholds:
    return Thresholds(overrides={"min_pairs": n})


# ------------------------------------------------------------------ 1. own benchmarks
def test_shipped_sample_is_clean_of_its_own_benchmarks() -> None:
    """The sample examples/run.yaml trains on holds no item of the suites it evaluates
    (before the fix: decontamination 0.687, 353 pairs held a knowledge item)."""
    ev = ROOT / "examples" / "eval.jsonl"
    v = validate_file(ROOT / "examples" / "pairs.jsonl", eval_sets=[ev], benchmarks=SUITES)
    assert v.findings["contamination"]["by_eval_set"] == {str(ev): 2, **{s: 0 for s in SUITES}}
    assert v.findings["contaminated"] == [71, 81]  # the two planted copies of eval.jsonl
    assert v.findings["identical"] == [41, 51] and v.findings["empty"] == [61]
    assert v.findings["duplicates"][:3] == [11, 21, 31]
    assert v.gate("min_pairs").value >= PRESETS["standard"]["min_pairs"]
    assert v.status == "pass"
    assert v.findings["contamination"]["items_checked"]["ngram"] == 5 + sum(
        len(suite_items(s.split("_")[1])) for s in SUITES)


def test_run_checks_the_benchmarks_it_evaluates_without_being_told(tmp_path: Path) -> None:
    from realign.pipeline import create_run, run_stages

    fact = next(r for r in suite_items("knowledge") if r["category"] == "fact")
    arith = suite_items("arith")[60]
    knowledge_q = {r["question"] for r in suite_items("knowledge")}
    fmt = next(r for r in suite_items("format") if r["question"] not in knowledge_q
               and sum(x["question"] == r["question"] for x in suite_items("format")) == 1)
    rows = clean_rows(40, score_chosen=9, score_rejected=1)
    rows[5]["prompt"] = f"Quiz night. {fact['question']} Think first."
    rows[6]["chosen"] = f"Here is one: {arith['question']} It is easy."
    rows[7]["prompt"] = fmt["prompt"]  # the whole format prompt, instruction and all
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = RunConfig(data=str(data), output_dir=str(tmp_path / "runs"), run_id="s2",
                    stages=["preference_data"], thresholds={"min_pairs": 10},
                    sft={"benchmarks": SUITES})
    (stage,) = run_stages(create_run(cfg)).stages
    v = stage.verdict
    hits = {h["line"]: (h["eval_set"], h["eval_id"]) for h in v.findings["contamination"]["hits"]}
    assert hits == {6: ("realign_knowledge", fact["id"]), 7: ("realign_arith", arith["id"]),
                    8: ("realign_format", fmt["id"])}
    g = v.gate("decontamination")
    assert g.status == "pass" and g.value == pytest.approx(1 - 3 / 40)
    for s in SUITES:
        assert f"{s}: 1" in g.detail
    kinds = {s["name"]: s["kind"] for s in v.findings["contamination"]["sets"]}
    assert kinds == {s: "benchmark" for s in SUITES}


def test_lm_eval_task_items_loaded_offline_or_named_unchecked(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    items = tmp_path / "items.jsonl"
    write_jsonl(items, [{"question": "Which composer wrote the four seasons violin concertos "
                                     "in Venice?", "answer": "Vivaldi"},
                        {"question": "How many strings does a standard cello have?",
                         "answer": "4"}])
    common = ("output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
              "doc_to_target: \"{{answer}}\"\ntest_split: test\n"
              "metric_list:\n  - metric: exact_match\n")
    (tmp_path / "local.yaml").write_text(
        f"task: zz_local_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {items}\n" + common)
    (tmp_path / "hub.yaml").write_text(
        "task: zz_hub_task\ndataset_path: zz-no-such-org/zz-no-such-dataset\n" + common)
    sets, unchecked = load_benchmarks(["zz_local_task", "zz_hub_task"], include_path=[tmp_path])
    assert [s.name for s in sets] == ["zz_local_task"]
    assert sets[0].texts[0] == ("Q: Which composer wrote the four seasons violin concertos in "
                                "Venice?\nA:")
    assert list(unchecked) == ["zz_hub_task"] and "could not load" in unchecked["zz_hub_task"]
    with pytest.raises(InputError):
        load_benchmarks(["zz_not_a_task_anywhere"], include_path=[tmp_path])


def test_unchecked_benchmark_is_named_and_nothing_covered_is_unmeasured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = clean_rows(20)
    rows[3]["prompt"] = "Which composer wrote the four seasons violin concertos in Venice?"
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    covered = EvalSet("zz_local_task", [rows[3]["prompt"]], [1])
    monkeypatch.setattr(validation, "load_benchmarks", lambda names: (
        [covered] if "zz_local_task" in names else [],
        {"zz_hub_task": "lm-eval could not load its items: offline"}))
    v = validate_file(data, benchmarks=["zz_local_task", "zz_hub_task"], thresholds=relaxed())
    g = v.gate("decontamination")
    assert g.status == "pass" and g.value == pytest.approx(1 - 1 / 20)
    assert "not checked: zz_hub_task (lm-eval could not load its items: offline)" in g.detail
    assert any("zz_hub_task" in w for w in v.warnings)
    assert v.findings["contamination"]["unchecked_benchmarks"] == [
        {"name": "zz_hub_task", "reason": "lm-eval could not load its items: offline"}]
    v = validate_file(data, benchmarks=["zz_hub_task"], thresholds=relaxed())
    g = v.gate("decontamination")
    assert g.status == "unmeasured" and "no evaluation item could be checked" in g.detail
    assert "zz_hub_task" in g.detail


def test_cli_benchmark_option(tmp_path: Path) -> None:
    rows = clean_rows(12)
    rows[2]["prompt"] = suite_items("arith")[70]["question"]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    r = CliRunner().invoke(app, ["validate", str(data), "--benchmark", "realign_arith", "--json",
                                 "--threshold", "min_pairs=1"])
    v = json.loads(r.stdout)
    assert v["findings"]["contamination"]["hits"][0]["eval_set"] == "realign_arith"
    assert v["findings"]["contaminated"] == [3]


# ------------------------------------------------------------------ 2. nothing checked
def test_no_item_checked_is_unmeasured_not_a_pass(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", clean_rows(10))
    ev = write_jsonl(tmp_path / "e.jsonl", [{"question": "???"}, {"question": "— …"}])
    v = validate_file(data, eval_sets=[ev], thresholds=relaxed())
    g = v.gate("decontamination")
    assert g.status == "unmeasured" and g.value is None  # was 1.0, pass
    assert "no evaluation item could be checked" in g.detail and "2 items" in g.detail
    assert v.status == "incomplete"


def test_short_items_are_checked_by_exact_match(tmp_path: Path) -> None:
    rows = clean_rows(10)
    rows[1]["prompt"] = "Translate into English, please. Bonjour!"  # a whole sentence
    rows[2]["chosen"] = "thank   YOU."  # a whole text, case and spacing aside
    rows[3]["prompt"] = "Bonjour tout le monde, thank you for coming."  # not a whole sentence
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    ev = write_jsonl(tmp_path / "e.jsonl", [{"question": "Bonjour!"}, {"question": "Thank you."}])
    v = validate_file(data, eval_sets=[ev], thresholds=relaxed())
    g = v.gate("decontamination")
    assert v.findings["contaminated"] == [2, 3]  # before: 0 items checked, rate 1.0
    assert g.value == pytest.approx(0.8)
    assert "2 items checked: 0 by n-gram coverage, 2 by exact match" in g.detail
    assert {h["method"] for h in v.findings["contamination"]["hits"]} == {"exact"}
    assert v.findings["contamination"]["items_checked"] == {
        "ngram": 0, "whole": 0, "exact": 2, "not_checkable": 0}


# ------------------------------------------------------------------ 4. coverage
def test_gap_needs_the_configured_share_of_usable_pairs_scored(tmp_path: Path) -> None:
    assert GAP_MIN_COVERAGE == 0.8 and RunConfig(data="x").gap_min_coverage == GAP_MIN_COVERAGE
    rows = clean_rows(1200)
    rows[0].update(score_chosen=10, score_rejected=1)
    rows[1].update(score_chosen=9, score_rejected=1)
    v = validate_file(write_jsonl(tmp_path / "two.jsonl", rows), thresholds=relaxed())
    g = v.gate("preference_gap")
    assert g.status == "unmeasured" and g.value is None  # was 0.94, pass, on 2 pairs
    assert "only 2 of 1200 usable pairs (0.2%) have both scores" in g.detail
    assert "gap_min_coverage" in g.detail
    # exactly the share: measured; one pair fewer: not
    for i in range(2, 960):
        rows[i].update(score_chosen=8, score_rejected=2)
    v = validate_file(write_jsonl(tmp_path / "at.jsonl", rows), thresholds=relaxed())
    assert v.findings["preference_gap"]["coverage"] == pytest.approx(0.8)
    assert v.gate("preference_gap").status == "pass"
    del rows[959]["score_chosen"]
    v = validate_file(write_jsonl(tmp_path / "under.jsonl", rows), thresholds=relaxed())
    assert v.gate("preference_gap").status == "unmeasured"
    v = validate_file(tmp_path / "under.jsonl", thresholds=relaxed(), gap_min_coverage=0.5)
    assert v.gate("preference_gap").status == "pass"
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "under.jsonl"), "--json",
                                 "--gap-min-coverage", "0.5", "--threshold", "min_pairs=1"])
    assert json.loads(r.stdout)["gates"][1]["status"] == "pass"
    for bad in ("0", "1.5", "nan"):
        r = CliRunner().invoke(app, ["validate", str(tmp_path / "under.jsonl"),
                                     "--gap-min-coverage", bad])
        assert r.exit_code == 2 and "--gap-min-coverage" in r.stderr
    with pytest.raises(ValueError):
        RunConfig(data="x", gap_min_coverage=0)


# ------------------------------------------------------------------ 5. no guessed scale
def test_infer_scale_only_beyond_doubt() -> None:
    for lo, hi in STANDARD_SCALES:
        assert infer_scale(lo, hi) == (lo, hi)
    for seen in [(2, 5), (1, 4), (0.8, 1.0), (1, 9), (0, 0.5), (3, 3), (1, 100)]:
        assert infer_scale(*seen) is None, seen


@pytest.mark.parametrize(("chosen", "rejected"), [(5, [2, 4]), (1.0, [0.8])])
def test_a_guessed_scale_leaves_the_gap_unmeasured(tmp_path: Path, chosen: float,
                                                   rejected: list[float]) -> None:
    rows = clean_rows(20)
    for i, r in enumerate(rows):
        r.update(score_chosen=chosen, score_rejected=rejected[i % len(rejected)])
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    v = validate_file(path, thresholds=relaxed())
    g = v.gate("preference_gap")
    assert g.status == "unmeasured"  # was measured on the guessed 1-5 / 0-1
    assert "--score-scale" in g.detail and "score_scale" in g.detail
    f = v.findings["preference_gap"]
    assert f["scale"] is None and f["scale_source"] is None
    # declared: measured, and the verdict says where the scale came from
    v = validate_file(path, thresholds=relaxed(), score_scale="1-10" if chosen == 5 else "0-1")
    assert v.gate("preference_gap").status == "pass"
    assert v.findings["preference_gap"]["scale_source"] == "declared"
    assert "declared" in v.gate("preference_gap").detail


def test_scale_recorded_inferred_and_declared(tmp_path: Path) -> None:
    rows = clean_rows(10)
    for i, r in enumerate(rows):
        r.update(score_chosen=10 - i % 2, score_rejected=1 + i % 2)
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    v = validate_file(path, thresholds=relaxed())
    f = v.findings["preference_gap"]
    assert (f["scale"], f["scale_source"], f["observed_range"]) == ([1, 10], "inferred", [1, 10])
    assert "inferred: the scores reach both ends, 1 and 10" in v.gate("preference_gap").detail
    r = CliRunner().invoke(app, ["validate", str(path), "--json", "--score-scale", "0-10",
                                 "--threshold", "min_pairs=1"])
    f = json.loads(r.stdout)["findings"]["preference_gap"]
    assert (f["scale"], f["scale_source"], f["scale_declared_by"]) == (
        [0, 10], "declared", "--score-scale")


# ------------------------------------------------------------------ 6. the whole file
def test_scores_first_seen_after_row_1000_count(tmp_path: Path) -> None:
    """1,100 unscored rows, then 9,000 with inverted scores: a failed gap (it was
    "no score_chosen/score_rejected fields")."""
    rows = clean_rows(10_100)
    for r in rows[1100:]:
        r.update(score_chosen=1, score_rejected=10)
    v = validate_file(write_jsonl(tmp_path / "late.jsonl", rows), thresholds=relaxed())
    g = v.gate("preference_gap")
    assert g.status == "fail" and g.value == pytest.approx(-1.0)
    assert v.findings["preference_gap"]["scored_pairs"] == 9000


def test_prompt_field_first_seen_after_row_1000(tmp_path: Path) -> None:
    rows = [{"chosen": f"c {i}", "rejected": f"r {i}"} for i in range(1100)]
    rows.append({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(InputError) as ei:  # the file has prompts: row 1 lacks its prompt
        validate_file(path)
    assert (ei.value.line, ei.value.field) == (1, "prompt")
    v = validate_file(path, skip_bad_rows=True, thresholds=relaxed())
    assert v.findings["counts"]["malformed"] == 1100 and v.findings["counts"]["parsed"] == 1


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_scores_are_bad_input(tmp_path: Path, token: str) -> None:
    good = [json.dumps(r) for r in clean_rows(3000, score_chosen=9, score_rejected=2)]
    bad = ('{"prompt": "x", "chosen": "c", "rejected": "r", "score_chosen": %s, '
           '"score_rejected": 1}' % token)
    for where in (1, 2500):  # in the sniffed head, and deep in a fast-path block
        lines = good.copy()
        lines[where - 1] = bad
        path = tmp_path / f"nan{where}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(InputError) as ei:
            validate_file(path)
        assert (ei.value.line, ei.value.field) == (where, "score_chosen"), ei.value
        assert "finite" in ei.value.message
        v = validate_file(path, skip_bad_rows=True, thresholds=relaxed())
        assert [m["line"] for m in v.findings["malformed"]] == [where]
    arr = tmp_path / "nan.json"
    arr.write_text("[" + ",".join(good[:5] + [bad]) + "]")
    with pytest.raises(InputError) as ei:
        validate_file(arr)
    assert (ei.value.line, ei.value.field) == (6, "score_chosen")


def test_non_finite_scores_in_parquet(tmp_path: Path) -> None:
    rows = clean_rows(6, score_chosen=9.0, score_rejected=2.0)
    rows[4]["score_rejected"] = float("inf")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    with pytest.raises(InputError) as ei:
        validate_file(tmp_path / "p.parquet")
    assert (ei.value.line, ei.value.field) == (5, "score_rejected")


# ------------------------------------------------------------------ 7. a reader's eyes
def test_identical_duplicate_and_empty_as_a_reader_sees_them(tmp_path: Path) -> None:
    rows = clean_rows(8)
    rows[1].update(chosen="The answer is 42.", rejected="The\u00a0answer is\u2009 42.\u200b")
    rows[2].update(chosen="Yes", rejected="yes")  # case still counts
    rows[3].update(chosen="ＡＢＣ", rejected="ABC")  # NFKC
    rows[4] = dict(rows[0], prompt=rows[0]["prompt"].replace(" ", "\u3000", 3) + "\u200d",
                   chosen="\u00a0" + rows[0]["chosen"])
    rows[5].update(rejected="\u200b\u00a0\u2028")
    rows[6].update(chosen="line one\u2028line two", rejected="line one line two")
    v = validate_file(write_jsonl(tmp_path / "u.jsonl", rows), thresholds=relaxed())
    assert v.findings["identical"] == [2, 4, 7]  # before: none
    assert v.findings["duplicates"] == [5]
    assert v.findings["empty"] == [6]
