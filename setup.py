"""Copies the skill files into the wheel (realign/_skill) so `realign skill install`
works from a non-editable install. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithSkill(build_py):
    def run(self) -> None:
        super().run()
        root = Path(__file__).parent
        dest = Path(self.build_lib) / "realign" / "_skill"
        files = [root / f for f in ("SKILL.md", "workflow.md", "templates.md")]
        files += sorted((root / "docs").glob("*.md"))
        for f in files:
            if f.is_file():
                out = dest / f.relative_to(root)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)


setup(cmdclass={"build_py": BuildWithSkill})
