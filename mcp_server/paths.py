"""Where the server may read and write files.

Over stdio the server runs as the user who started it, on their machine, so paths are
taken as given (relative ones against the working directory) unless roots were
configured. Over HTTP a remote peer names the paths, so every path is confined to the
configured roots (``--root DIR``, repeatable; default the working directory):

* a path with a ``..`` component is rejected outright, before any resolution;
* the path is resolved (relative ones against the first root), following every
  symlink, and the result must lie inside one of the resolved roots, so an absolute
  path elsewhere and a symlink pointing out of a root are both rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath


class PathNotAllowed(ValueError):
    """A path outside the configured roots (the message says which roots)."""


@dataclass(frozen=True)
class PathPolicy:
    """Resolve user-supplied paths; ``roots=None`` means unconfined (local stdio use)."""

    roots: tuple[Path, ...] | None = None
    base: Path = field(default_factory=Path.cwd)

    @classmethod
    def confined(cls, roots: Sequence[str | Path] | None = None) -> PathPolicy:
        """A policy confined to ``roots`` (default: the current directory)."""
        rs = tuple(Path(r).expanduser().resolve(strict=False) for r in (roots or [Path.cwd()]))
        return cls(roots=rs, base=rs[0])

    @property
    def is_confined(self) -> bool:
        return self.roots is not None

    def resolve(self, raw: str | Path, *, what: str = "path") -> Path:
        """The absolute path for ``raw``, or :class:`PathNotAllowed`."""
        text = str(raw)
        if not text.strip():
            raise PathNotAllowed(f"{what} is empty")
        if "\x00" in text:
            raise PathNotAllowed(f"{what} '{text!r}' contains a NUL byte")
        p = Path(text).expanduser() if self.roots is None else Path(text)
        if self.roots is None:
            return p if p.is_absolute() else self.base / p
        # Check the raw components: '..' is refused even when it would stay inside.
        if ".." in PurePath(text).parts:
            raise PathNotAllowed(f"{what} '{text}' contains '..'; give a path inside "
                                 f"{self._roots_text()}")
        full = p if p.is_absolute() else self.base / p
        real = full.resolve(strict=False)  # follows every symlink on the way
        for root in self.roots:
            if real == root or real.is_relative_to(root):
                return real
        why = "resolves (through a symlink) to" if real != full else "is"
        raise PathNotAllowed(f"{what} '{text}' {why} {real}, outside the allowed roots "
                             f"{self._roots_text()}")

    def _roots_text(self) -> str:
        assert self.roots is not None
        return ", ".join(str(r) for r in self.roots)
