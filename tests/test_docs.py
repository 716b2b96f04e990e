"""The skill docs say only what the code does.

Checks every skill file (SKILL.md, workflow.md, templates.md, docs/*.md — the set
``realign skill install`` copies):

(a) thresholds: in a markdown table with a ``gate`` column, every cell under a preset
    column (``relaxed`` / ``standard`` / ``strict``) must equal ``realign.gates.PRESETS``
    for the gate named in that row, operator included; and anywhere in the text,
    `` `gate_name` ≥ 0.15 `` is checked against the standard preset, or against the
    preset named right after it: `` `min_pairs` ≥ 500 (relaxed) ``. A table with preset
    columns may only name known gates.
(b) commands: every ``realign <command> [<subcommand>] [--option]`` written in a code span
    or a shell code block exists in the Typer app (sub-typers included), options too.
(c) functions: every `` `name()` `` / `` `name(args)` `` code span, every `` `realign.x.y` ``
    path and every ``from realign... import`` in a python code block names something
    defined in ``lib/`` (``realign``) or ``mcp_server/`` (``realign_mcp``), found with ast.
    Third-party names are allowed when they start with a known third-party prefix
    (:data:`THIRD_PARTY`).
(d) links: every relative markdown link resolves to a skill file (so it also works in the
    installed copy), and its ``#anchor`` to a heading of that file; a code span naming
    an ``.md`` file names a skill file.
(e) parameter tables (``parameter`` and ``default`` columns): `` `Class.field` `` rows
    equal the field's default; `` `CONSTANT` `` rows equal the module constant.

A line containing the word "planned" may name commands and functions that do not exist
yet (the feature is planned); when every name on such a line exists, the test warns
that the line is stale, without failing, so landing a feature does not break this test.
"""

from __future__ import annotations

import ast
import importlib
import math
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest
import typer

from realign.gates import GATE_SPECS, PRESETS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"realign": ROOT / "lib", "realign_mcp": ROOT / "mcp_server"}

#: Names that may appear in `name()` spans without being defined in realign.
THIRD_PARTY = {
    "trl", "transformers", "torch", "datasets", "lm_eval", "accelerate", "peft", "mcp",
    "mlx", "mx", "numpy", "np", "pyarrow", "pa", "pc", "typer", "pydantic", "json",
    "DPOTrainer", "DPOConfig", "RewardTrainer", "RewardConfig", "SFTTrainer", "SFTConfig",
    "Trainer", "TrainerCallback", "HFLM", "AutoModelForCausalLM", "AutoTokenizer",
    "Dataset", "DatasetDict", "ctx", "model", "tokenizer", "load_dataset", "save_to_disk",
    "load_from_disk", "extract_prompt", "simple_evaluate", "report_progress",
}
OPS = {"≥": ">=", "≤": "<=", ">=": ">=", "<=": "<=", ">": ">", "<": "<"}
NUM = r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?%?"
OP_RE = r"(≥|≤|>=|<=|>|<)"
INLINE_GATE = re.compile(
    rf"`([a-z_]+)`\s*{OP_RE}\s*({NUM})(?:\s*\((relaxed|standard|strict)\b[^)]*\))?")
CELL_THRESHOLD = re.compile(rf"^\s*{OP_RE}\s*({NUM})\s*$")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
CMD = re.compile(r"(?:^|[\s(;|&$])realign[ \t]+([a-z][a-z0-9-]*)(?:[ \t]+([a-z][a-z0-9-]*))?")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
CALL = re.compile(r"^([A-Za-z_][\w.]*)\(.*\)$")
DOTTED = re.compile(r"^(realign(?:_mcp)?(?:\.[A-Za-z_]\w*)+)$")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
#: line number -> (name, exists) for the names on lines that say "planned"
Seen = dict[tuple[int, int], list[tuple[str, bool]]]


def _num(text: str) -> float:
    text = text.replace(",", "")
    if text.endswith("%"):
        return float(text[:-1]) / 100
    return float(text)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# ---------------------------------------------------------------------------------
# what the code defines
# ---------------------------------------------------------------------------------
@dataclass
class Symbols:
    """Names defined in the realign packages, read with ast (nothing is imported)."""

    modules: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level names
    classes: dict[str, set[str]] = field(default_factory=dict)  # class -> member names
    defined: set[str] = field(default_factory=set)  # every def/class name anywhere
    class_module: dict[str, str] = field(default_factory=dict)

    def has_module(self, dotted: str) -> bool:
        return dotted in self.modules


