"""Preference rows for training: read any supported file, convert to TRL's conversational
format, split off the held-out set."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .data import PairSource
from .errors import InputError
from .messages import Message, as_messages


def read_rows(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Original rows of a preference file (any supported format), validated first.

    The file is checked by :class:`realign.data.PairSource` (clear file:line errors);
    rows are then returned as plain dicts for training.
    """
    src = PairSource(path, split=split)
    if src.format == "jsonl":
        rows = []
        with open(path, "rb") as fh:
            for raw in fh:
                if raw.strip():
                    rows.append(json.loads(raw))
        # validate through the streaming reader (raises InputError with file:line)
        for _ in src.blocks():
            pass
        return rows
    if src.format == "json":
        for _ in src.blocks():
            pass
        return list(src._load_json_array())
    rows = []
    for block in src.blocks():
        assert block.raw_table is not None
        rows.extend(block.raw_table.to_pylist())
    return rows


def _as_messages(value: Any, role: str) -> list[Message]:
    return as_messages(value if isinstance(value, list) else str(value), role)


def to_trl_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row in TRL's conversational, explicit-prompt format.

    standard ``prompt`` str -> one user message; responses -> one assistant message.
    Implicit prompt: the common prefix of chosen and rejected (whole messages, or whole
    words for strings) becomes the prompt.
    """
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row and row["prompt"] is not None:
        prompt = _as_messages(row["prompt"], "user")
    elif isinstance(chosen, list):
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        prompt = _as_messages(prompt, "user")
    else:
        k = len(os.path.commonprefix([chosen, rejected]))
        if k < min(len(chosen), len(rejected)):
            while k > 0 and not chosen[k - 1].isspace():
                k -= 1
        prompt, chosen, rejected = [{"role": "user", "content": chosen[:k].strip()}], chosen[k:], rejected[k:]
    out: dict[str, Any] = {
        "prompt": prompt,
        "chosen": _as_messages(chosen, "assistant"),
        "rejected": _as_messages(rejected, "assistant"),
    }
    for key in ("score_chosen", "score_rejected", "reference"):  # reference: stage-7 verifier
        if key in row:
            out[key] = row[key]
    return out


def _unit_hash(text: str, seed: int) -> float:
    h = hashlib.blake2b(f"{seed}\x1f{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def split_heldout(rows: list[dict[str, Any]], *, fraction: float, min_pairs: int, max_pairs: int,
                  seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split TRL rows into (train, held-out) by a seeded hash of the prompt text.

    u = blake2b(seed, prompt) / 2^64 is uniform in [0, 1); rows are ranked by u and the
    lowest ``clamp(round(fraction·N), min_pairs, max_pairs)`` go to held-out. Every row of a
    prompt lands on the same side (no prompt leaks from train into held-out), and the split
    does not depend on row order.
    """
    if len(rows) < 2:
        raise InputError(f"need at least 2 pairs to split off a held-out set, got {len(rows)}")
    keyed = []
    for i, r in enumerate(rows):
        text = "\n".join(m["content"] for m in r["prompt"])
        keyed.append((_unit_hash(text, seed), i))
    keyed.sort()
    k = min(max(round(fraction * len(rows)), min_pairs), max_pairs, len(rows) - 1)
    # keep prompt groups whole: extend k while the next row has the same prompt hash
    while k < len(keyed) - 1 and keyed[k][0] == keyed[k - 1][0]:
        k += 1
    held = {i for _, i in keyed[:k]}
    train = [r for i, r in enumerate(rows) if i not in held]
    heldout = [r for i, r in enumerate(rows) if i in held]
    return train, heldout


def prompts_and_completions(rows: list[dict[str, Any]], key: str = "chosen"
                            ) -> tuple[list[list[Message]], list[list[Message]]]:
    return [r["prompt"] for r in rows], [r[key] for r in rows]
