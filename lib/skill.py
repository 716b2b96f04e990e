"""The skill files and their installation into an agent's skills folder.

The skill is SKILL.md, workflow.md, templates.md and docs/*.md at the top of the
repository. An installed wheel carries a copy in ``realign/_skill`` (setup.py copies
it at build time); a source checkout or editable install reads the repository.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


SKILL_NAME = "realign-dpo-workflow"
SKILL_FILES = ("SKILL.md", "workflow.md", "templates.md")
DEFAULT_TARGET = Path.home() / ".claude" / "skills" / SKILL_NAME


def skill_root() -> Path:
    """The folder that holds SKILL.md (repository root or the packaged copy)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_skill", here.parent):
        if (cand / "SKILL.md").is_file():
            return cand
    raise FileNotFoundError("the skill files are missing from this installation "
                            "(SKILL.md not found next to the realign package)")


def skill_files(root: Path | None = None) -> list[Path]:
    """Relative paths of every skill file: the three top files and docs/*.md."""
    root = root or skill_root()
    files = [Path(f) for f in SKILL_FILES if (root / f).is_file()]
    files += sorted(p.relative_to(root) for p in (root / "docs").glob("*.md"))
    return files


def install_skill(target: Path, *, force: bool = False) -> Path:
    """Copy the skill files into ``target`` atomically (a temp folder, then a rename)."""
    root = skill_root()
    target = Path(target).expanduser()
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists (use --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for rel in skill_files(root):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / rel)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
