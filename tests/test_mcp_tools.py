"""The measurement, benchmark, hardware, rollback and report tools over MCP (in process):
each on real files with the tiny model, its structured result checked against the
library's own result, and the error paths (a missing file is a tool error naming it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="needs the mcp extra (pip install -e '.[mcp]')")
from mcp import Client  # noqa: E402

from realign.gates import Thresholds, make_verdict  # noqa: E402
from realign_mcp.server import build_server  # noqa: E402
from mcp_helpers import call, call_error  # noqa: E402

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs.jsonl"

IFD_ROWS = [
    {"instruction": "What is the capital of France?", "response": "Paris is the capital."},
    {"messages": [{"role": "user", "content": "Add 2 and 3."},
                  {"role": "assistant", "content": "5"}]},
    {"prompt": "Name a colour.", "completion": "Blue."},
    {"prompt": "Write a line about the sea.", "chosen": "The sea rolls grey under a low sky.",
     "rejected": "No."},
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on the shared CPU spinning OpenMP threads slow tiny models down."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recorder() -> tuple[list[tuple[float, float | None, str | None]], Any]:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(p: float, total: float | None, msg: str | None) -> None:
        seen.append((p, total, msg))

    return seen, on_progress


# --------------------------------------------------------------------------- listing
async def test_new_tools_listed_with_hints_and_schemas(monkeypatch: pytest.MonkeyPatch) -> None:
    from realign import config

    monkeypatch.setitem(config.STAGES, "future_stage", 6)  # a stage the library may add later
    async with Client(build_server()) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
    for name in ("calculate_ifd_score", "score_preference_gap", "list_suites",
                 "evaluate_benchmarks", "compute_kl"):
        assert tools[name].annotations.read_only_hint is True, name
    for name in ("calibrate_hardware", "rollback", "generate_report"):
        assert tools[name].annotations.read_only_hint is False, name
    assert tools["rollback"].annotations.destructive_hint is False  # nothing is deleted
    assert tools["assess_rlvr_verifiability"].annotations.read_only_hint is True
    # run_stage's enum is realign.config.STAGES as the server is built
    assert tools["run_stage"].input_schema["properties"]["stage"]["enum"] == list(config.STAGES)
    assert "future_stage" in tools["run_stage"].input_schema["properties"]["stage"]["enum"]
    assert {"report", "examples"} <= set(tools["calculate_ifd_score"].output_schema["properties"])
    assert "schema" in tools["calibrate_hardware"].output_schema["$defs"]["CalibrationResult"][
        "properties"]  # the library's field alias, as in the cached JSON


async def test_list_suites_is_the_library_list() -> None:
    from realign.evaluation import list_suites

    async with Client(build_server()) as c:
        got = await call(c, "list_suites", {})
    assert got["suites"] == [s.model_dump(mode="json") for s in list_suites()]
    assert all(s["n_items"] > 0 for s in got["suites"])


# --------------------------------------------------------------------------- IFD
async def test_calculate_ifd_score(tiny_model_path: Path, tmp_path: Path, one_thread: None) -> None:
    from realign.ifd import ifd_report
    from realign.training_metrics import calculate_ifd_score

    data = write_jsonl(tmp_path / "sft.jsonl", IFD_ROWS)
    seen, on_progress = recorder()
    async with Client(build_server()) as c:
        got = await call(c, "calculate_ifd_score", {"path": str(data), "model": str(tiny_model_path),
                                                    "device": "cpu", "batch_size": 4},
                         progress_callback=on_progress)
        first = await call(c, "calculate_ifd_score", {"path": str(data), "limit": 2, "device": "cpu",
                                                      "model": str(tiny_model_path)})
        missing = await call_error(c, "calculate_ifd_score", {"path": str(tmp_path / "nope.jsonl"),
                                                              "model": str(tiny_model_path)})
        bad = write_jsonl(tmp_path / "bad.jsonl", [IFD_ROWS[0], {"instruction": "no answer"}])
        bad_row = await call_error(c, "calculate_ifd_score", {"path": str(bad),
                                                              "model": str(tiny_model_path)})
    # the library's public entry point on the same instructions and answers
    qs = ["What is the capital of France?", [{"role": "user", "content": "Add 2 and 3."}],
          "Name a colour.", "Write a line about the sea."]
    rs = ["Paris is the capital.", [{"role": "assistant", "content": "5"}], "Blue.",
          "The sea rolls grey under a low sky."]
    lib = calculate_ifd_score(str(tiny_model_path), qs, rs, device="cpu")
    scores = [e["ifd"] for e in got["examples"]]
    assert scores == pytest.approx(lib, rel=1e-5)
    assert [e["line"] for e in got["examples"]] == [1, 2, 3, 4]
    for e in got["examples"]:  # IFD = PPL(A|Q) / PPL(A)
        assert e["ifd"] == pytest.approx(e["ppl_conditional"] / e["ppl_unconditional"], rel=1e-9)
        assert e["tokens"] > 0
    want = ifd_report(lib)
    assert got["report"]["quantiles"] == pytest.approx(want.quantiles, rel=1e-5)
    assert got["report"]["mean"] == pytest.approx(want.mean, rel=1e-5)
    assert got["report"]["share_above_1"] == want.share_above_1
    assert got["report"]["n"] == got["report"]["measured"] == 4
    assert got["model"] == str(tiny_model_path)
    assert seen and seen[-1][0] == seen[-1][1] == 4  # examples scored / total
    assert [e["ifd"] for e in first["examples"]] == pytest.approx(lib[:2], rel=1e-5)
    assert first["report"]["n"] == 2
    assert "nope.jsonl" in missing and "not found" in missing
    assert "bad.jsonl:2" in bad_row and "response" in bad_row


# --------------------------------------------------------------------------- reward-model gap
@pytest.fixture(scope="module")
def reward_model(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained one-label sequence classifier on the tiny model (scores are random but fixed)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(3)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_path))
    m = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_path), num_labels=1)
    m.config.pad_token_id = tok.pad_token_id
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


async def test_score_preference_gap(reward_model: Path, tiny_model_path: Path, tmp_path: Path,
                                    one_thread: None) -> None:
    from realign.reward import gap_on_file

    rows = [json.loads(x) for x in PAIRS.read_text().splitlines()[:12]]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    seen, on_progress = recorder()
    async with Client(build_server()) as c:
        got = await call(c, "score_preference_gap",
                         {"path": str(data), "reward_model": str(reward_model), "device": "cpu",
                          "exclude_lines": [2], "batch_size": 4, "max_length": 64,
                          "thresholds": {"preference_gap": -1}},
                         progress_callback=on_progress)
        missing = await call_error(c, "score_preference_gap",
                                   {"path": str(tmp_path / "none.jsonl"),
                                    "reward_model": str(reward_model)})
        not_rm = await call_error(c, "score_preference_gap",
                                  {"path": str(data), "reward_model": str(tiny_model_path)})
    gate, found = gap_on_file(data, reward_model, exclude_lines=[2], batch_size=4, max_length=64,
                              device="cpu", thresholds=Thresholds(overrides={"preference_gap": -1}))
    assert got["scored_pairs"] == found["scored_pairs"] == 11  # line 2 excluded
    assert got["gap"] == pytest.approx(found["gap"], rel=1e-5)
    assert got["gate"]["value"] == pytest.approx(gate.value, rel=1e-5)
    assert got["gate"]["name"] == "preference_gap" and got["gate"]["status"] == "pass"
    assert got["gate"]["threshold"] == -1 and got["gate"]["overridden"] is True
    assert got["negative_gap"] == found["negative_gap"] and 2 not in got["negative_gap"]
    assert got["accuracy"] == pytest.approx(found["accuracy"])
    assert -1 < got["gap"] < 1 and got["margin"]["p50"] == pytest.approx(found["margin"]["p50"],
                                                                           rel=1e-5)
    assert seen and seen[-1][0] == seen[-1][1] == 22  # 2 sequences per pair
    assert "none.jsonl" in missing
    assert "not a reward model" in not_rm and str(tiny_model_path) in not_rm


# --------------------------------------------------------------------------- benchmarks
async def test_evaluate_benchmarks(tiny_model_path: Path, tmp_path: Path, one_thread: None) -> None:
    pytest.importorskip("lm_eval")
    from realign.backends.trl import TRLBackend
    from realign.evaluation import evaluate_model

    seen, on_progress = recorder()
    args = {"model": str(tiny_model_path), "suites": ["realign_knowledge", "realign_format"],
            "limit": 3, "batch_size": 4, "device": "cpu"}
    async with Client(build_server()) as c:
        got = await call(c, "evaluate_benchmarks", {**args, "include_items": True},
                         progress_callback=on_progress)
        # (an unknown suite name is an InputError too, but finding out indexes all of
        # lm-eval's tasks: ~15 s here; test_eval.py covers it)
        missing = await call_error(c, "evaluate_benchmarks", {**args, "model": str(tmp_path / "m")})
    h = TRLBackend().load(tiny_model_path, device="cpu")
    lib = evaluate_model(h.model, h.tokenizer, ["realign_knowledge", "realign_format"], limit=3,
                         batch_size=4)
    assert set(got["suites"]) == set(lib.suites) == {"realign_knowledge", "realign_format"}
    for name, s in lib.suites.items():
        g = got["suites"][name]
        assert g["score"] == pytest.approx(s.score) and g["n"] == s.n == 3
        assert g["metric"] == s.metric
        assert [i["score"] for i in g["items"]] == s.scores()
    msgs = [m for _, _, m in seen]
    assert "running realign_knowledge (1/2)" in msgs and "running realign_format (2/2)" in msgs
    assert seen[-1][0] == seen[-1][1] == 3
    assert str(tmp_path / "m") in missing


async def test_evaluate_benchmarks_drops_items_by_default(tiny_model_path: Path,
                                                          one_thread: None) -> None:
    pytest.importorskip("lm_eval")
    async with Client(build_server()) as c:
        got = await call(c, "evaluate_benchmarks", {"model": str(tiny_model_path), "limit": 2,
                                                    "suites": ["realign_knowledge"],
                                                    "device": "cpu"})
    s = got["suites"]["realign_knowledge"]
    assert s["items"] == [] and s["n"] == 2 and s["score"] in (0.0, 0.5, 1.0)


# --------------------------------------------------------------------------- hardware
async def test_calibrate_hardware(tiny_model_path: Path, tmp_path: Path, one_thread: None,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from realign import hardware_calibrator as hc

    monkeypatch.setenv("REALIGN_HOME", str(tmp_path / "home"))
    seen, on_progress = recorder()
    args = {"model": str(tiny_model_path), "seq_len": 16, "device": "cpu", "quick": True,
            "max_batch": 2, "target_batch": 4}
    async with Client(build_server()) as c:
        det = await call(c, "calibrate_hardware", {})
        cal = await call(c, "calibrate_hardware", args, progress_callback=on_progress)
        again = await call(c, "calibrate_hardware", args)
        missing = await call_error(c, "calibrate_hardware", {**args, "model": str(tmp_path / "m")})
    hw = hc.detect_hardware()
    assert det["calibration"] is None
    assert det["fingerprint"] == hw.fingerprint()
    assert det["hardware"]["cpu"]["logical_cores"] == hw.cpu.logical_cores
    assert det["hardware"]["accelerator"] == hw.accelerator
    r = cal["calibration"]
    assert [p["batch_size"] for p in r["points"]] == [1, 2]
    assert all(p["status"] == "ok" and p["examples_per_s"] > 0 for p in r["points"])
    assert r["recommended_batch_size"] in (1, 2) and r["cached"] is False
    rec = r["recommendation"]
    assert rec["per_device_batch"] * rec["gradient_accumulation_steps"] * rec["world_size"] == \
        rec["effective_batch"] >= 4
    # the library's own record: the cache file holds the same measurement
    cached = hc.load_calibration(hc.cache_path(hw, str(tiny_model_path), 16, "cpu"))
    assert [p.examples_per_s for p in cached.points] == [p["examples_per_s"] for p in r["points"]]
    assert again["calibration"]["cached"] is True
    assert again["calibration"]["points"] == r["points"]
    msgs = [m for _, _, m in seen]
    assert any(m and m.startswith("batch size 2") for m in msgs)
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)
    assert str(tmp_path / "m") in missing


# --------------------------------------------------------------------------- rollback, report
@pytest.fixture()
def failed_run(rejected_run) -> Path:
    """A run whose stage 7 rejected the policy; two stage-5 checkpoints passed the KL gate."""
    checks = [{"step": 10, "kl": 0.05, "heldout_margin": 0.3, "passed": True},
              {"step": 20, "kl": 0.08, "heldout_margin": 0.5, "passed": True},
              {"step": 30, "kl": 0.09, "heldout_margin": 0.4, "passed": True}]
    return rejected_run(checks, (10, 20, 30), stages=["sft_baseline", "dpo", "evaluation"])


def stub_assess(monkeypatch: pytest.MonkeyPatch, passing: set[str], calls: list[str]) -> None:
    """Replace the model-level re-evaluation (tested in test_stage7.py) by fixed gates."""
    import realign.assessment as s7

    t = Thresholds()

    def assess(ctx: Any, model_path: Any, out: Path, *, win_rate: bool = True,
               progress: Any = None) -> Any:
        calls.append(Path(model_path).name)
        ok = Path(model_path).name in passing
        out.mkdir(parents=True, exist_ok=True)
        return s7.Assessment(model=str(model_path), gates=[
            t.evaluate("capability_retention", 1.0 if ok else 0.5),
            t.evaluate("worst_benchmark_retention", 1.0 if ok else 0.5),
            t.evaluate("win_rate", 0.6 if win_rate else None)])

    monkeypatch.setattr(s7, "assess", assess)


async def test_rollback_and_report(failed_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from realign.rollback import deployed_model

    calls: list[str] = []
    stub_assess(monkeypatch, {"checkpoint-10"}, calls)
    seen, on_progress = recorder()
    async with Client(build_server(runs_dir=failed_run.parent)) as c:
        res = await call(c, "rollback", {"run": "rb"}, progress_callback=on_progress)
        rep = await call(c, "generate_report", {"run": "rb"})
        md = (await c.read_resource("realign://runs/rb/report.md")).contents[0].text
        rec = json.loads((await c.read_resource("realign://runs/rb/rollback.json"))
                         .contents[0].text)
        unknown = await call_error(c, "rollback", {"run": "no-such-run"})
    # checkpoint-30 (margin 0.4) is tried before checkpoint-10 (0.3); 20 was the rejected model
    assert calls == ["checkpoint-30", "checkpoint-10"]
    assert res["restored"]["name"] == "dpo-step-10"
    assert [e["passed"] for e in res["evaluated"]] == [False, True]
    assert res["regression"] == ["retention"]
    from realign_mcp._util import for_mcp

    for e in rec["evaluated"]:  # over MCP the gates' remedies name tools, not CLI commands
        for g in e["gates"]:
            g["remedy"] = for_mcp(g["remedy"]) if g["remedy"] else None
    assert res == rec  # the tool returns what rollback.json records, in MCP words
    assert deployed_model(failed_run)["model"].endswith("checkpoint-10")
    assert [m for _, _, m in seen][:2] == ["re-evaluating dpo-step-30", "re-evaluating dpo-step-10"]
    assert Path(rep["html"]) == failed_run / "report.html" and Path(rep["html"]).is_file()
    assert rep["markdown_text"] == (failed_run / "report.md").read_text(encoding="utf-8") == md
    assert "dpo-step-10" in md  # the report shows the rollback
    assert "no-such-run" in unknown


async def test_rollback_errors(failed_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from realign.fileio import write_json_atomic
    from realign_mcp.jobs import JobManager

    stub_assess(monkeypatch, set(), [])
    jobs = JobManager()
    async with Client(build_server(runs_dir=failed_run.parent, jobs=jobs)) as c:
        with jobs.claim(failed_run, "run"):  # another job holds the run directory
            busy = await call_error(c, "rollback", {"run": "rb"})
        t = Thresholds()
        write_json_atomic(failed_run / "stages" / "7-evaluation" / "verdict.json", make_verdict(
            "evaluation", [t.evaluate("capability_retention", 1.0)], t,
            findings={"decision": "deploy"}))
        passed = await call_error(c, "rollback", {"run": "rb"})
        forced = await call(c, "rollback", {"run": "rb", "force": True})
    assert "busy" in busy and "'run'" in busy
    assert "nothing to roll back" in passed
    # nothing passes: the stage-1 baseline is restored
    assert forced["restored"]["source"] == "baseline"
    assert json.loads((failed_run / "rollback.json").read_text())["restored"]["name"] == "baseline"


async def test_generate_report_missing_run(tmp_path: Path) -> None:
    async with Client(build_server(runs_dir=tmp_path)) as c:
        err = await call_error(c, "generate_report", {"run": str(tmp_path / "nowhere")})
    assert "nowhere" in err and "run.json" in err


# --------------------------------------------------------------------------- docs
async def test_docs_list_exactly_the_registered_tools() -> None:
    """README's "## MCP server" section and SKILL.md's "## MCP tools by stage" table name
    every registered tool and no other (a code span `name` or `name()`)."""
    import re

    async with Client(build_server()) as c:
        tools = {t.name for t in (await c.list_tools()).tools}

    def section(path: Path, heading: str) -> str:
        text = path.read_text(encoding="utf-8")
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        return text[start: nxt if nxt > 0 else None]

    readme = set(re.findall(r"`([a-z][a-z0-9_]*)`", section(REPO / "README.md", "## MCP server")))
    table = "\n".join(ln for ln in section(REPO / "SKILL.md", "## MCP tools by stage").splitlines()
                      if ln.startswith("|"))
    assert tools <= readme, tools - readme
    assert set(re.findall(r"`([a-z][a-z0-9_]*)\(\)`", table)) == tools
    assert "assess_rlvr_verifiability" in readme and "assess_rlvr_verifiability" in tools


async def test_new_tools_confine_paths(tmp_path: Path) -> None:
    """Over HTTP (a confined policy) the new tools refuse paths outside the roots before
    loading anything."""
    from realign_mcp.paths import PathPolicy

    root = tmp_path / "root"
    root.mkdir()
    outside = write_jsonl(tmp_path / "out.jsonl", IFD_ROWS)
    server = build_server(policy=PathPolicy.confined([root]), runs_dir="runs")
    async with Client(server) as c:
        errs = [
            await call_error(c, "calculate_ifd_score", {"path": str(outside)}),
            await call_error(c, "score_preference_gap", {"path": "ok.jsonl",
                                                         "reward_model": str(tmp_path)}),
            await call_error(c, "evaluate_benchmarks", {"model": str(tmp_path / "m")}),
            await call_error(c, "calibrate_hardware", {"model": "../m"}),
            await call_error(c, "rollback", {"run": str(tmp_path)}),
            await call_error(c, "generate_report", {"run": "../x"}),
        ]
    for e in errs:
        assert "outside the allowed roots" in e or "contains '..'" in e, e


async def test_assess_rlvr_verifiability_runs_the_verifiers(tmp_path: Path) -> None:
    """The tool returns the library's report: 2 of 3 rows verifiable (one has no ground
    truth), one response right, one wrong; below the 0.8 gate → fail."""
    from realign.training_metrics import assess_rlvr_verifiability

    data = write_jsonl(tmp_path / "rl.jsonl", [
        {"prompt": "What is 6 times 7?", "response": "The answer is 42.", "answer": "42"},
        {"prompt": "Capital of France?", "response": "It is not Paris. Maybe Tokyo.",
         "answer": "Paris"},
        {"prompt": "Write a poem.", "response": "Roses."},
    ])
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        got = await call(c, "assess_rlvr_verifiability", {"path": str(data)})
        err = await call_error(c, "assess_rlvr_verifiability", {"path": str(tmp_path / "nope.jsonl")})
    lib = assess_rlvr_verifiability(data)
    assert got["rows"] == 3 and got["verifiable"] == 2 == lib.verifiable
    assert got["passed"] == 1 and got["status"] == "fail" == lib.status
    assert [r["passed"] for r in got["results"][:2]] == [True, False]
    assert "nope.jsonl" in err
