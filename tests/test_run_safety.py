"""Runs that cannot be corrupted or stranded, on stub stages (no model): the run-directory
claim and run ids, preflight, passed_with_failures, stale verdicts, corrupt verdicts,
temp files left by a kill, file modes; and a subprocess race of two `realign run`."""

from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from realign import pipeline
from realign.cli import app
from realign.config import RunConfig
from realign.errors import InputError
from realign.fileio import TEMP_NAME, temp_sibling, write_json_atomic
from realign.gates import EXIT_BAD_INPUT, RUN_EXIT, Thresholds, make_verdict
from realign.pipeline import create_run, final_state, list_runs, preflight, run_stages, run_status
from realign.rundir import RunDir, records

ROOT = Path(__file__).resolve().parents[1]
STAGE_LIST = ["sft_baseline", "preference_data", "reference_init", "dpo", "evaluation"]
GATE = {"sft_baseline": "baseline_perplexity", "preference_data": "min_pairs",
        "reference_init": "initial_kl", "dpo": "kl_divergence", "evaluation": "win_rate"}
PASSING = {"baseline_perplexity": 5.0, "min_pairs": 5000, "initial_kl": 0.0,
           "kl_divergence": 0.01, "win_rate": 0.9}


# ----------------------------------------------------------------------------- stub stages


class Stubs:
    """Stage functions that write one artifact file whose content depends on the stage's
    ``version`` and on the artifacts it read (as a real stage's output would)."""

    def __init__(self) -> None:
        self.version = {n: 1 for n in STAGE_LIST}
        self.values = {n: PASSING[GATE[n]] for n in STAGE_LIST}
        self.calls: list[str] = []

    def fn(self, name: str):
        def run(ctx):
            from realign.stages.registry import stage_spec

            self.calls.append(name)
            read = {r: ctx.rundir.artifacts_digest(r) for r in stage_spec(name).reads}
            out = ctx.stage_dir(name) / "out.json"
            write_json_atomic(out, {"version": self.version[name], "read": read})
            t = ctx.thresholds
            return make_verdict(name, [t.evaluate(GATE[name], self.values[name])], t,
                                artifacts={"out": str(out)})
        return run


@pytest.fixture()
def stubs(monkeypatch) -> Stubs:
    s = Stubs()
    for n in STAGE_LIST:
        monkeypatch.setitem(pipeline._RUNNERS, n, s.fn(n))
    return s


def _cfg(tmp: Path, **kw) -> RunConfig:
    base = dict(data=str(tmp / "pairs.jsonl"), output_dir=str(tmp / "runs"), stages=STAGE_LIST)
    base.update(kw)
    return RunConfig(**base)


# ----------------------------------------------------------------------------- final state


def test_final_state_ranks_failures_over_unmeasured():
    t = Thresholds()
    ok = make_verdict("dpo", [t.evaluate("kl_divergence", 0.01)], t)
    fail = make_verdict("preference_data", [t.evaluate("min_pairs", 3)], t)
    unm = make_verdict("evaluation", [t.evaluate("win_rate", None)], t)
    assert final_state([ok], []) == ("passed", "all stages complete")
    assert final_state([ok, unm], [])[0] == "incomplete"
    assert final_state([fail, ok], [])[0] == "failed"
    state, msg = final_state([fail, ok, unm], ["min_pairs"])
    assert state == "passed_with_failures"
    assert "preference_data:min_pairs" in msg and "unmeasured: evaluation:win_rate" in msg
    assert RUN_EXIT["passed_with_failures"] == 4 and RUN_EXIT["passed"] == 0
    assert len(set(RUN_EXIT[s] for s in ("passed", "failed", "incomplete", "passed_with_failures"))) == 4


