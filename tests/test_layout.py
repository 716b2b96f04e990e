"""The package's shape: no import cycles, one home for the run-directory layout, stage
modules reached only through the pipeline, no citation of a document outside the repo.

Read with ``ast`` (nothing imported), so it runs with only the core package installed.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"realign": ROOT / "lib", "realign_mcp": ROOT / "mcp_server"}
#: Stage modules: only the pipeline (and the stage package itself) may import them.
STAGE_SUPPORT = {"realign.stages", "realign.stages.registry", "realign.stages.artifacts",
                 "realign.stages.context"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = [pkg, *f.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every realign module ``module`` imports, at any depth (inside functions too), and
    every ``importlib.import_module("realign....")`` with a literal or f-string prefix."""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - node.level + 1]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names]
            # ``from . import x`` depends on the submodule x, not on the package's __init__
            names = subs if all(n in known for n in subs) else [mod, *subs]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) \
                == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names = [arg.value]
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                prefix = str(arg.values[0].value)
                names = [m for m in known if m.startswith(prefix)] if prefix.startswith("realign") else []
        found.update(n for n in names if n in known and n != module)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_only_the_pipeline_imports_stage_modules():
    graph = import_graph()
    stage_modules = {m for m in graph if m.startswith("realign.stages.")} - STAGE_SUPPORT
    offenders = {m: sorted(graph[m] & stage_modules) for m in graph
                 if m != "realign.pipeline" and m not in stage_modules and graph[m] & stage_modules}
    assert offenders == {}


def test_stage_modules_do_not_import_each_other_or_the_pipeline():
    graph = import_graph()
    stage_modules = {m for m in graph if m.startswith("realign.stages.")} - STAGE_SUPPORT
    for m in stage_modules:
        assert not graph[m] & (stage_modules | {"realign.pipeline"}), m


def test_registry_names_every_stage_module():
    from realign.stages.registry import REGISTRY, STAGES

    assert [s.number for s in REGISTRY.values()] == [1, 2, 3, 4, 5, 6, 7]
    on_disk = {p.stem for p in (ROOT / "lib" / "stages").glob("*.py")} - {
        "__init__", "registry", "artifacts", "context"}
    assert on_disk == {s.module for s in REGISTRY.values() if s.built} == set(STAGES)
    assert list(STAGES) == [s.name for s in REGISTRY.values()]  # every stage is built


#: File and folder names of a run directory (only realign.rundir may build paths with them).
RUN_NAMES = {"stages", "run.json", "status.json", "run.lock", "deployed_model.json",
             "rollback.json", "report.html", "report.md", "metrics.jsonl", "verdict.json"}


def spelled_paths(source: str) -> list[int]:
    """Lines where a run-directory name is an operand of ``/`` or an argument of a call
    (``run_dir / "stages"``, ``joinpath(..., "run.json")``)."""
    tree = ast.parse(source)
    lines = []
    for node in ast.walk(tree):
        operands: list[ast.expr] = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands = [node.left, node.right]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in {"joinpath", "Path", "open", "with_name", "run_file"}:
            operands = list(node.args)
        lines += [o.lineno for o in operands
                  if isinstance(o, ast.Constant) and o.value in RUN_NAMES]
    return lines


def test_layout_check_catches_a_spelled_path():
    assert spelled_paths('p = run_dir / "stages" / "1-sft" / "verdict.json"') == [1, 1]
    assert spelled_paths('x = root.joinpath(run_id, "run.json")') == [1]
    assert spelled_paths('d = {"stages": 1}') == []
    assert spelled_paths('@field_validator("stages")\ndef f(): pass') == []


def test_run_directory_layout_is_spelled_once():
    """The run's files are named (in paths) only in realign.rundir; stage folders only by
    the registry's ``StageSpec.folder``."""
    home = ROOT / "lib" / "rundir"
    offenders = []
    for f in sorted((ROOT / "lib").rglob("*.py")) + sorted((ROOT / "mcp_server").rglob("*.py")):
        if home in f.parents:
            continue
        offenders += [f"{f.relative_to(ROOT)}:{n}" for n in spelled_paths(f.read_text(encoding="utf-8"))]
    assert offenders == []


def test_no_file_cites_a_document_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for rel in files:
        p = ROOT / rel
        if p.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".j2", ".txt", ""} or not p.is_file():
            continue
        if rel == "tests/test_layout.py":
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        for needle in ("DESIGN.md", "METRICS.md", "../shared"):
            if needle in text:
                bad.append(f"{rel}: {needle}")
    assert bad == []


@pytest.mark.parametrize("name", ["validate_dpo_pairs", "calculate_ifd_score",
                                  "assess_rlvr_verifiability", "per_token_kl", "win_rate"])
def test_seed_names_stay_importable_from_training_metrics(name):
    import realign.training_metrics as tm

    assert callable(getattr(tm, name))


def test_no_library_module_imports_the_training_metrics_facade():
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if "realign.training_metrics" in deps)
    assert users == []