@lru_cache(maxsize=1)
def code_symbols() -> Symbols:
    sym = Symbols()
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            module = ".".join([pkg, *parts])
            tree = ast.parse(path.read_text(encoding="utf-8"))
            top: set[str] = set()
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    top.add(node.name)
                elif isinstance(node, ast.Assign):
                    top.update(t.id for t in node.targets if isinstance(t, ast.Name))
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    top.add(node.target.id)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    top.update((a.asname or a.name).split(".")[0] for a in node.names)
            sym.modules.setdefault(module, set()).update(top)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    sym.defined.add(node.name)
                elif isinstance(node, ast.ClassDef):
                    sym.defined.add(node.name)
                    sym.class_module.setdefault(node.name, module)
                    members = sym.classes.setdefault(node.name, set())
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef,
                                             ast.ClassDef)):
                            members.add(item.name)
                        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                            members.add(item.target.id)
                        elif isinstance(item, ast.Assign):
                            members.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return sym


def resolve(name: str, sym: Symbols) -> bool:
    """True when the dotted ``name`` is defined in realign / realign_mcp."""
    parts = name.split(".")
    if parts[0] in PACKAGES:
        for cut in range(len(parts), 0, -1):
            module = ".".join(parts[:cut])
            if sym.has_module(module):
                rest = parts[cut:]
                if not rest:
                    return True
                if rest[0] not in sym.modules[module]:
                    return False
                if len(rest) == 1:
                    return True
                return len(rest) == 2 and rest[1] in sym.classes.get(rest[0], set())
        return False
    if len(parts) == 1:
        return parts[0] in sym.defined
    head = parts[0]
    if head in sym.classes:
        return len(parts) == 2 and parts[1] in sym.classes[head]
    module = f"realign.{'.'.join(parts[:-1])}"
    if sym.has_module(module):
        return parts[-1] in sym.modules[module]
    return False


def is_third_party(name: str) -> bool:
    return name.split(".")[0] in THIRD_PARTY


@lru_cache(maxsize=1)
def cli_tree():  # noqa: ANN201 - typer vendors its own click; duck-typed groups
    """The click command tree of ``realign.cli.app`` (all registered modules loaded)."""
    from realign.cli import app

    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    return group


def _command_for(tokens: tuple[str, str | None]) -> tuple[object | None, str]:
    root = cli_tree()
    first, second = tokens
    cmd = root.commands.get(first)
    if cmd is None:
        return None, f"`realign {first}` is not a command (have: {', '.join(sorted(root.commands))})"
    if hasattr(cmd, "commands"):
        if second is None:
            return cmd, ""
        sub = cmd.commands.get(second)
        if sub is None:
            return None, (f"`realign {first} {second}` is not a command "
                          f"(have: {', '.join(sorted(cmd.commands))})")
        return sub, ""
    return cmd, ""


def _options(cmd) -> set[str]:  # noqa: ANN001
    opts = {"--help"}
    for p in cmd.params:
        opts.update(p.opts)
        opts.update(p.secondary_opts)
    return opts


# ---------------------------------------------------------------------------------
# the checker
# ---------------------------------------------------------------------------------
@dataclass
class Line:
    no: int
    text: str
    fence: str | None  # language of the enclosing code block, None outside blocks


def lines_of(text: str) -> list[Line]:
    out: list[Line] = []
    fence: str | None = None
    for no, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence = stripped[3:].strip().lower()
            else:
                fence = None
            out.append(Line(no, raw, "fence-marker"))
            continue
        out.append(Line(no, raw, fence))
    return out


def _planned(text: str) -> bool:
    return "planned" in text.lower()


SEGMENT_BREAK = re.compile(r"\||;\s|\.\s|\s—\s")


