"""The ``realign.cli`` package: every command module is registered, its imports have no
cycle, ``realign --help`` loads no heavy dependency, and ``realign run`` takes
``KEY=VALUE`` config overrides checked by the config schema (exit 2 naming the field)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

import realign.cli
from realign.cli import app

CLI_DIR = Path(realign.cli.__file__).parent
#: Not command modules: the package, ``python -m realign.cli``, the entry file, helpers.
NOT_COMMANDS = {"__init__", "__main__", "entry", "_common"}

#: Every command of today's CLI (sub-app commands as "group command").
EXPECTED = {
    "init",
    "validate", "thresholds", "verify",
    "run", "resume", "stage", "status", "runs",
    "eval", "ifd", "calibrate",
    "rollback", "report",
    "kl",
    "skill", "skill install",
}


def _names(group: object, prefix: str = "") -> set[str]:
    names: set[str] = set()
    for name, cmd in getattr(group, "commands", {}).items():
        full = f"{prefix}{name}"
        names.add(full)
        names |= _names(cmd, f"{full} ")
    return names


def _command_modules() -> list[str]:
    return sorted(p.stem for p in CLI_DIR.glob("*.py") if p.stem not in NOT_COMMANDS)


def test_every_command_module_is_registered() -> None:
    assert set(_command_modules()) == {"init", "validate", "pipeline", "eval", "ifd",
                                       "calibrate", "report", "tools", "skill", "verify"}
    union: set[str] = set()
    for name in _command_modules():
        module = importlib.import_module(f"realign.cli.{name}")
        fresh = typer.Typer()
        module.register(fresh)
        # a lone command collapses a Typer app into that command: add a dummy second one
        fresh.command("_probe")(lambda: None)
        got = _names(typer.main.get_command(fresh)) - {"_probe"}
        assert got, f"realign.cli.{name} registers no command"
        assert not got & union, f"realign.cli.{name} registers {got & union} twice"
        union |= got
    assert union == EXPECTED
    assert _names(typer.main.get_command(app)) == EXPECTED


def test_help_lists_every_command() -> None:
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for name in EXPECTED:
        assert name.split()[0] in r.output
    r = CliRunner().invoke(app, ["skill", "--help"])
    assert r.exit_code == 0 and "install" in r.output


def _local_imports(path: Path) -> set[str]:
    """realign.cli modules that ``path`` imports, at any depth (inside functions too)."""
    pkg = "realign.cli"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = pkg + (f".{node.module}" if node.module else "")
            elif node.level == 0 and node.module and node.module.startswith(pkg):
                base = node.module
            else:
                continue
            if node.module:
                found.add(base)
            else:
                found |= {f"{pkg}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(pkg)}
    return found


def test_no_import_cycles() -> None:
    graph = {f"realign.cli.{p.stem}" if p.stem != "__init__" else "realign.cli":
             _local_imports(p) for p in CLI_DIR.glob("*.py")}
    entry = {"realign.cli", "realign.cli.entry", "realign.cli.__main__"}
    for name in _command_modules() + ["_common"]:
        bad = graph[f"realign.cli.{name}"] & entry
        assert not bad, f"realign.cli.{name} imports the entry file ({bad})"
    assert graph["realign.cli._common"] == set()
    assert graph["realign.cli"] == {"realign.cli.entry"}

    def visit(node: str, stack: list[str]) -> None:
        assert node not in stack, "import cycle: " + " -> ".join([*stack, node])
        for nxt in graph.get(node, set()):
            visit(nxt, [*stack, node])

    for node in graph:
        visit(node, [])


def test_help_imports_no_heavy_dependency() -> None:
    code = ("import sys; from realign.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = ('torch', 'transformers', 'trl', 'peft', 'accelerate', 'lm_eval',"
            " 'realign.backends')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy"
            " or m.startswith('realign.backends')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_run_override_bad_value_exits_2_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: x.jsonl\n", encoding="utf-8")
    r = CliRunner().invoke(app, ["run", "--config", str(cfg), "dpo.beta=abc"])
    assert r.exit_code == 2, r.output
    msg = r.stderr.strip()
    assert msg.startswith("error: ") and "dpo.beta" in msg, msg
    assert "Traceback" not in r.output