def test_allowed_failure_ends_passed_with_failures(tmp_path, stubs):
    stubs.values["dpo"] = 0.5  # kl_divergence fails
    run = create_run(_cfg(tmp_path, run_id="allowed", allow_gate_failures=["kl_divergence"]))
    st = run_stages(run)
    assert st.state == "passed_with_failures" and st.allowed_failures == ["dpo:kl_divergence"]
    assert "dpo:kl_divergence" in st.message
    assert [s.status for s in st.stages] == ["pass", "pass", "pass", "fail", "pass"]
    # `realign resume` on the finished run: nothing reruns, exit 4; `realign status` says so
    res = CliRunner().invoke(app, ["resume", str(run), "--json"])
    assert res.exit_code == 4, res.output
    assert json.loads(res.stdout)["state"] == "passed_with_failures"
    assert stubs.calls == STAGE_LIST
    res = CliRunner().invoke(app, ["status", str(run)])
    assert res.exit_code == 0 and "passed_with_failures" in res.output
    assert "dpo:kl_divergence" in res.output
    for f in ("report.html", "report.md"):
        text = (run / f).read_text()
        assert "passed_with_failures" in text and "passed with failures" in text
    # not allowed: the same failure stops the run
    stubs.calls.clear()
    run2 = create_run(_cfg(tmp_path, run_id="strict"))
    st2 = run_stages(run2)
    assert st2.state == "failed" and stubs.calls == STAGE_LIST[:4]


def test_all_gates_pass_is_passed(tmp_path, stubs):
    st = run_stages(create_run(_cfg(tmp_path, run_id="ok")))
    assert st.state == "passed" and st.allowed_failures == [] and st.stale == []


# ----------------------------------------------------------------------------- staleness


def test_rerun_marks_later_verdicts_stale_and_resume_reruns_them(tmp_path, stubs):
    run = create_run(_cfg(tmp_path, run_id="stale"))
    run_stages(run)
    rd = RunDir(run)
    v3 = rd.read_verdict("reference_init")
    assert set(v3.inputs) == {"sft_baseline", "preference_data"}
    assert v3.inputs["preference_data"] == rd.artifacts_digest("preference_data")
    assert rd.read_verdict("evaluation").inputs["reward_model"] is None  # not run: recorded

    # rerun stage 2 with the same output: nothing is stale
    run_stages(run, stages=["preference_data"], force=True)
    assert run_status(run).stale == []

    # rerun stage 2 with a different output: stages 3, 5 and 7 (which read it) are stale
    stubs.version["preference_data"] = 2
    stubs.calls.clear()
    run_stages(run, stages=["preference_data"], force=True)
    st = run_status(run)
    assert st.stale == ["reference_init", "dpo", "evaluation"]
    by = {s.name: s for s in st.stages}
    assert by["sft_baseline"].status == "pass" and by["preference_data"].status == "pass"
    assert by["dpo"].status == "stale" and "preference_data" in by["dpo"].note
    assert "stale" in st.message
    res = CliRunner().invoke(app, ["status", str(run)])
    assert res.exit_code == 0 and "stale" in res.output

    # resume reruns exactly the stale stages, in order
    stubs.calls.clear()
    st = run_stages(run, job="resume")
    assert stubs.calls == ["reference_init", "dpo", "evaluation"]
    assert st.stale == [] and st.state == "passed"
    assert any("stale" in w for w in rd.read_verdict("dpo").warnings)
    assert list(run.glob("stages/.3-reference_init.replaced-*"))  # the old folder is kept

    # staleness carries down the chain: stage 3 changes -> 5 stale; 7 reads 5
    stubs.version["reference_init"] = 2
    run_stages(run, stages=["reference_init"], force=True)
    st = run_status(run)
    assert st.stale == ["dpo", "evaluation"]
    assert "dpo" in next(s.note for s in st.stages if s.name == "evaluation")
    stubs.calls.clear()
    run_stages(run)
    assert stubs.calls == ["dpo", "evaluation"] and run_status(run).stale == []


def test_a_copied_run_directory_is_not_stale(tmp_path, stubs):
    import shutil

    run = create_run(_cfg(tmp_path, run_id="orig"))
    run_stages(run)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert run_status(copy).stale == []  # the copy's verdicts still point at the original
    for vp in copy.glob("stages/*/verdict.json"):
        vp.write_text(vp.read_text().replace(str(run), str(copy)))
    assert run_status(copy).stale == []  # ... or at its own files: same content
    (copy / "stages" / "2-preference_data" / "out.json").write_text('{"changed": 1}')
    assert run_status(copy).stale == ["reference_init", "dpo", "evaluation"]


