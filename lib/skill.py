"""The skill files and their installation into an agent's skills folder.

The skill is SKILL.md, workflow.md, templates.md and docs/*.md at the top of the
repository. An installed wheel carries a copy in ``realign/_skill`` (setup.py copies
it at build time); a source checkout or editable install reads the repository.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .fileio import atomic_path

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
    """Copy the skill files into ``target`` atomically (a temp folder, then a rename).

    An existing ``target`` is replaced only with ``force``; the old folder is moved
    aside first and removed after the new one is in place, so ``target`` is always a
    complete copy. A symlink at ``target`` is replaced, never followed. A plain file at
    ``target`` is an :class:`InputError`.
    """
    from .errors import InputError

    root = skill_root()
    target = Path(target).expanduser()
    exists = target.exists() or target.is_symlink()
    if exists and not target.is_symlink() and not target.is_dir():
        raise InputError("exists and is not a folder; remove it or choose another --target",
                         file=target)
    if exists and not force:
        raise FileExistsError(f"{target} already exists (use --force to replace it)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the folder: {e.strerror}", file=target.parent) from None
    with atomic_path(target, directory=True) as tmp:
        for rel in skill_files(root):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / rel)
    return target
