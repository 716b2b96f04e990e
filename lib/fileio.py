"""Atomic file writes, digests and "keep the old copy" renames: the one home for each.

Every file realign writes goes through :func:`atomic_path` (a temp sibling, renamed into
place when complete), so a reader or a crash never sees half a file. Helpers for the
common shapes (text, JSON, JSONL) sit on top of it; they flush the data to disk before
the rename, so a crash or a power loss leaves the old file or the new one, never an
empty one.

Temp siblings are named ``.<name>.tmp-XXXXXXXX[<suffix>]`` and get the permissions of
a normal file (``0o666 & ~umask``; folders ``0o777 & ~umask``), not ``mkstemp``'s 0600.
A kill can leave them behind: :func:`clean_temp_files` removes them (the pipeline calls
it when a job starts on a run directory, under the run lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where it can be, so no other thread ever
    sees a changed umask)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def temp_sibling(path: str | Path, *, directory: bool = False, suffix: str = ".tmp") -> Path:
    """A new, empty temporary file (or folder) beside ``path``, named
    ``.<name>.tmp-XXXXXXXX<suffix>`` (a folder: ``.<name>.tmp-XXXXXXXX``): written there,
    then moved into place by :func:`replace_into` (same filesystem, atomic). Its mode is
    that of a normal new file under the user's umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = current_umask()
    if directory:
        d = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        os.chmod(d, 0o777 & ~mask)
        return d
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~mask)
    finally:
        os.close(fd)
    return Path(name)


#: Names of temp siblings a killed writer may leave: ``.<name>.tmp-XXXXXXXX[.ext]`` (files
#: and folders of :func:`temp_sibling`), ``.<name>.XXXXXXXX[.tmp]`` (older versions) and
#: ``.<name>.old-<pid>`` (:func:`replace_into` between its two renames).
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp-[a-z0-9_]{8}(?:\.[A-Za-z0-9]+)?|[a-z0-9_]{8}(?:\.tmp)?"
                       r"|old-(?P<pid>\d+))$")


def clean_temp_files(root: str | Path) -> list[Path]:
    """Remove the temp siblings (:data:`TEMP_NAME`) a killed writer left under ``root``.

    Call it only while no writer can be active there (the pipeline holds the run lock).
    An ``.<name>.old-<pid>`` whose ``<name>`` is missing is the previous version that
    :func:`replace_into` moved aside just before the kill: it is put back, not removed.
    Symlinks are not followed. Returns what was removed or restored.
    """
    root = Path(root)
    done: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames) + filenames:
            m = TEMP_NAME.match(name)
            if not m:
                continue
            p = here / name
            if name in dirnames:
                dirnames.remove(name)  # do not walk into what is removed
            target = here / m.group("name")
            if m.group("pid") is not None and not target.exists() and not target.is_symlink():
                os.replace(p, target)
            else:
                discard(p)
            done.append(p)
    return done


def replace_into(tmp: Path, path: str | Path) -> None:
    """Move a finished temp sibling over ``path``. An existing folder (or symlink) at
    ``path`` is moved aside first, put back if the move fails, and removed only after the
    new one is in place."""
    path = Path(path)
    if path.is_symlink() or (tmp.is_dir() and path.exists()):
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        discard(old)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        discard(old)
    else:
        os.replace(tmp, path)


def discard(tmp: Path) -> None:
    """Remove a temp sibling that will not be used (file or folder; missing is fine)."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; move it over ``path`` on success.

    The temp lives in the same folder (so the rename is atomic on one filesystem) and is
    removed when the block raises. ``directory=True`` yields an empty folder instead of a
    file. ``suffix`` keeps an extension a library keys on (``.npz``).
    """
    tmp = temp_sibling(path, directory=directory, suffix=suffix)
    try:
        yield tmp
        replace_into(tmp, path)
    finally:
        if tmp.exists():
            discard(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON (a pydantic model or plain data, indent 2) to ``path`` atomically."""
    text = data.model_dump_json(indent=2) if isinstance(data, BaseModel) else \
        json.dumps(data, indent=2, default=str)
    write_text_atomic(path, text)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8, not ASCII-escaped) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every non-blank line of a JSONL file, parsed (files realign wrote itself)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def keep_old(path: str | Path) -> Path | None:
    """Rename an existing ``<stem><suffix>`` to the first free ``<stem>.<n><suffix>``
    (n = 1, 2, ...), so a record is never overwritten. Returns the new name, or None."""
    path = Path(path)
    if not path.exists():
        return None
    k = 1
    while path.with_name(f"{path.stem}.{k}{path.suffix}").exists():
        k += 1
    dest = path.with_name(f"{path.stem}.{k}{path.suffix}")
    path.rename(dest)
    return dest


def json_digest(data: Any) -> str:
    """``sha256:<hex>`` of JSON data in canonical form (sorted keys, no spaces)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file, or of a folder: its files' relative paths and contents
    in sorted order (so two folders with the same files have the same digest)."""
    path = Path(path)
    h = hashlib.sha256()
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in paths:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()
