"""Helpers the realign suite YAMLs call through lm-eval's ``!function`` tag.

lm-eval imports this file by path (it sits next to the YAMLs), so the suites work
wherever the package is installed and also with the plain ``lm_eval`` CLI:
``lm_eval --include_path <this folder> --tasks realign_arith ...``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str) -> Any:
    # Built directly from the shipped JSONL: no hub, no datasets cache files.
    import datasets

    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_knowledge(**_: Any) -> Any:
    return _load("knowledge.jsonl")


def load_arith(**_: Any) -> Any:
    return _load("arith.jsonl")


def load_format(**_: Any) -> Any:
    return _load("format.jsonl")


# ------------------------------------------------------------------ format checks
_WORD = re.compile(r"[A-Za-z0-9']+")


def _strip(text: str) -> str:
    return text.strip().strip("`").strip()


def check_format(check: str, arg: str, response: str) -> bool:
    """True when ``response`` satisfies the instruction ``check`` (with parameter ``arg``).

    * ``all_caps``: at least one letter and no lowercase letter.
    * ``lowercase``: at least one letter and no uppercase letter.
    * ``one_word``: exactly one word (``[A-Za-z0-9']+``) once punctuation is ignored.
    * ``json_key``: the response (code fences allowed) parses as a JSON object holding key ``arg``.
    * ``starts_with``: the first word equals ``arg`` (case-insensitive).
    * ``yes_no``: the whole response is "yes" or "no" (case and final punctuation ignored).
    * ``number_only``: the whole response is one number in digits (final period allowed).
    * ``three_items``: exactly three non-empty lines.
    """
    r = response.strip()
    letters = [c for c in r if c.isalpha()]
    if check == "all_caps":
        return bool(letters) and not any(c.islower() for c in letters)
    if check == "lowercase":
        return bool(letters) and not any(c.isupper() for c in letters)
    if check == "one_word":
        return len(_WORD.findall(r)) == 1
    if check == "json_key":
        body = _strip(r)
        if body.lower().startswith("json"):
            body = body[4:].strip()
        try:
            obj = json.loads(body)
        except ValueError:
            return False
        return isinstance(obj, dict) and arg in obj
    if check == "starts_with":
        words = _WORD.findall(r)
        return bool(words) and words[0].lower() == arg.lower()
    if check == "yes_no":
        return r.rstrip(".!").strip().lower() in {"yes", "no"}
    if check == "number_only":
        return re.fullmatch(r"-?\d+(?:\.\d+)?\.?", r) is not None
    if check == "three_items":
        return len([ln for ln in r.splitlines() if ln.strip()]) == 3
    raise ValueError(f"unknown format check {check!r}")


def process_format(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Per item: ``follows`` = 1.0 when the generated response passes the doc's check."""
    return {"follows": float(check_format(doc["check"], doc["arg"], results[0]))}
