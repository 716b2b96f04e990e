"""``realign skill install``: copy the realign-dpo-workflow skill for an agent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError
from ._common import fail_input, out


def skill_install(
    target: Annotated[Optional[Path], typer.Option(help="skills folder entry to create")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing install")] = False,
) -> None:
    """Copy the skill files (SKILL.md, workflow.md, templates.md, docs/) for an agent."""
    from ..skill import DEFAULT_TARGET, install_skill

    try:
        dest = install_skill(target or DEFAULT_TARGET, force=force)
    except (InputError, FileExistsError, FileNotFoundError) as e:
        fail_input(str(e))
    out.print(f"installed the realign-dpo-workflow skill in {dest}")


def register(app: typer.Typer) -> None:
    """Add the ``skill`` command group (``skill install``) to ``app``."""
    skill_app = typer.Typer(help="Install the realign-dpo-workflow skill for an agent.",
                            no_args_is_help=True)
    skill_app.command("install")(skill_install)
    app.add_typer(skill_app, name="skill")
