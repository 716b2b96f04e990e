"""Atomic file writes, digests and "keep the old copy" renames: the one home for each.

Every file realign writes goes through :func:`atomic_path` (a temp sibling, renamed into
place when complete), so a reader or a crash never sees half a file. Helpers for the
common shapes (text, JSON, JSONL) sit on top of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def temp_sibling(path: str | Path, *, directory: bool = False, suffix: str = ".tmp") -> Path:
    """A new, empty temporary file (or folder) beside ``path``, named ``.<name>.*``: written
    there, then moved into place by :func:`replace_into` (same filesystem, atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


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
    """Write UTF-8 text to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
