"""`realign skill install` and the Agent Skills spec (skills-ref reference validator)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from realign.cli import app
from realign.skill import SKILL_NAME, install_skill, skill_files

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _expected() -> set[str]:
    """Computed from the repository, independently of realign.skill."""
    top = {f for f in ("SKILL.md", "workflow.md", "templates.md") if (ROOT / f).is_file()}
    return top | {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_install_copies_exactly_the_skill_files(tmp_path):
    target = tmp_path / "skills" / SKILL_NAME
    result = runner.invoke(app, ["skill", "install", "--target", str(target)])
    assert result.exit_code == 0, result.output
    tree = _tree(target)
    assert set(tree) == _expected()
    assert {"SKILL.md", "workflow.md", "templates.md", "docs/quality-thresholds.md"} <= set(tree)
    for rel, digest in tree.items():  # byte-identical copies
        assert digest == hashlib.sha256((ROOT / rel).read_bytes()).hexdigest(), rel
    # no temporary folders left next to the target
    assert [p.name for p in target.parent.iterdir()] == [SKILL_NAME]


def test_install_refuses_to_overwrite_without_force(tmp_path):
    target = tmp_path / SKILL_NAME
    assert runner.invoke(app, ["skill", "install", "--target", str(target)]).exit_code == 0
    (target / "SKILL.md").write_text("edited by the user\n")
    (target / "extra.md").write_text("left over\n")
    result = runner.invoke(app, ["skill", "install", "--target", str(target)])
    assert result.exit_code == 2
    assert "--force" in result.output
    assert (target / "SKILL.md").read_text() == "edited by the user\n"  # untouched
    result = runner.invoke(app, ["skill", "install", "--target", str(target), "--force"])
    assert result.exit_code == 0, result.output
    assert set(_tree(target)) == _expected()  # replaced, stale files gone
    assert (target / "SKILL.md").read_bytes() == (ROOT / "SKILL.md").read_bytes()


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_install_onto_a_file_is_bad_input(tmp_path, force):
    target = tmp_path / "a-file"
    target.write_text("x")
    result = runner.invoke(app, ["skill", "install", "--target", str(target), *force])
    assert result.exit_code == 2, result.output
    assert "not a folder" in result.output
    assert target.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no temp folder left


def test_force_replaces_a_symlink_without_touching_its_target(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    link = tmp_path / "skills" / SKILL_NAME
    link.parent.mkdir()
    link.symlink_to(elsewhere, target_is_directory=True)
    assert runner.invoke(app, ["skill", "install", "--target", str(link)]).exit_code == 2
    result = runner.invoke(app, ["skill", "install", "--target", str(link), "--force"])
    assert result.exit_code == 0, result.output
    assert not link.is_symlink() and set(_tree(link)) == _expected()
    assert (elsewhere / "keep.txt").read_text() == "mine"
    assert [p.name for p in link.parent.iterdir()] == [SKILL_NAME]


def test_installed_skill_passes_the_reference_validator(tmp_path):
    skills_ref = pytest.importorskip("skills_ref")
    target = install_skill(tmp_path / SKILL_NAME)
    assert skills_ref.validate(target) == []
    props = skills_ref.read_properties(target)
    assert props.name == SKILL_NAME
    for hint in ("dpo", "preference optimization", "preference tuning", "realignment", "rlhf",
                 "direct preference", "model alignment", "capability regression"):
        assert hint in props.description.lower(), hint
    assert props.license == "Apache-2.0"
    assert isinstance(props.allowed_tools, str) and "Bash" in props.allowed_tools.split()
    # the validator also checks that the folder is named after the skill
    wrong = install_skill(tmp_path / "other-name")
    assert any("must match skill name" in e for e in skills_ref.validate(wrong))


def test_agentskills_cli_validates_the_installed_skill(tmp_path):
    exe = Path(sys.executable).parent / "agentskills"
    if not exe.exists():
        pytest.skip("agentskills CLI (skills-ref) not installed")
    target = install_skill(tmp_path / SKILL_NAME)
    proc = subprocess.run([str(exe), "validate", str(target)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_frontmatter_holds_only_spec_fields_with_string_metadata():
    text = (ROOT / "SKILL.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---", 2)[1])  # a plain YAML parser reads it too
    assert set(front) <= {"name", "description", "license", "compatibility", "metadata",
                          "allowed-tools"}
    assert front["name"] == SKILL_NAME
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in front["metadata"].items())
    assert isinstance(front["allowed-tools"], str)
    assert len(front["description"]) <= 1024 and len(front["compatibility"]) <= 500
    assert len(text.splitlines()) < 500


def test_skill_files_lists_the_same_set_as_the_wheel_build():
    assert {p.as_posix() for p in skill_files(ROOT)} == _expected()


def test_default_target_is_the_claude_skills_folder(tmp_path):
    exe = Path(sys.executable).parent / "realign"
    if not exe.exists():
        pytest.skip("the realign console script is not installed")
    env = dict(os.environ, HOME=str(tmp_path), USERPROFILE=str(tmp_path))
    proc = subprocess.run([str(exe), "skill", "install"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    target = tmp_path / ".claude" / "skills" / SKILL_NAME
    assert set(_tree(target)) == _expected()


def test_allowed_tools_cover_the_mcp_path_of_the_workflow():
    """`allowed-tools` (the spec's space-delimited string) pre-approves, as
    mcp__realign__<tool>, every tool workflow.md's "An agent over MCP" path calls, and
    names only tools the server registers."""
    import re

    pytest.importorskip("mcp", reason="needs the mcp extra")
    from realign_mcp.server import build_server

    text = (ROOT / "SKILL.md").read_text(encoding="utf-8")
    allowed = yaml.safe_load(text.split("---", 2)[1])["allowed-tools"].split()
    mcp_tools = {t[len("mcp__realign__"):] for t in allowed if t.startswith("mcp__realign__")}
    flow = (ROOT / "workflow.md").read_text(encoding="utf-8")
    flow = flow[flow.index("## An agent over MCP"):]
    called = set(re.findall(r"`([a-z_]+)\(", flow))
    registered = {t.name for t in build_server()._tool_manager.list_tools()}  # noqa: SLF001
    assert called, "workflow.md names no tool calls in its MCP path"
    assert called <= registered, called - registered
    assert called <= mcp_tools, f"allowed-tools lacks {sorted(called - mcp_tools)}"
    assert mcp_tools <= registered, mcp_tools - registered
    assert {"Read", "Bash"} <= set(allowed)
