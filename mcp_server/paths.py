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

import os
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



class RunDirs:
    """The one resolver for run directories, used by every tool and resource.

    A run is named by its id (a folder of the runs directory; the rule is
    :func:`realign.config.validate_run_id`) or, for a run kept elsewhere, by its folder
    path (resolved by the :class:`PathPolicy`, so confined to the roots when the server
    is). Either way the run directory must stay inside its root:

    * an entry of the runs directory (named by id or by path) that is a symlink leading
      out of the runs directory is refused;
    * a run directory holding a symlink that leads out of it is refused (the tools read
      and write the files below a run directory: verdicts, status, report, checkpoints).
    """

    def __init__(self, policy: PathPolicy, runs_dir: Path) -> None:
        self.policy = policy
        self.runs_dir = runs_dir
        self.root = runs_dir.resolve(strict=False)

    # -- run ids -------------------------------------------------------------------------
    @staticmethod
    def check_id(run_id: str) -> str:
        """``run_id`` when it is a safe run id, else :class:`PathNotAllowed` saying why."""
        from realign.config import validate_run_id

        try:
            return validate_run_id(run_id)
        except ValueError as e:
            raise PathNotAllowed(str(e)) from None

    @classmethod
    def is_run_id(cls, run: str) -> bool:
        try:
            cls.check_id(run)
        except PathNotAllowed:
            return False
        return True

    def new(self, parent: Path, run_id: str) -> Path:
        """The folder of a new run ``run_id`` in the runs directory ``parent``: a bad id, an
        existing symlink there, or a parent that leads out of the roots is refused."""
        self.check_id(run_id)
        if self.policy.is_confined:
            parent = self.policy.resolve(parent, what="output_dir")
        d = parent / run_id
        if d.is_symlink():
            raise PathNotAllowed(f"run '{run_id}': {d} is a symlink to {d.resolve()}; a run "
                                 "directory must be a real folder of its runs directory")
        return d

    def entry(self, run_id: str) -> Path:
        """The real path of ``<runs_dir>/<run_id>``, refused when it leads out of the runs
        directory (it need not exist)."""
        self.check_id(run_id)
        d = self.runs_dir / run_id
        real = d.resolve(strict=False)
        if real.parent != self.root:
            raise PathNotAllowed(f"run '{run_id}': {d} resolves (through a symlink) to {real}, "
                                 f"outside the runs directory {self.root}")
        return real

    # -- lookup --------------------------------------------------------------------------
    def resolve(self, run: str) -> Path:
        """The run directory named by ``run`` (an id or a folder path); it holds run.json.

        :class:`PathNotAllowed` for a name or path that leads out of its root,
        ``FileNotFoundError`` when there is no such run.
        """
        from realign.rundir import RunDir

        text = str(run)
        if self.is_run_id(text):
            d = self.entry(text)
            if RunDir(d).exists():
                return self.checked(d)
        d = self.policy.resolve(text, what="run")  # the roots' rules ('..', outside, NUL)
        given = Path(text).expanduser()
        lexical = Path(os.path.abspath(given if given.is_absolute() else self.policy.base / given))
        if lexical.parent.resolve() == self.root:
            d = self.entry(lexical.name)  # an entry of the runs directory, named by its path
        if not RunDir(d).exists():
            where = (f"neither {self.runs_dir / text} nor {d} holds a run.json"
                     if self.is_run_id(text) else f"{d} holds no run.json")
            raise FileNotFoundError(f"no run '{text}': {where} (list_runs shows the runs)")
        return self.checked(d) if (self.policy.is_confined or d.parent == self.root) else d

    def checked(self, run_dir: Path) -> Path:
        """``run_dir`` resolved, refused when it holds a symlink that leads out of it."""
        real = run_dir.resolve()
        for top, dirs, files in os.walk(real, followlinks=False):
            for name in (*dirs, *files):
                p = Path(top) / name
                if not p.is_symlink():
                    continue
                target = p.resolve(strict=False)
                if not (target == real or target.is_relative_to(real)):
                    raise PathNotAllowed(f"run directory {real} holds a symlink {p} leading "
                                         f"to {target}, outside the run directory")
        return real

    def listing(self) -> tuple[list[Path], list[tuple[str, str]]]:
        """The run directories of the runs directory, newest first, and the entries left
        out with the reason (a symlink leading out, a name that is not a run id, ...)."""
        from realign.rundir import RunDir

        if not self.runs_dir.is_dir():
            return [], []
        found: list[tuple[float, Path]] = []
        skipped: list[tuple[str, str]] = []
        for entry in sorted(self.runs_dir.iterdir()):
            try:
                if not entry.is_symlink() and not RunDir(entry).exists():
                    continue  # not a run (and not a link to check)
                d = self.entry(entry.name)
                if not RunDir(d).exists():
                    continue
                d = self.checked(d)
                found.append((d.stat().st_mtime, d))
            except (OSError, ValueError) as e:
                skipped.append((entry.name, str(e)))
        found.sort(key=lambda t: t[0], reverse=True)
        return [d for _, d in found], skipped