def _segment(ln: Line, pos: int) -> tuple[int, str]:
    """The clause of a prose line around ``pos``: the line split at ``|``, ``; ``, ``. ``
    and `` — `` outside code spans (the whole line inside a code block). "planned"
    applies to the names in its own clause only."""
    if ln.fence is not None:
        return 0, ln.text
    text = ln.text
    spans = [(m.start(), m.end()) for m in CODE_SPAN.finditer(text)]
    cuts = [m.start() for m in SEGMENT_BREAK.finditer(text)
            if not any(a <= m.start() < b for a, b in spans)]
    bounds = [0, *cuts, len(text) + 1]
    for i in range(len(bounds) - 1):
        if bounds[i] <= pos < bounds[i + 1]:
            return i, text[bounds[i]:bounds[i + 1]]
    return 0, text


def _cells(row: str) -> list[str]:
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|"):
        row = row[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)]


def _header_key(cell: str) -> str:
    return re.sub(r"[*`_]", "", cell).strip().lower()


def tables_of(lines: list[Line]) -> list[list[Line]]:
    tables, cur = [], []
    for ln in lines:
        if ln.fence is None and ln.text.lstrip().startswith("|"):
            cur.append(ln)
        else:
            if len(cur) >= 2:
                tables.append(cur)
            cur = []
    if len(cur) >= 2:
        tables.append(cur)
    return tables


def check_thresholds(name: str, lines: list[Line]) -> list[str]:
    errors: list[str] = []
    for table in tables_of(lines):
        header = [_header_key(c) for c in _cells(table[0].text)]
        gate_col = next((i for i, h in enumerate(header) if h.startswith("gate")), None)
        presets = {i: h for i, h in enumerate(header) if h in PRESETS}
        if gate_col is None or not presets:
            continue
        for row in table[2:]:
            cells = _cells(row.text)
            if gate_col >= len(cells):
                continue
            names = CODE_SPAN.findall(cells[gate_col])
            if not names:
                continue
            gate = names[0]
            if gate not in GATE_SPECS:
                errors.append(f"{name}:{row.no}: `{gate}` is in a threshold table but is "
                              f"not a gate (gates: {', '.join(GATE_SPECS)})")
                continue
            for i, preset in presets.items():
                cell = cells[i] if i < len(cells) else ""
                m = CELL_THRESHOLD.match(cell.replace("`", ""))
                if not m:
                    errors.append(f"{name}:{row.no}: `{gate}` {preset}: cannot read "
                                  f"'{cell}' (write e.g. '≥ 0.15')")
                    continue
                errors += _compare(name, row.no, gate, preset, OPS[m.group(1)], _num(m.group(2)))
    for ln in lines:
        if ln.fence == "fence-marker":
            continue
        for m in INLINE_GATE.finditer(ln.text):
            gate = m.group(1)
            if gate not in GATE_SPECS:
                continue
            errors += _compare(name, ln.no, gate, m.group(4) or "standard", OPS[m.group(2)],
                               _num(m.group(3)))
    return errors


def _compare(name: str, no: int, gate: str, preset: str, op: str, value: float) -> list[str]:
    want_op, want = GATE_SPECS[gate].op, PRESETS[preset][gate]
    if op != want_op or not _same(value, want):
        return [f"{name}:{no}: `{gate}` {op} {value:g} ({preset}) but realign.gates says "
                f"{want_op} {want:g}"]
    return []


def _spans(ln: Line) -> list[tuple[int, str]]:
    """Code on a line with its position: its code spans, or the whole line in a block."""
    if ln.fence == "fence-marker":
        return []
    if ln.fence is not None:
        return [(0, ln.text)]
    return [(m.start(), m.group(1)) for m in CODE_SPAN.finditer(ln.text)]


def check_commands(name: str, lines: list[Line], seen: Seen) -> list[str]:
    errors: list[str] = []
    for ln in lines:
        if ln.fence is not None and ln.fence not in SHELL_LANGS:
            continue
        for pos, span in _spans(ln):
            seg_no, clause = _segment(ln, pos)
            for seg in re.split(r"&&|\|\||;|\|(?!\s*$)", span):
                m = CMD.search(seg)
                if not m:
                    continue
                cmd, problem = _command_for((m.group(1), m.group(2)))
                opts = OPTION.findall(seg[m.end():])
                missing = [] if cmd is None else [o for o in opts if o not in _options(cmd)]
                if _planned(clause):
                    ref = " ".join(["realign", m.group(1), *opts])
                    seen.setdefault((ln.no, seg_no), []).append(
                        (ref, cmd is not None and not missing))
                    continue
                if cmd is None:
                    errors.append(f"{name}:{ln.no}: {problem}")
                    continue
                for opt in missing:
                    errors.append(f"{name}:{ln.no}: `realign {m.group(1)}` has no option "
                                  f"{opt} (has: {', '.join(sorted(_options(cmd)))})")
    return errors