# ----------------------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("content", [b"", b'{"stage": "preference_data", "sta', b"\x00\x00"])
def test_corrupt_verdict_is_reported_for_its_run_only(tmp_path, stubs, content):
    good = create_run(_cfg(tmp_path, run_id="good"))
    bad = create_run(_cfg(tmp_path, run_id="bad"))
    run_stages(good)
    run_stages(bad)
    vp = RunDir(bad).verdict_path("preference_data")
    vp.write_bytes(content)

    runs = {r.run_id: r for r in list_runs(tmp_path / "runs")}
    assert runs["good"].state == "passed" and [s.status for s in runs["good"].stages] == ["pass"] * 5
    st = runs["bad"]
    by = {s.name: s for s in st.stages}
    assert by["preference_data"].status == "corrupt" and by["preference_data"].verdict is None
    assert str(vp) in by["preference_data"].note and str(vp) in st.message
    res = CliRunner().invoke(app, ["runs", str(tmp_path / "runs"), "--json"])
    assert res.exit_code == 0 and {r["run_id"] for r in json.loads(res.stdout)} == {"good", "bad"}
    res = CliRunner().invoke(app, ["status", str(bad)])
    assert res.exit_code == 0 and "corrupt" in res.output
    res = CliRunner().invoke(app, ["report", str(bad)])
    assert res.exit_code == 0, res.output
    assert "corrupt" in (bad / "report.md").read_text()

    # resume reruns the stage (the bad file is kept beside it) and what read it
    stubs.calls.clear()
    st = run_stages(bad, job="resume")
    assert st.state == "passed"
    assert stubs.calls[0] == "preference_data"
    assert (vp.parent / "verdict.corrupt-1.json").read_bytes() == content
    assert any("unreadable" in w for w in RunDir(bad).read_verdict("preference_data").warnings)


def test_corrupt_run_json_is_listed_not_fatal(tmp_path, stubs):
    good = create_run(_cfg(tmp_path, run_id="good"))
    bad = create_run(_cfg(tmp_path, run_id="bad"))
    (bad / "run.json").write_bytes(b"")
    runs = {r.run_id: r for r in list_runs(tmp_path / "runs")}
    assert runs["good"].state == "created"
    assert runs["bad"].state == "corrupt" and "run.json" in runs["bad"].message
    res = CliRunner().invoke(app, ["status", str(bad)])
    assert res.exit_code == EXIT_BAD_INPUT and "run.json" in res.output
    assert CliRunner().invoke(app, ["runs", str(tmp_path / "runs")]).exit_code == 0
    (good / "status.json").write_text("{not json")
    st = run_status(good)
    assert "status.json is unreadable" in st.message


DEPLOYED = {"model": "old", "source": "stage 5", "decided_by": "stage 7", "digest": None,
            "gates": {}, "time": "2024-01-01T00:00:00+00:00"}


