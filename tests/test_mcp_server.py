"""The MCP server, in process (mcp.Client on the MCPServer): tools, schemas, errors,
skills (SEP-2640), run resources, prompts and path confinement."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="needs the mcp extra (pip install -e '.[mcp]')")
from mcp import Client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402
from mcp_types import INVALID_PARAMS  # noqa: E402

from realign.decontamination import DecontamConfig  # noqa: E402
from realign.gates import PRESETS  # noqa: E402
from realign_mcp.paths import PathNotAllowed, PathPolicy  # noqa: E402
from realign_mcp.server import build_server  # noqa: E402
from realign_mcp.skills import (  # noqa: E402
    EXTENSION_ID,
    GetSkillParams,
    GetSkillRequest,
    GetSkillResult,
    ListSkillsRequest,
    ListSkillsResult,
    load_skill,
)
from mcp_helpers import call, call_error  # noqa: E402

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs.jsonl"
EVAL = REPO / "examples" / "eval.jsonl"

VALIDATORS = {"validate_preference_data", "check_decontamination", "get_thresholds"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def row(i: int, **kw: Any) -> dict[str, Any]:
    r = {"prompt": f"Question number {i} about topic {i * 7}?", "chosen": f"A good answer {i}.",
         "rejected": f"A worse and much longer answer, number {i}, that rambles."}
    r.update(kw)
    return r


# --------------------------------------------------------------------------- tools
async def test_tools_listed_with_schemas_and_hints() -> None:
    async with Client(build_server()) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
    read_only = set(VALIDATORS)
    assert VALIDATORS | {"clean_preference_data"} <= set(tools)
    if importlib.util.find_spec("realign.pipeline"):
        assert {"start_pipeline", "run_pipeline", "resume_run", "run_stage", "run_status",
                "list_runs"} <= set(tools)
        assert tools["start_pipeline"].annotations.read_only_hint is False
        read_only |= {"run_status", "list_runs"}
    for name in read_only:
        assert tools[name].annotations and tools[name].annotations.read_only_hint is True, name
    assert tools["clean_preference_data"].annotations.read_only_hint is False
    v = tools["validate_preference_data"]
    assert v.input_schema["required"] == ["path"]
    assert v.input_schema["properties"]["preset"]["enum"] == ["relaxed", "standard", "strict"]
    # decontamination defaults are the library's
    assert v.input_schema["properties"]["min_coverage"]["default"] == DecontamConfig().min_coverage
    assert v.input_schema["properties"]["ngram"]["default"] == DecontamConfig().ngram
    # the StageVerdict model is the output schema
    out = v.output_schema
    assert out is not None and {"stage", "status", "gates"} <= set(out["properties"])
    assert set(out["required"]) >= {"stage", "status", "gates"}
    assert "gate" in tools["check_decontamination"].output_schema["properties"]
    # docstrings are dedented
    assert "\n        " not in v.description


async def test_validate_example_reports_planted_problems() -> None:
    async with Client(build_server()) as c:
        v = await call(c, "validate_preference_data",
                       {"path": str(PAIRS), "eval_sets": [str(EVAL)]})
    gates = {g["name"]: g for g in v["gates"]}
    assert v["status"] == "pass"
    assert gates["min_pairs"]["value"] == 1073 and gates["min_pairs"]["threshold"] == 1000
    f = v["findings"]
    # make_sample.py plants 3 duplicates, 2 identical, 1 empty, 2 contaminated
    assert f["duplicates"][:3] == [11, 21, 31]
    assert f["identical"] == [41, 51] and f["empty"] == [61] and f["contaminated"] == [71, 81]
    assert gates["decontamination"]["value"] == pytest.approx(1 - 2 / 1200)


async def test_failed_gate_is_a_result_and_overrides_apply(tmp_path: Path) -> None:
    rows = [row(1), row(2), row(1, prompt="  QUESTION number 1 about   topic 7?"), row(3)]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    async with Client(build_server()) as c:
        v = await call(c, "validate_preference_data", {"path": str(f)})
        assert v["status"] == "fail"  # 3 usable pairs < 1000: a normal structured result
        assert v["findings"]["duplicates"] == [3]
        g = {x["name"]: x for x in v["gates"]}
        assert g["min_pairs"]["value"] == 3 and g["min_pairs"]["status"] == "fail"
        assert g["preference_gap"]["status"] == "unmeasured"
        v2 = await call(c, "validate_preference_data",
                        {"path": str(f), "thresholds": {"min_pairs": 3}, "preset": "relaxed"})
        g2 = {x["name"]: x for x in v2["gates"]}
        assert g2["min_pairs"]["status"] == "pass" and g2["min_pairs"]["overridden"] is True
        assert g2["min_pairs"]["preset_threshold"] == PRESETS["relaxed"]["min_pairs"]


async def test_input_errors_are_tool_errors(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [row(1), row(2, chosen=5)])
    async with Client(build_server()) as c:
        msg = await call_error(c, "validate_preference_data", {"path": str(bad)})
        assert f"{bad}:2" in msg and "chosen" in msg
        missing = tmp_path / "nope.jsonl"
        msg = await call_error(c, "validate_preference_data", {"path": str(missing)})
        assert str(missing) in msg and "not found" in msg
        msg = await call_error(c, "validate_preference_data",
                               {"path": str(PAIRS), "thresholds": {"no_such_gate": 1}})
        assert "no_such_gate" in msg
        msg = await call_error(c, "check_decontamination",
                               {"path": str(PAIRS), "eval_sets": [str(tmp_path / "e.jsonl")]})
        assert "e.jsonl" in msg and "not found" in msg
        # skip_bad_rows lists the malformed row instead
        v = await call(c, "validate_preference_data", {"path": str(bad), "skip_bad_rows": True})
        assert [m["line"] for m in v["findings"]["malformed"]] == [2]


async def test_check_decontamination_hits() -> None:
    async with Client(build_server()) as c:
        d = await call(c, "check_decontamination", {"path": str(PAIRS), "eval_sets": [str(EVAL)]})
    assert d["contaminated_lines"] == [71, 81] and d["pairs_checked"] == 1200
    assert [(h["line"], h["eval_line"]) for h in d["hits"]] == [(71, 2), (81, 3)]
    assert d["hits"][0]["coverage"] == 1.0
    assert d["hits"][1]["coverage"] >= DecontamConfig().min_coverage
    assert d["gate"]["name"] == "decontamination" and d["gate"]["status"] == "pass"
    assert list(d["by_eval_set"].values()) == [2]


async def test_clean_preference_data_writes_usable_rows(tmp_path: Path) -> None:
    out = tmp_path / "clean.jsonl"
    async with Client(build_server()) as c:
        v = await call(c, "clean_preference_data",
                       {"path": str(PAIRS), "output": str(out), "eval_sets": [str(EVAL)]})
        assert await call_error(c, "clean_preference_data",
                                {"path": str(PAIRS), "output": str(PAIRS)})
    lines = out.read_text().splitlines()
    assert len(lines) == v["findings"]["counts"]["usable"] == 1073
    assert v["artifacts"]["clean"] == str(out)


async def test_get_thresholds_reads_gates_module() -> None:
    async with Client(build_server()) as c:
        t = await call(c, "get_thresholds", {"preset": "strict"})
        msg = await call_error(c, "get_thresholds", {"preset": "lax"})
    table = {g["name"]: g for g in t["gates"]}
    assert set(table) == set(PRESETS["strict"])
    for name, value in PRESETS["strict"].items():
        assert table[name]["threshold"] == value
    assert table["kl_divergence"]["op"] == "<=" and table["kl_divergence"]["stage"] == 5
    assert "preset" in msg


async def test_progress_notifications_during_validation() -> None:
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    async with Client(build_server()) as c:
        res = await c.call_tool("validate_preference_data", {"path": str(PAIRS)},
                                progress_callback=on_progress)
    assert not res.is_error
    assert seen and seen[-1][0] == seen[-1][1] == PAIRS.stat().st_size


# --------------------------------------------------------------------------- skills
@pytest.fixture
def tiny_skill(tmp_path: Path) -> Path:
    root = tmp_path / "tiny-skill"
    (root / "docs").mkdir(parents=True)
    (root / "SKILL.md").write_bytes(
        b"---\nname: tiny-skill\ndescription: A test skill.\nmetadata:\n  version: \"1\"\n---\n"
        b"# Tiny\r\nCRLF line kept as bytes.\n")
    (root / "docs" / "a.md").write_text("# A\nsee ../SKILL.md\n", encoding="utf-8")
    return root


async def test_skills_list_get_and_read(tiny_skill: Path) -> None:
    skill = load_skill(tiny_skill, [Path("SKILL.md"), Path("docs/a.md")])
    async with Client(build_server(skills=[skill])) as c:
        assert EXTENSION_ID in (c.server_capabilities.extensions or {})
        listed = await c.session.send_request(ListSkillsRequest(), ListSkillsResult)
        got = await c.session.send_request(
            GetSkillRequest(params=GetSkillParams(uri="skill://tiny-skill/SKILL.md")),
            GetSkillResult)
        with pytest.raises(MCPError) as err:
            await c.session.send_request(
                GetSkillRequest(params=GetSkillParams(uri="skill://other/SKILL.md")), GetSkillResult)
        reads = {r.uri: (await c.read_resource(r.uri)).contents[0]
                 for r in got.skill.resources}
        listed_uris = {str(r.uri) for r in (await c.list_resources()).resources}
    assert err.value.code == INVALID_PARAMS and "skill://other/SKILL.md" in err.value.message
    assert len(listed.skills) == 1 and listed.skills[0] == got.skill
    entry = got.skill
    assert entry.uri == "skill://tiny-skill/SKILL.md"
    assert entry.frontmatter == {"name": "tiny-skill", "description": "A test skill.",
                                 "metadata": {"version": "1"}}
    assert [r.uri for r in entry.resources] == ["skill://tiny-skill/SKILL.md",
                                                "skill://tiny-skill/docs/a.md"]
    assert listed.ttl_ms > 0 and listed.cache_scope == "public"
    for r in entry.resources:
        raw = (tiny_skill / r.uri.removeprefix("skill://tiny-skill/")).read_bytes()
        assert r.digest == "sha256:" + hashlib.sha256(raw).hexdigest() and r.size == len(raw)
        text = reads[r.uri].text  # type: ignore[union-attr]
        assert text.encode("utf-8") == raw  # served bytes match the digest (CRLF kept)
    assert reads["skill://tiny-skill/SKILL.md"].mime_type == "text/markdown"
    assert set(reads) <= listed_uris


async def test_real_skill_is_served() -> None:
    from realign.skill import skill_files, skill_root

    try:
        root = skill_root()
    except FileNotFoundError:
        pytest.skip("SKILL.md not present in this checkout")
    async with Client(build_server()) as c:
        listed = await c.session.send_request(ListSkillsRequest(), ListSkillsResult)
        text = (await c.read_resource("skill://realign-dpo-workflow/SKILL.md")).contents[0].text
    (entry,) = listed.skills
    assert entry.frontmatter["name"] == "realign-dpo-workflow"
    assert len(entry.resources) == len(skill_files(root))
    assert text.encode() == (root / "SKILL.md").read_bytes()


# --------------------------------------------------------------------------- prompts
async def test_pipeline_prompt_names_model_dataset_and_tools() -> None:
    async with Client(build_server()) as c:
        prompts = {p.name: p for p in (await c.list_prompts()).prompts}
        assert {a.name for a in prompts["dpo_pipeline"].arguments or []} >= {"model", "dataset"}
        r = await c.get_prompt("dpo_pipeline", {"model": "my/model", "dataset": "d.jsonl",
                                                "eval_sets": "e1.jsonl,e2.jsonl"})
        tools = {t.name for t in (await c.list_tools()).tools}
    text = r.messages[0].content.text  # type: ignore[union-attr]
    assert "my/model" in text and "d.jsonl" in text and "e2.jsonl" in text
    for name in ("validate_preference_data", "check_decontamination", "start_pipeline",
                 "run_status", "get_thresholds", "rollback", "generate_report"):
        assert name in text and name in tools
    # every tool the prompt suggests calling is registered
    import re

    called = set(re.findall(r"\b([a-z_]+)\(", text))
    assert called <= tools | {"skill"}, called - tools


# --------------------------------------------------------------------------- paths
def test_path_policy(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f.jsonl").write_text("{}\n")
    outside = tmp_path / "outside.jsonl"
    outside.write_text("{}\n")
    (root / "link.jsonl").symlink_to(outside)
    (root / "inner-link.jsonl").symlink_to(root / "sub" / "f.jsonl")
    pol = PathPolicy.confined([root])
    assert pol.resolve("sub/f.jsonl") == (root / "sub" / "f.jsonl").resolve()
    assert pol.resolve(str(root / "sub" / "f.jsonl")) == (root / "sub" / "f.jsonl").resolve()
    assert pol.resolve("inner-link.jsonl") == (root / "sub" / "f.jsonl").resolve()
    assert pol.resolve("new/out.jsonl") == (root / "new" / "out.jsonl").resolve()  # to write
    for bad, why in [("sub/../sub/f.jsonl", "'..'"), ("../outside.jsonl", "'..'"),
                     (str(outside), "outside the allowed roots"), ("/etc/passwd", "outside"),
                     ("link.jsonl", "symlink"), ("", "empty")]:
        with pytest.raises(PathNotAllowed, match=why):
            pol.resolve(bad)
    # unconfined (stdio default): taken as given
    assert PathPolicy(base=tmp_path).resolve("../x") == tmp_path / ".." / "x"


async def test_tools_respect_confinement(tmp_path: Path) -> None:
    inside = write_jsonl(tmp_path / "p.jsonl", [row(1), row(2)])
    server = build_server(policy=PathPolicy.confined([tmp_path]))
    async with Client(server) as c:
        v = await call(c, "validate_preference_data", {"path": "p.jsonl"})
        assert v["artifacts"]["input"] == str(inside.resolve())
        msg = await call_error(c, "validate_preference_data", {"path": str(PAIRS)})
        assert "outside the allowed roots" in msg
        msg = await call_error(c, "check_decontamination",
                               {"path": "p.jsonl", "eval_sets": ["../x.jsonl"]})
        assert "'..'" in msg
        msg = await call_error(c, "clean_preference_data",
                               {"path": "p.jsonl", "output": "/tmp/realign-escape.jsonl"})
        assert "outside" in msg
    assert not Path("/tmp/realign-escape.jsonl").exists()