def check_names(name: str, lines: list[Line], seen: Seen) -> list[str]:
    errors: list[str] = []
    sym = code_symbols()

    def check(ref: str, ln: Line, pos: int = 0) -> None:
        if is_third_party(ref):
            return
        ok = resolve(ref, sym)
        seg_no, clause = _segment(ln, pos)
        if _planned(clause):
            seen.setdefault((ln.no, seg_no), []).append((ref, ok))
            return
        if not ok:
            errors.append(f"{name}:{ln.no}: `{ref}` is not defined in realign or realign_mcp")

    for ln in lines:
        if ln.fence is not None:
            continue
        for sm in CODE_SPAN.finditer(ln.text):
            span = sm.group(1).strip()
            m = CALL.match(span) or DOTTED.match(span)
            if m:
                check(m.group(1), ln, sm.start())
    # python code blocks: imports from realign
    block: list[Line] = []
    lang = None
    for ln in lines + [Line(0, "", "fence-marker")]:
        if ln.fence == "fence-marker":
            if block and lang == "python":
                errors += _check_python_block(name, block, check)
            block, lang = [], None
            continue
        if ln.fence is not None:
            lang = ln.fence
            block.append(ln)
    return errors


def _check_python_block(name: str, block: list[Line], check) -> list[str]:  # noqa: ANN001
    source = "\n".join(ln.text for ln in block)
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"{name}:{block[0].no}: python code block does not parse: {e.msg}"]
    for node in ast.walk(tree):
        ln = block[min(max(getattr(node, "lineno", 1) - 1, 0), len(block) - 1)]
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            check(node.module, ln)
            for alias in node.names:
                check(f"{node.module}.{alias.name}", ln)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    check(alias.name, ln)
    return []


def _slug(heading: str) -> str:
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for ln in lines_of(text):
        if ln.fence is None and re.match(r"^#{1,6} ", ln.text):
            slug = _slug(ln.text.lstrip("#"))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def check_links(name: str, lines: list[Line], files: dict[str, str]) -> list[str]:
    errors: list[str] = []
    here = Path(name).parent
    for ln in lines:
        if ln.fence is not None:
            continue
        text_wo_code = CODE_SPAN.sub("", ln.text)
        for _, target in LINK.findall(text_wo_code):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            rel = (here / path).as_posix() if path else name
            rel = _normpath(rel)
            if rel not in files:
                errors.append(f"{name}:{ln.no}: link target '{target}' is not a skill file "
                              "(links must stay inside the installed skill)")
                continue
            if anchor and anchor not in anchors_of(files[rel]):
                errors.append(f"{name}:{ln.no}: no heading '#{anchor}' in {rel}")
        for span in CODE_SPAN.findall(ln.text):
            if re.fullmatch(r"docs/[\w.-]+\.md|(?:\.\./)?(?:SKILL|workflow|templates)\.md",
                            span.strip()):
                cands = {_normpath(span.strip()), _normpath((here / span.strip()).as_posix())}
                if not cands & set(files):
                    errors.append(f"{name}:{ln.no}: `{span}` is not a skill file")
    return errors


def _normpath(p: str) -> str:
    parts: list[str] = []
    for part in p.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            else:
                return "../" + p
        else:
            parts.append(part)
    return "/".join(parts)


def check_parameters(name: str, lines: list[Line]) -> list[str]:
    errors: list[str] = []
    sym = code_symbols()
    for table in tables_of(lines):
        header = [_header_key(c) for c in _cells(table[0].text)]
        if "parameter" not in header or "default" not in header:
            continue
        pi, di = header.index("parameter"), header.index("default")
        for row in table[2:]:
            cells = _cells(row.text)
            names = CODE_SPAN.findall(cells[pi]) if pi < len(cells) else []
            if not names or di >= len(cells):
                continue
            ref = names[0]
            cell = cells[di].replace("`", "").strip()
            try:
                actual = _lookup_default(ref, sym)
            except LookupError as e:
                errors.append(f"{name}:{row.no}: {e}")
                continue
            try:
                stated = ast.literal_eval(cell)
            except (ValueError, SyntaxError):
                stated = cell
            if not _equal(stated, actual):
                errors.append(f"{name}:{row.no}: `{ref}` default is {actual!r}, the doc says {cell}")
    return errors


