"""MCP confinement of run directories (issue 14, items 1, 2 and 4), in process.

* item 1: a run id is one safe folder name: ``../../x``, an absolute id, ``.``/``..``
  (as a tool argument or as ``run_id:`` in the YAML) are tool errors and nothing is
  written outside the runs directory; the library's rule is
  :func:`realign.config.validate_run_id`;
* item 2: ``dpo.extra`` / ``reward.extra`` keys that decide where files go are refused at
  config load, with the key named;
* item 4: one resolver for every run path (:class:`realign_mcp.paths.RunDirs`): a
  symlinked run directory under ``runs/`` that leads out, or a symlink inside a run
  directory that leads out, is refused by ``run_status``, ``list_runs``,
  ``generate_report``, ``resume_run``, ``run_stage``, ``cancel_run`` and the
  ``realign://runs/...`` resources alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="needs the mcp extra (pip install -e '.[mcp]')")
from mcp import Client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

pytest.importorskip("realign.pipeline")

from realign.config import RunConfig, load_config  # noqa: E402
from realign.errors import InputError  # noqa: E402
from realign_mcp.paths import PathNotAllowed, PathPolicy  # noqa: E402
from realign_mcp.server import build_server  # noqa: E402
from mcp_helpers import call, call_error  # noqa: E402

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs.jsonl"
EVAL = REPO / "examples" / "eval.jsonl"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(folder: Path, name: str = "run.yaml", **extra: Any) -> Path:
    cfg = {"data": str(PAIRS), "stages": ["preference_data"],
           "thresholds": {"min_pairs": 500}, **extra}
    p = folder / name
    p.write_text(json.dumps(cfg))  # JSON is YAML
    return p


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("bad", ["../../x", "../x", "/tmp/abs-run", ".", "..", "a/b", "a\\b",
                                 ".hidden", "", "x" * 129, "run\n"])
def test_validate_run_id_refuses_what_is_not_one_folder_name(bad: str) -> None:
    from realign.config import validate_run_id

    with pytest.raises(ValueError, match="run_id"):
        validate_run_id(bad)
    with pytest.raises(ValueError):
        RunConfig(data="d.jsonl", run_id=bad)


@pytest.mark.parametrize("good", ["r1", "2026-01-01_run.2", "A", "x" * 128, "a..b"])
def test_validate_run_id_accepts_folder_names(good: str) -> None:
    from realign.config import validate_run_id

    assert validate_run_id(good) == good
    assert RunConfig(data="d.jsonl", run_id=good).run_id == good


def test_run_id_in_yaml_is_an_input_error_naming_line_and_field(tmp_path: Path) -> None:
    p = tmp_path / "run.yaml"
    p.write_text(f"data: {PAIRS}\nrun_id: ../../escape\n")
    with pytest.raises(InputError) as e:
        load_config(p)
    assert e.value.line == 2 and e.value.field == "run_id"
    assert "../../escape" in str(e.value) and "run.yaml:2" in str(e.value)


async def test_start_pipeline_refuses_run_ids_that_leave_the_runs_dir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "p.jsonl").write_bytes(PAIRS.read_bytes())
    cfg = config(root, data="p.jsonl")
    for policy in (PathPolicy.confined([root]), PathPolicy(base=root)):
        async with Client(build_server(policy=policy, runs_dir=root / "runs")) as c:
            for bad in ("../../x", "../x", str(tmp_path / "abs"), ".", "..", "a/b"):
                for tool in ("start_pipeline", "run_pipeline"):
                    err = await call_error(c, tool, {"config_path": str(cfg), "run_id": bad})
                    assert "run_id" in err and "not a run name" in err, err
            # run_id: in the YAML
            yaml_cfg = root / "esc.yaml"
            yaml_cfg.write_text("data: p.jsonl\nstages: [preference_data]\nrun_id: ../../y\n")
            err = await call_error(c, "start_pipeline", {"config_path": str(yaml_cfg)})
            assert "esc.yaml:3" in err and "run_id" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # nothing outside
    assert not (root / "runs").exists() or not any((root / "runs").iterdir())
    assert not (root / "run.json").exists()


async def test_good_run_id_still_creates_the_run_in_the_runs_dir(tmp_path: Path) -> None:
    async with Client(build_server(runs_dir=tmp_path / "runs")) as c:
        st = await call(c, "run_pipeline", {"config_path": str(config(tmp_path,
                                                                      eval_sets=[str(EVAL)])),
                                            "run_id": "ok.1"})
    assert st["state"] == "passed" and Path(st["run_dir"]) == (tmp_path / "runs" / "ok.1").resolve()


# --------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("section,key", [
    ("dpo", "output_dir"), ("dpo", "logging_dir"), ("reward", "output_dir"),
    ("reward", "logging_dir"), ("dpo", "push_to_hub"), ("dpo", "hub_model_id"),
    ("reward", "push_to_hub"), ("dpo", "resume_from_checkpoint"), ("dpo", "deepspeed"),
])
def test_extra_keys_that_decide_where_files_go_are_refused(tmp_path: Path, section: str,
                                                           key: str) -> None:
    p = tmp_path / "run.yaml"
    p.write_text(f"data: {PAIRS}\n{section}:\n  extra:\n    {key}: /tmp/elsewhere\n")
    with pytest.raises(InputError) as e:
        load_config(p)
    assert f"{section}.extra.{key}" in str(e.value) and e.value.line == 4


async def test_start_pipeline_refuses_extra_output_dir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "p.jsonl").write_bytes(PAIRS.read_bytes())
    cfg = config(root, data="p.jsonl", dpo={"extra": {"output_dir": str(tmp_path / "ckpt")}})
    async with Client(build_server(policy=PathPolicy.confined([root]))) as c:
        err = await call_error(c, "start_pipeline", {"config_path": str(cfg), "run_id": "r"})
    assert "dpo.extra.output_dir" in err
    assert not (root / "runs").exists() and not (tmp_path / "ckpt").exists()


# --------------------------------------------------------------------------- item 4
@pytest.fixture
def planted(tmp_path: Path) -> dict[str, Path]:
    """runs/ with a good run, a symlink 'evil' to a run directory outside, and a run
    whose report.md is a symlink to a file outside."""
    from realign.pipeline import create_run

    runs = tmp_path / "root" / "runs"
    runs.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    base = RunConfig(data=str(PAIRS), stages=["preference_data"],
                     thresholds={"min_pairs": 500})
    create_run(base.model_copy(update={"output_dir": str(runs), "run_id": "good"}))
    victim = create_run(base.model_copy(update={"output_dir": str(outside), "run_id": "victim"}))
    (runs / "evil").symlink_to(victim, target_is_directory=True)
    inner = create_run(base.model_copy(update={"output_dir": str(runs), "run_id": "inner"}))
    secret = outside / "secret.md"
    secret.write_text("secret\n")
    (inner / "report.md").symlink_to(secret)
    return {"runs": runs, "outside": outside, "victim": victim, "secret": secret,
            "root": tmp_path / "root"}


@pytest.mark.parametrize("confined", [True, False])
async def test_symlinked_run_dirs_are_refused_by_every_tool_and_resource(
        planted: dict[str, Path], confined: bool) -> None:
    runs, victim = planted["runs"], planted["victim"]
    before = tree(planted["outside"])
    policy = PathPolicy.confined([planted["root"]]) if confined else PathPolicy(base=planted["root"])
    async with Client(build_server(policy=policy, runs_dir=runs)) as c:
        for run in ("evil", str(runs / "evil"), "inner"):
            for tool, extra in (("run_status", {}), ("generate_report", {}), ("resume_run", {}),
                                ("run_stage", {"stage": "preference_data"}),
                                ("cancel_run", {}), ("rollback", {})):
                err = await call_error(c, tool, {"run": run, **extra})
                assert "outside" in err and "symlink" in err, (tool, run, err)
        listed = await call(c, "list_runs", {})
        for uri in ("realign://runs/evil/run.json", "realign://runs/evil/status.json",
                    "realign://runs/inner/report.md"):
            with pytest.raises(MCPError):
                await c.read_resource(uri)
        good = await call(c, "run_status", {"run": "good"})
    assert [r["run_id"] for r in listed["runs"]] == ["good"]
    assert {s["name"] for s in listed["skipped"]} == {"evil", "inner"}
    assert all("outside" in s["reason"] for s in listed["skipped"])
    assert good["state"] == "created"
    # nothing was read into, or written to, the directory outside
    assert tree(planted["outside"]) == before
    assert planted["secret"].read_text() == "secret\n"
    assert json.loads((victim / "status.json").read_text())["state"] == "created"
    assert not (victim / "report.html").exists()


def test_run_dirs_resolver(tmp_path: Path, planted: dict[str, Path]) -> None:
    from realign_mcp.paths import RunDirs

    runs = RunDirs(PathPolicy(base=tmp_path), planted["runs"])
    assert runs.resolve("good") == (planted["runs"] / "good").resolve()
    with pytest.raises(PathNotAllowed, match="outside the runs directory"):
        runs.resolve("evil")
    with pytest.raises(PathNotAllowed, match="outside the run directory"):
        runs.resolve("inner")
    with pytest.raises(PathNotAllowed):
        runs.entry("../x")
    with pytest.raises(FileNotFoundError, match="list_runs"):
        runs.resolve("missing")
    found, skipped = runs.listing()
    assert [d.name for d in found] == ["good"] and {n for n, _ in skipped} == {"evil", "inner"}


# --------------------------------------------------------------------------- default run
async def test_pipeline_tools_without_a_config_make_the_default_run(tmp_path: Path) -> None:
    """No ``config_path``: the default run (as ``realign run`` with no arguments), in the
    runs directory; the shipped prompt file passes root confinement (package data), a copy
    of it outside the root does not."""
    from realign.default_run import default_prompts_path
    from realign_mcp.pipeline_tools import PipelineTools

    root = tmp_path / "root"
    root.mkdir()
    tools = PipelineTools(PathPolicy.confined([root]), root / "runs")
    cfg, folder = tools.load(None, "demo", ["iterative.max_iterations=1"])
    assert Path(cfg.prompts) == default_prompts_path() and cfg.data is None
    assert cfg.iterative.max_iterations == 1 and len(cfg.stages) == 7
    assert folder is not None and folder.parent == (root / "runs").resolve()
    outside = tmp_path / "sentiment.jsonl"
    outside.write_bytes(default_prompts_path().read_bytes())
    with pytest.raises(Exception, match="prompts"):
        tools.confine(cfg.model_copy(update={"prompts": str(outside)}), "config")
    with pytest.raises(Exception, match="generation.samples"):
        tools.load(None, None, ["generation.samples=1"])
    async with Client(build_server(policy=PathPolicy.confined([root]),
                                   runs_dir=root / "runs")) as c:
        listed = {t.name: t for t in (await c.list_tools()).tools}
    for name in ("start_pipeline", "run_pipeline"):
        schema = listed[name].input_schema
        assert "config_path" in schema["properties"]
        assert "config_path" not in schema.get("required", []), (name, schema)
