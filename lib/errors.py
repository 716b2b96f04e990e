"""User-facing errors. Every user mistake becomes one of these, never a bare traceback.

The CLI maps :class:`InputError` to exit code 2 and prints ``str(err)``, a single line
of the form ``FILE:LINE: field 'chosen': expected a string, got int``.
"""

from __future__ import annotations

from pathlib import Path


class RealignError(Exception):
    """Base class of every error realign raises on purpose."""


class InputError(RealignError):
    """Bad user input: a file, a line, a field. Exit code 2."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.message = message
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}{what}{self.message}"


class MissingDependencyError(RealignError):
    """An optional dependency is not installed; the message says the install command."""