def _lookup_default(ref: str, sym: Symbols) -> object:
    head, _, attr = ref.partition(".")
    if attr and head in sym.class_module:
        cls = getattr(importlib.import_module(sym.class_module[head]), head)
        fields = getattr(cls, "model_fields", None)
        if fields and attr in fields:
            return fields[attr].default
        if hasattr(cls, "__dataclass_fields__") and attr in cls.__dataclass_fields__:
            return cls.__dataclass_fields__[attr].default
        if hasattr(cls, attr):
            return getattr(cls, attr)
        raise LookupError(f"`{ref}`: {head} has no field {attr}")
    for module, names in sym.modules.items():
        if ref in names and module.startswith("realign."):
            return getattr(importlib.import_module(module), ref)
    raise LookupError(f"`{ref}` is not a realign class field or module constant")


def _equal(stated: object, actual: object) -> bool:
    if isinstance(actual, (list, tuple)) and isinstance(stated, (list, tuple)):
        return len(actual) == len(stated) and all(_equal(a, b) for a, b in zip(stated, actual))
    if isinstance(actual, (int, float)) and isinstance(stated, (int, float)) \
            and not isinstance(actual, bool):
        return _same(float(stated), float(actual))
    return stated == actual


def check_doc(name: str, text: str, files: dict[str, str], stale: list[str] | None = None
              ) -> list[str]:
    """Every problem in one skill file, as 'FILE:LINE: what is wrong'."""
    stale = [] if stale is None else stale
    lines = lines_of(text)
    seen: Seen = {}
    errors = (check_thresholds(name, lines) + check_commands(name, lines, seen)
              + check_names(name, lines, seen) + check_links(name, lines, files)
              + check_parameters(name, lines))
    for (no, _), refs in sorted(seen.items()):
        if all(ok for _, ok in refs):
            stale.append(f"{name}:{no}: the line says planned but "
                         f"{', '.join(f'`{r}`' for r, _ in refs)} exist(s) now")
    return errors


def skill_docs() -> dict[str, str]:
    from realign.skill import skill_files

    return {p.as_posix(): (ROOT / p).read_text(encoding="utf-8") for p in skill_files(ROOT)}


# ---------------------------------------------------------------------------------
# tests on the real docs
# ---------------------------------------------------------------------------------
EXPECTED_DOCS = [
    "sft-preparation", "preference-data-generation", "model-initialization",
    "preference-modeling", "dpo-optimization", "iterative-training",
    "evaluation-monitoring", "quality-thresholds", "capability-assessment",
    "performance-optimization",
]


def test_all_skill_files_exist():
    files = skill_docs()
    for f in ["SKILL.md", "workflow.md", "templates.md",
              *(f"docs/{d}.md" for d in EXPECTED_DOCS)]:
        assert f in files, f"missing skill file {f}"


@pytest.mark.parametrize("name", sorted(skill_docs()))
def test_doc_matches_code(name):
    files = skill_docs()
    stale: list[str] = []
    errors = check_doc(name, files[name], files, stale)
    for s in stale:
        warnings.warn(f"stale doc (update it): {s}", stacklevel=1)
    assert not errors, "\n".join(errors)


def test_quality_thresholds_doc_lists_every_gate_in_every_preset():
    text = skill_docs()["docs/quality-thresholds.md"]
    lines = lines_of(text)
    seen: set[tuple[str, str]] = set()
    for table in tables_of(lines):
        header = [_header_key(c) for c in _cells(table[0].text)]
        if "gate" not in header:
            continue
        presets = {i: h for i, h in enumerate(header) if h in PRESETS}
        for row in table[2:]:
            names = CODE_SPAN.findall(_cells(row.text)[header.index("gate")])
            for i, p in presets.items():
                if names:
                    seen.add((names[0], p))
    missing = {(g, p) for g in GATE_SPECS for p in PRESETS} - seen
    assert not missing, f"quality-thresholds.md lacks {sorted(missing)}"