def test_temp_files_of_a_kill_are_cleaned_on_the_next_start(tmp_path, stubs):
    run = create_run(_cfg(tmp_path, run_id="tmp"))
    run_stages(run)
    s2, s5 = run / "stages" / "2-preference_data", run / "stages" / "5-dpo"
    left = [s2 / ".verdict.json.k3j4h5g6", s2 / ".clean.jsonl.a1b2c3d4.tmp",
            s2 / ".clean.jsonl.tmp-a1b2c3d4.tmp", run / ".status.json.tmp-zz_9x8y7"]
    for p in left:
        p.write_text("half")
    model_tmp = s5 / ".model.tmp-q1w2e3r4"
    (model_tmp / "sub").mkdir(parents=True)
    (model_tmp / "sub" / "weights.bin").write_bytes(b"x")
    # replace_into killed between its two renames: the old file is put back
    (run / "deployed_model.json").write_text(json.dumps(DEPLOYED))
    os.replace(run / "deployed_model.json", run / ".deployed_model.json.old-4242")
    (run / ".report.md.old-17").write_text("older")  # report.md exists: this one goes
    keep = [run / "stages" / ".5-dpo.replaced-20240101-000000", s2 / ".hidden"]
    keep[0].mkdir()
    keep[1].write_text("not ours")
    assert all(TEMP_NAME.match(p.name) for p in left + [model_tmp])
    assert not any(TEMP_NAME.match(p.name) for p in keep)

    run_stages(run, job="resume")
    for p in left + [model_tmp, run / ".report.md.old-17", run / ".deployed_model.json.old-4242"]:
        assert not p.exists(), p
    assert json.loads((run / "deployed_model.json").read_text()) == DEPLOYED
    assert all(p.exists() for p in keep)
    assert not [p for p in run.rglob(".*") if TEMP_NAME.match(p.name)]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_written_files_keep_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        d = temp_sibling(tmp_path / "model", directory=True)
        f = temp_sibling(tmp_path / "b.bin", suffix=".npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
    assert TEMP_NAME.match(d.name) and TEMP_NAME.match(f.name) and f.name.endswith(".npz")


# ----------------------------------------------------------------------------- the claim


def test_existing_run_id_is_refused_and_untouched(tmp_path):
    run = create_run(_cfg(tmp_path, run_id="x"))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(InputError, match="already exists") as e:
        create_run(_cfg(tmp_path, run_id="x", seed=7))
    assert e.value.field == "run_id"
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    (tmp_path / "runs" / "empty").mkdir()  # a folder without run.json is not taken over
    with pytest.raises(InputError, match="holds no run.json"):
        create_run(_cfg(tmp_path, run_id="empty"))
    assert list((tmp_path / "runs" / "empty").iterdir()) == []


@pytest.mark.parametrize("bad", ["../x", "/tmp/abs", ".", "..", "a/b", ".hidden", "x" * 200, ""])
def test_unsafe_run_ids_are_bad_input(tmp_path, bad):
    cfg = _cfg(tmp_path).model_copy(update={"run_id": bad})  # as `--run-id` would set it
    with pytest.raises(InputError) as e:
        create_run(cfg)
    assert e.value.field == "run_id"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_timestamp_ids_are_unique(tmp_path, monkeypatch):
    class Fixed(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(records, "_dt", types.SimpleNamespace(datetime=Fixed,
                                                               timezone=datetime.timezone))
    names = [create_run(_cfg(tmp_path)).name for _ in range(3)]
    assert names == ["20240102-030405", "20240102-030405-2", "20240102-030405-3"]
    for n in names:
        assert json.loads((tmp_path / "runs" / n / "run.json").read_text())["run_id"] == n


def test_failure_after_the_claim_leaves_nothing(tmp_path, monkeypatch):
    def boom():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records, "hardware_summary", boom)
    with pytest.raises(OSError):
        create_run(_cfg(tmp_path, run_id="full"))
    assert list((tmp_path / "runs").iterdir()) == []


# ----------------------------------------------------------------------------- preflight


def _write_config(tmp: Path, text: str, rows: int = 40) -> Path:
    data = tmp / "pairs.jsonl"
    if not data.exists():
        data.write_text("".join((ROOT / "examples" / "pairs.jsonl").read_text()
                                .splitlines(keepends=True)[:rows]))
    cfg = tmp / "run.yaml"
    cfg.write_text(textwrap.dedent(text))
    return cfg


PREFLIGHT_CASES = {
    "model": ("model: ./no-such-model\ndata: pairs.jsonl\noutput_dir: {out}\n", "model", 1),
    "data": ("data: missing.jsonl\noutput_dir: {out}\n", "data", 1),
    "eval": ("data: pairs.jsonl\neval_sets: [nope.jsonl]\noutput_dir: {out}\n", "eval_sets.0", 2),
    "dpo_steps": ("data: pairs.jsonl\noutput_dir: {out}\ndpo:\n  beta: 0.1\n  max_steps: 0\n",
                  "dpo.max_steps", 5),
    "reward_steps": ("data: pairs.jsonl\noutput_dir: {out}\nreward: {{max_steps: 0}}\n",
                     "reward.max_steps", 3),
}


@pytest.mark.parametrize("case", list(PREFLIGHT_CASES))
def test_run_config_is_checked_before_the_run_directory(tmp_path, case):
    text, field, line = PREFLIGHT_CASES[case]
    out = tmp_path / "runs"
    cfg = _write_config(tmp_path, text.format(out=out))
    res = CliRunner().invoke(app, ["run", "-c", str(cfg), "--run-id", "r"])
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert f"field '{field}'" in res.output
    assert f"{cfg}:{line}:" in res.output.replace("\n", "")
    assert "Traceback" not in res.output
    assert not out.exists()  # nothing created


def test_bad_data_row_is_named_before_the_run_directory(tmp_path):
    out = tmp_path / "runs"
    cfg = _write_config(tmp_path, f"data: pairs.jsonl\noutput_dir: {out}\n")
    data = tmp_path / "pairs.jsonl"
    lines = data.read_text().splitlines()
    lines[30] = json.dumps({"prompt": "p", "chosen": 5, "rejected": "r"})
    data.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["run", "-c", str(cfg)])
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert f"{data}:31:" in res.output.replace("\n", "") and "chosen" in res.output
    assert not out.exists()
    # skip_bad_rows: the bad row is stage 2's to skip and report, not a preflight error
    preflight(RunConfig(data=str(data), output_dir=str(out), skip_bad_rows=True,
                        stages=["preference_data"]))


