"""Answer verifiers: the stage-7 win-rate judge for rows that carry a reference answer.

A verifier compares a model's response with a ground-truth answer by code (never a
substring of the whole text for numbers: the final number is extracted and compared
exactly).
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_FULL_NUMBER = re.compile(r"^\s*[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?\s*\.?\s*$")


def _as_fraction(token: str) -> Fraction | None:
    try:
        return Fraction(token.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def final_number(text: str) -> Fraction | None:
    """The last number written in ``text`` (``-3``, ``1,200``, ``2.5``, ``3/4``) as an exact
    fraction; None when there is none."""
    found = _NUMBER.findall(text)
    return _as_fraction(found[-1]) if found else None


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def verify_answer(response: str, reference: str) -> bool:
    """Exact-answer check of a response against a reference answer.

    * numeric reference (the whole reference is one number): correct iff the response's
      last number (:func:`final_number`) equals it exactly (``"1,200"`` = ``"1200.0"``);
    * text reference: correct iff the reference, lowercased with punctuation removed,
      occurs in the response normalized the same way as a run of whole words
      (``"Cairo"`` is in ``"The capital is Cairo."``, not in ``"Cairorama"``).
    An empty reference verifies nothing (False).
    """
    if _FULL_NUMBER.match(reference):
        ref = _as_fraction(reference.strip().rstrip("."))
        got = final_number(response)
        return ref is not None and got is not None and got == ref
    ref = _norm(reference)
    if not ref:
        return False
    return f" {ref} " in f" {_norm(response)} "


def judge_by_verifier(policy: str, baseline: str, reference: str) -> str:
    """win / loss when exactly one response verifies; tie when both or neither do."""
    p, b = verify_answer(policy, reference), verify_answer(baseline, reference)
    return "tie" if p == b else ("win" if p else "loss")


def judge_by_reward(r_policy: float, r_baseline: float, same_text: bool) -> str:
    """win when the policy's reward is higher, loss when lower; tie when the two responses
    are the same text (after stripping) or the rewards are equal."""
    if same_text or r_policy == r_baseline:
        return "tie"
    return "win" if r_policy > r_baseline else "loss"