def test_quality_thresholds_doc_lists_every_remedy_as_the_code_renders_it():
    """docs/quality-thresholds.md#remedies is realign.gates.remedy_table(): one row per
    gate, the fail and unmeasured remedies with their placeholders."""
    from realign.gates import remedy_table

    text = skill_docs()["docs/quality-thresholds.md"]
    assert "## Remedies" in text
    start = text.index("## Remedies")
    section = text[start: text.find("\n## ", start + 3)]
    rows = []
    for table in tables_of(lines_of(section)):
        header = [_header_key(c) for c in _cells(table[0].text)]
        if header[:3] != ["gate", "when it fails", "when it is unmeasured"]:
            continue
        for row in table[2:]:
            cells = _cells(row.text)
            rows.append((CODE_SPAN.findall(cells[0])[0], cells[1], cells[2]))
    want = remedy_table()
    assert [r[0] for r in rows] == [w[0] for w in want], "the table must list every gate in order"
    for got, exp in zip(rows, want):
        assert got == exp, f"{exp[0]}: the doc says {got[1:]} but the code renders {exp[1:]}"


def test_skill_md_is_short_and_links_every_doc():
    text = skill_docs()["SKILL.md"]
    assert len(text.splitlines()) < 500
    for d in EXPECTED_DOCS:
        assert f"](docs/{d}.md)" in text, f"SKILL.md does not link docs/{d}.md"
    assert "](workflow.md)" in text and "](templates.md)" in text


# ---------------------------------------------------------------------------------
# the checker catches what it should (negative self-tests)
# ---------------------------------------------------------------------------------
FILES = {"SKILL.md": "# Top\n## Real heading\n", "docs/a.md": "# A\n"}


def _errors(text: str, name: str = "docs/x.md") -> list[str]:
    files = dict(FILES, **{name: text})
    return check_doc(name, text, files)


def test_checker_accepts_correct_text():
    text = """
| gate | relaxed | standard | strict |
|---|---|---|---|
| `min_pairs` | ≥ 500 | ≥ 1000 | ≥ 5,000 |
| `kl_divergence` | <= 0.2 | <= 0.1 | <= 0.05 |

Gap `preference_gap` ≥ 0.15, relaxed `min_pairs` ≥ 500 (relaxed preset).
Run `realign validate pairs.jsonl --eval e.jsonl --json` or `realign skill install --force`.
Call `validate_dpo_pairs()`, `Thresholds.evaluate(name, value)`, `realign.gates.PRESETS`,
`trl.DPOTrainer.train()`. See [A](a.md) and [top](../SKILL.md#real-heading).
`realign frobnicate` and `make_coffee()` are planned.

| parameter | default |
|---|---|
| `DecontamConfig.ngram` | 3 |
| `STANDARD_SCALES` | ((0, 1), (1, 5), (1, 10), (0, 10), (0, 100)) |

```bash
realign thresholds --preset strict --json
```

```python
from realign.training_metrics import validate_dpo_pairs
```
"""
    assert _errors(text) == []


@pytest.mark.parametrize("bad, needle", [
    ("| gate | standard |\n|---|---|\n| `min_pairs` | ≥ 999 |\n", "min_pairs"),
    ("| gate | strict |\n|---|---|\n| `kl_divergence` | ≥ 0.05 |\n", "kl_divergence"),  # op
    ("| gate | standard |\n|---|---|\n| `kl_budget` | ≤ 0.1 |\n", "not a gate"),
    ("| gate | standard |\n|---|---|\n| `min_pairs` | lots |\n", "cannot read"),
    ("The gap gate `preference_gap` ≥ 0.25 holds.\n", "preference_gap"),
    ("Relaxed: `win_rate` > 0.55 (relaxed).\n", "win_rate"),
    ("Run `realign frobnicate data.jsonl`.\n", "frobnicate"),
    ("Run `realign skill zz-no-such-subcommand`.\n", "zz-no-such-subcommand"),
    ("```bash\nrealign validate x.jsonl --no-such-flag\n```\n", "--no-such-flag"),
    ("Call `make_coffee()`.\n", "make_coffee"),
    ("Call `Thresholds.frobnicate()`.\n", "Thresholds.frobnicate"),
    ("See `realign.gates.NOT_THERE`.\n", "realign.gates.NOT_THERE"),
    ("```python\nfrom realign.validation import not_a_function\n```\n", "not_a_function"),
    ("See [B](b.md).\n", "b.md"),
    ("See [code](../lib/gates.py).\n", "not a skill file"),
    ("See [top](../SKILL.md#no-such-heading).\n", "no-such-heading"),
    ("See `docs/missing.md`.\n", "missing.md"),
    ("See `workflow.md`.\n", "workflow.md"),
    ("| parameter | default |\n|---|---|\n| `DecontamConfig.ngram` | 4 |\n", "ngram"),
    ("| parameter | default |\n|---|---|\n| `STANDARD_SCALES` | ((0, 1),) |\n", "STANDARD_SCALES"),
])
def test_checker_catches(bad, needle):
    errors = _errors(bad)
    assert errors, f"checker missed: {bad!r}"
    assert any(needle in e for e in errors), errors