def test_cli_run_id_is_checked(tmp_path):
    out = tmp_path / "runs"
    cfg = _write_config(tmp_path, f"data: pairs.jsonl\noutput_dir: {out}\n")
    for bad in ("../escape", "/abs/x", "."):
        res = CliRunner().invoke(app, ["run", "-c", str(cfg), "--run-id", bad])
        assert res.exit_code == EXIT_BAD_INPUT and "run_id" in res.output, res.output
    assert not out.exists() and not (tmp_path / "escape").exists()


def test_preflight_checks_only_what_the_stages_need(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text((ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[0] + "\n")
    # stage 2 alone needs no model; dpo.max_steps is not read
    preflight(RunConfig(data=str(data), model="./gone", dpo={"max_steps": 0},
                        stages=["preference_data"]))
    with pytest.raises(InputError, match="max_steps"):
        preflight(RunConfig(data=str(data), dpo={"max_steps": 0}))
    preflight(RunConfig(data=str(data), dpo={"max_steps": -1}))  # epochs: valid
    preflight(RunConfig(data=str(data), model="org/hub-model"))  # a hub id is not a path


# ----------------------------------------------------------------------------- the race


RACER = """
import os, sys, time
from realign.cli import main
from realign import pipeline  # the imports a run needs, done before the start line
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.001)
sys.exit(main(sys.argv[2:]))
"""


def test_two_runs_racing_for_one_run_id(tmp_path):
    out = tmp_path / "runs"
    cfg = _write_config(tmp_path, f"""\
        data: pairs.jsonl
        output_dir: {out}
        stages: [preference_data]
        score_scale: 1-10
        thresholds: {{min_pairs: 10}}
        """, rows=60)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(go), "run", "-c", str(cfg),
                               "--run-id", "race", "--json", f"seed={seed}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for seed in (11, 22)]
    time.sleep(3)  # both have imported realign and wait at the start line
    go.write_text("")
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = [r[0] for r in results]
    losers = [i for i, c in enumerate(codes) if c == EXIT_BAD_INPUT]
    winners = [i for i, c in enumerate(codes) if c != EXIT_BAD_INPUT]
    assert len(losers) == 1 and len(winners) == 1, results
    lose, win = results[losers[0]], results[winners[0]]
    assert "already exists" in lose[2] and "Traceback" not in lose[2]
    final = json.loads(win[1])
    assert codes[winners[0]] == RUN_EXIT[final["state"]]
    run = out / "race"
    rec = json.loads((run / "run.json").read_text())
    assert rec["config"]["seed"] == (11, 22)[winners[0]]  # the winner's run.json, intact
    assert json.loads((run / "status.json").read_text())["state"] == final["state"]
    assert sorted(p.name for p in out.iterdir()) == ["race"]