def test_planned_option_is_exempt_until_it_exists():
    stale: list[str] = []
    assert check_doc("docs/x.md", "`realign validate --not-an-option-yet M` (planned)\n", FILES, stale) == []
    assert stale == []
    assert _errors("`realign validate --not-an-option-yet M`\n")


def test_planned_applies_to_its_own_clause_only():
    assert _errors("`make_coffee()` is planned; `validate_dpo_pairs()` works.\n") == []
    errs = _errors("`validate_dpo_pairs()` works; `make_coffee()` too (planned later? no).\n")
    assert errs == []  # same clause as "planned"
    errs = _errors("`make_coffee()` works. The pipeline is planned.\n")
    assert any("make_coffee" in e for e in errs)
    stale: list[str] = []
    check_doc("docs/x.md", "| `validate_dpo_pairs()` (planned) | x |\n", FILES, stale)
    assert stale
    assert _errors("| `make_coffee()` | planned |\n")  # table cells are separate clauses
    stale = []
    check_doc("docs/x.md", "`validate_dpo_pairs()` exists | the stage is planned\n", FILES, stale)
    assert stale == []


def test_planned_line_that_exists_is_reported_stale():
    stale: list[str] = []
    errs = check_doc("docs/x.md", "`realign validate` is planned.\n", FILES, stale)
    assert errs == [] and stale and "realign validate" in stale[0]


def test_config_template_is_valid_yaml_and_a_valid_run_config():
    """templates.md's YAML is the pipeline's format: valid once `realign.config` exists."""
    import yaml

    text = skill_docs()["templates.md"]
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "templates.md should hold exactly one YAML config block"
    data = yaml.safe_load(blocks[0])
    assert isinstance(data, dict) and "data" in data
    assert set(data.get("thresholds", {})) <= set(GATE_SPECS)
    assert data.get("preset", "standard") in PRESETS
    try:
        from realign.config import RunConfig
    except ImportError:
        pytest.skip("realign.config (the pipeline config) is not in the code yet")
    RunConfig.model_validate(data)  # raises on an unknown or badly typed field


def test_validate_options_table_is_complete_and_defaults_match():
    """docs/preference-data-generation.md documents every `realign validate` option, with
    the code's default where the default is a number or a word."""
    text = skill_docs()["docs/preference-data-generation.md"]
    cmd = cli_tree().commands["validate"]
    params = {p.opts[0]: p for p in cmd.params if p.opts and p.opts[0].startswith("--")}
    documented: dict[str, str] = {}
    for table in tables_of(lines_of(text)):
        header = [_header_key(c) for c in _cells(table[0].text)]
        if header[:2] != ["option", "default"]:
            continue
        for row in table[2:]:
            cells = _cells(row.text)
            opt = OPTION.search(cells[0])
            if opt:
                documented[opt.group(1)] = cells[1].replace("`", "").strip()
    assert documented, "no '| option | default |' table in preference-data-generation.md"
    assert set(documented) == set(params), (
        f"undocumented: {sorted(set(params) - set(documented))}; "
        f"not options: {sorted(set(documented) - set(params))}")
    for opt, cell in documented.items():
        default = params[opt].default
        if isinstance(default, bool) or default is None:
            continue
        if isinstance(default, (int, float)):
            assert _same(float(cell), float(default)), f"{opt}: doc {cell}, code {default}"
        else:
            assert cell == str(default), f"{opt}: doc {cell}, code {default}"
