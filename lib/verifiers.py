"""Verifiers: check a response against ground truth by code, and measure how much of a
data set such checks can cover (RLVR verifiability).

Four verifiers (``docs/preference-data-generation.md`` § "Verifiers" has the rules):

* ``math`` — answer equivalence with ``math-verify`` (LaTeX, fractions, decimals:
  ``\\frac{1}{2}`` equals ``0.5``), on the answer it extracts (boxed, "the answer is", else
  the last expression);
* ``code`` — the response's Python run against ``tests`` in a limited child process
  (:mod:`realign.sandbox`);
* ``instructions`` — IFEval constraint checks (:mod:`realign.instruction_checks`);
* ``exact`` — the response's **final answer** (:func:`final_answer`: a boxed value, the
  text after "answer:" / "the answer is", else the last sentence) compared with the
  reference after normalization: numbers as numbers, case, punctuation and articles folded.
  Never "the reference occurs somewhere": "It is not Paris. Maybe Tokyo" is not "Paris".

A final answer that is negated ("the answer is not 45") verifies as nothing.

Stage 7's win-rate judge calls :func:`verify_answer` (math when the reference is
mathematical and ``math-verify`` is installed, else exact). :func:`verify_rows` /
:func:`verify_file` apply the row contract (``prompt``; ``response`` or ``completion``;
``answer``, ``tests`` or ``instructions``; optional ``verifier``) and return a
:class:`VerifiabilityReport` — what ``realign verify`` prints and the MCP tool
``assess_rlvr_verifiability`` returns.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from .errors import InputError, MissingDependencyError
from .gates import DEFAULT_PRESET, PRESETS, GateResult, Thresholds
from .instruction_checks import (
    InstructionError,
    check_instructions,
    split_sentences,
    validate_instruction,
)
from .sandbox import SandboxLimits, count_tests, run_python_tests

__all__ = [
    "RLVR_GATE", "RLVR_VERIFIABILITY_MIN", "VERIFIERS", "Check", "RowResult",
    "VerifiabilityReport", "check_answer", "check_exact", "check_math", "final_answer",
    "final_number", "judge_by_reward", "judge_by_verifier", "math_verify_available",
    "normalize_answer", "read_verify_rows", "verify_answer", "verify_file", "verify_rows",
]

Verifier = Literal["math", "code", "instructions", "exact"]
#: The verifiers, in the order a row without a ``verifier`` field is matched to them.
VERIFIERS: tuple[str, ...] = ("code", "instructions", "math", "exact")
#: The gate on the share of rows a verifier can check.
RLVR_GATE = "rlvr_verifiability"
#: Its threshold in the default preset (``realign.gates.PRESETS``, the one home of the number).
RLVR_VERIFIABILITY_MIN = PRESETS[DEFAULT_PRESET][RLVR_GATE]

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_FULL_NUMBER = re.compile(r"^\s*[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?\s*\.?\s*$")
_ANCHOR = re.compile(r"\b(?:final\s+answer|answer)\s*(?:is\b|:|=)\s*", re.IGNORECASE)
_COPULA = re.compile(
    r"\b(?:is|are|was|were|equals)\b|=|:|\b(?:it|that|this|which|answer)['’]s\b", re.IGNORECASE)
_NEGATION = re.compile(
    r"\b(?:not|never|neither|nor|cannot|isn['’]t|aren['’]t|wasn['’]t|weren['’]t|can['’]t)\b",
    re.IGNORECASE)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


# ----------------------------------------------------------------------------- extraction


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


def _last_boxed(text: str) -> str | None:
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    i = starts[-1].end()
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def final_answer(text: str) -> str:
    """The span of ``text`` that states its final answer, by the first rule that applies:

    1. the content of the last ``\\boxed{…}``;
    2. after the last "answer is" / "answer:" / "final answer =", up to the end of that
       sentence;
    3. the last sentence of the last non-empty line, after its last "is", "are", "was",
       "were", "equals", "=", ":" or "it's" when it has one.

    ``"It is not Paris. Maybe Tokyo"`` → ``"Maybe Tokyo"``; ``"The capital is Cairo."`` →
    ``"Cairo."``; ``"89 - 44 = 45"`` → ``"45"``. Empty when the text is empty.
    """
    return _final_candidates(text)[0]


def _final_candidates(text: str) -> list[str]:
    """:func:`final_answer`, then (rule 3 only) the whole last sentence, so that a
    reference that is itself a sentence ("Tokyo is the capital") can match."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return [boxed.strip()]
    anchors = list(_ANCHOR.finditer(text))
    if anchors:
        rest = text[anchors[-1].end():].split("\n", 1)[0]
        sentences = split_sentences(rest)
        return [sentences[0].strip() if sentences else ""]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return [""]
    sentences = split_sentences(lines[-1]) or [lines[-1]]
    last = sentences[-1].strip()
    copulas = list(_COPULA.finditer(last))
    if copulas:
        return [last[copulas[-1].end():].strip(), last]
    return [last]


def normalize_answer(text: str) -> str:
    """Case folded; punctuation and Markdown marks to spaces; the articles a/an/the
    removed; white space collapsed (the SQuAD answer normalization)."""
    folded = re.sub(r"[^\w\s]|_", " ", text.casefold())
    return " ".join(_ARTICLES.sub(" ", folded).split())


def _is_number(text: str) -> bool:
    return bool(_FULL_NUMBER.match(text))


def _is_mathy(answer: str) -> bool:
    """A reference for the math verifier: LaTeX (a backslash or ``$``), or digits and
    operators with one-letter variables at most (``x+1``, ``(1, 2)``, ``10%``); words
    (``Paris``, ``3 apples``) are not."""
    if "\\" in answer or "$" in answer:
        return True
    return bool(re.search(r"\d", answer)) and not re.search(r"[A-Za-z]{2,}", answer)


# ----------------------------------------------------------------------------- checks


class Check(BaseModel):
    """One verification: ``passed`` and ``score`` are None when nothing was checked."""

    verifier: str | None
    verifiable: bool
    passed: bool | None = None
    score: float | None = None
    reason: str = ""


def check_exact(response: str, reference: str) -> Check:
    """The ``exact`` verifier (see :func:`final_answer` and :func:`normalize_answer`)."""
    ref = reference.strip()
    if not normalize_answer(ref) and not _is_number(ref):
        return Check(verifier="exact", verifiable=False, reason="the answer is empty")
    candidates = _final_candidates(response)
    span = candidates[0]
    if _NEGATION.search(span) and not _NEGATION.search(ref):
        return Check(verifier="exact", verifiable=True, passed=False, score=0.0,
                     reason=f"final answer is negated: {span[:80]!r}")
    if _is_number(ref):
        want = _as_fraction(ref.rstrip().rstrip("."))
        got = final_number(span)
        ok = want is not None and got is not None and got == want
        shown = "no number" if got is None else str(got)
        return Check(verifier="exact", verifiable=True, passed=ok, score=float(ok),
                     reason=f"final number {shown} {'=' if ok else '≠'} {ref}")
    want_text = normalize_answer(ref)
    ok = any(normalize_answer(c) == want_text for c in candidates)
    return Check(verifier="exact", verifiable=True, passed=ok, score=float(ok),
                 reason=f"final answer {span[:80]!r} {'=' if ok else '≠'} {ref[:80]!r}")


def math_verify_available() -> bool:
    """Whether ``math-verify`` is installed (``pip install 'realign[verify]'``)."""
    return _math_verify() is not None


@lru_cache(maxsize=1)
def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError:
        return None
    for name in ("math_verify.parser", "math_verify.grader", "math_verify.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "timeout disabled" notes
    return math_verify


def _timeouts() -> dict[str, Any]:
    # math-verify times out with signal.alarm, which works only in the main thread
    main = threading.current_thread() is threading.main_thread()
    return {"parsing_timeout": 5 if main else None}


@lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> Any:
    mv = _math_verify()
    text = answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"
    return mv.parse(text, **_timeouts())


def check_math(response: str, answer: str) -> Check:
    """The ``math`` verifier: ``math_verify.verify(parse(answer), parse(response))``.
    Raises :class:`~realign.errors.MissingDependencyError` without ``math-verify``."""
    mv = _math_verify()
    if mv is None:
        raise MissingDependencyError(
            "the math verifier needs math-verify: pip install 'realign[verify]'")
    gold = _parse_gold(answer.strip())
    if not gold or isinstance(gold[0], str):  # only the fallback string: nothing parsed
        return Check(verifier="math", verifiable=False,
                     reason=f"math-verify cannot parse the answer {answer[:60]!r}")
    span = final_answer(response)
    if _NEGATION.search(span):
        return Check(verifier="math", verifiable=True, passed=False, score=0.0,
                     reason=f"final answer is negated: {span[:80]!r}")
    t = _timeouts()
    pred = mv.parse(response, **t)
    ok = bool(pred) and bool(mv.verify(gold, pred, timeout_seconds=5 if t["parsing_timeout"]
                                       else None))
    shown = pred[-1] if pred else "no answer found"
    return Check(verifier="math", verifiable=True, passed=ok, score=float(ok),
                 reason=f"{str(shown)[:60]} {'≡' if ok else '≢'} {gold[-1]}")


def check_answer(response: str, reference: str) -> Check:
    """``math`` when the reference is mathematical (:func:`_is_mathy`) and ``math-verify``
    is installed, else ``exact``."""
    if _is_mathy(reference) and math_verify_available():
        c = check_math(response, reference)
        if c.verifiable:
            return c
    return check_exact(response, reference)


def verify_answer(response: str, reference: str) -> bool:
    """Whether ``response``'s final answer equals ``reference`` (:func:`check_answer`):
    numbers as numbers (``"1,200"`` = ``"1200.0"``, ``"3/4"`` = ``"0.75"``), text
    normalized and compared whole (``"The capital is Cairo."`` verifies as ``"Cairo"``;
    ``"It is not Paris. Maybe Tokyo"`` does not verify as ``"Paris"``). An empty reference
    verifies nothing (False)."""
    if not reference.strip():
        return False
    return bool(check_answer(response, reference).passed)


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


# ----------------------------------------------------------------------------- rows


class RowResult(BaseModel):
    """One row: which verifier, whether the response passed, its score (share of tests or
    instructions passed; 1/0 for math and exact), and why. ``passed``/``score`` are None
    when the row cannot be verified or carries no response."""

    line: int
    verifier: str | None
    verifiable: bool
    passed: bool | None
    score: float | None
    reason: str


class VerifiabilityReport(BaseModel):
    """A data set's verifiability: the share of rows a verifier can check, by verifier, the
    pass rate of the responses, the gate, and every row."""

    data: str | None = None
    rows: int
    verifiable: int
    share_verifiable: float
    by_verifier: dict[str, int] = Field(description="verifiable rows per verifier")
    not_verifiable: dict[str, int] = Field(description="rows per reason they cannot be checked")
    checked: int = Field(description="verifiable rows that carry a response")
    passed: int
    pass_rate: float | None = Field(description="passed / checked")
    mean_score: float | None
    gate: GateResult
    status: Literal["pass", "fail"]
    seconds: float
    results: list[RowResult]


@dataclass
class _Plan:
    line: int
    verifier: str | None
    prompt: str
    response: str | None
    answer: list[str] = field(default_factory=list)
    tests: str | list[str] | None = None
    instructions: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    reason: str = ""  # why the row cannot be verified (verifier chosen or not)


def _text(value: Any, role: str, where: tuple[str | None, int, str]) -> str:
    """A string, or the content of the last ``role`` message of a message list."""
    file, line, name = where
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        picked = [m for m in value if m.get("role") == role] or value
        content = picked[-1].get("content")
        if isinstance(content, str):
            return content
    raise InputError(f"expected a string or a list of {{role, content}} messages, got "
                     f"{_type(value)}", file=file, line=line, field=name)


def _type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _plan_row(row: Any, file: str | None, line: int) -> _Plan:
    if not isinstance(row, dict):
        raise InputError(f"expected a JSON object, got {_type(row)}", file=file, line=line)
    if "prompt" not in row or row["prompt"] is None:
        raise InputError("missing (the row contract needs a prompt)", file=file, line=line,
                         field="prompt")
    prompt = _text(row["prompt"], "user", (file, line, "prompt"))
    response: str | None = None
    for key in ("response", "completion"):
        if row.get(key) is not None:
            response = _text(row[key], "assistant", (file, line, key))
            break
    plan = _Plan(line=line, verifier=None, prompt=prompt, response=response)

    answer = row.get("answer")
    if answer is not None:
        items = answer if isinstance(answer, list) else [answer]
        if not items or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                for a in items):
            raise InputError(f"expected a string, a number or a list of them, got "
                             f"{_type(answer)}", file=file, line=line, field="answer")
        plan.answer = [str(a) for a in items]
    tests = row.get("tests")
    if tests is not None:
        if not (isinstance(tests, str) or (isinstance(tests, list) and tests
                                           and all(isinstance(t, str) for t in tests))):
            raise InputError(f"expected Python source or a list of it, got {_type(tests)}",
                             file=file, line=line, field="tests")
        plan.tests = tests
    instructions = _instructions(row, file, line)

    chosen = row.get("verifier")
    if chosen is not None and chosen not in VERIFIERS:
        raise InputError(f"unknown verifier {chosen!r} (choose from "
                         f"{', '.join(sorted(VERIFIERS))})", file=file, line=line,
                         field="verifier")
    need = {"math": "answer", "exact": "answer", "code": "tests",
            "instructions": "instructions"}
    if chosen is not None:
        present = {"answer": plan.answer, "tests": plan.tests, "instructions": instructions}
        if not present[need[chosen]]:
            raise InputError(f"missing (required by verifier '{chosen}')", file=file,
                             line=line, field=need[chosen])
    elif plan.tests is not None:
        chosen = "code"
    elif instructions:
        chosen = "instructions"
    elif plan.answer:
        chosen = "math" if all(_is_mathy(a) for a in plan.answer) else "exact"
    else:
        plan.reason = "no answer, tests or instructions"
        return plan

    if chosen == "math" and not math_verify_available():
        if row.get("verifier") == "math":
            raise MissingDependencyError(
                f"{file}:{line}: verifier 'math' needs math-verify: "
                "pip install 'realign[verify]'")
        if all(_is_number(a) for a in plan.answer):
            chosen = "exact"  # numbers as numbers, without math-verify
        else:
            plan.verifier = "math"
            plan.reason = "needs math-verify (pip install 'realign[verify]')"
            return plan
    plan.verifier = chosen
    if chosen == "code":
        assert plan.tests is not None
        try:
            n = count_tests(plan.tests)
        except SyntaxError as e:
            plan.reason = f"tests: SyntaxError at line {e.lineno}: {e.msg}"
        else:
            if n == 0:
                plan.reason = "tests contain no assert or call"
    elif chosen == "instructions":
        for i, (inst_id, kwargs) in enumerate(instructions):
            try:
                got = validate_instruction(inst_id, kwargs)
            except InstructionError as e:
                raise InputError(str(e), file=file, line=line,
                                 field=f"instructions[{i}].kwargs.{e.field}") from None
            if isinstance(got, str):
                plan.reason = got
                break
            plan.instructions.append((inst_id, got))
    return plan


def _instructions(row: dict[str, Any], file: str | None, line: int) -> list[tuple[str, dict]]:
    """``instructions: [{"id", "kwargs"}]``, or IFEval's ``instruction_id_list`` + ``kwargs``."""
    raw = row.get("instructions")
    if raw is None and isinstance(row.get("instruction_id_list"), list):
        ids, kws = row["instruction_id_list"], row.get("kwargs")
        if kws is None:
            kws = [{}] * len(ids)
        if not isinstance(kws, list) or len(kws) != len(ids):
            raise InputError("expected a list as long as instruction_id_list", file=file,
                             line=line, field="kwargs")
        raw = [{"id": i, "kwargs": k} for i, k in zip(ids, kws)]
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise InputError(f"expected a non-empty list of {{\"id\", \"kwargs\"}} objects, got "
                         f"{_type(raw)}", file=file, line=line, field="instructions")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise InputError("expected an object with a string 'id'", file=file, line=line,
                             field=f"instructions[{i}].id")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise InputError(f"expected an object, got {_type(kwargs)}", file=file, line=line,
                             field=f"instructions[{i}].kwargs")
        out.append((item["id"], kwargs))
    return out


def _run(plan: _Plan, limits: SandboxLimits) -> RowResult:
    def res(passed: bool | None, score: float | None, reason: str) -> RowResult:
        return RowResult(line=plan.line, verifier=plan.verifier, verifiable=not plan.reason,
                         passed=passed, score=score, reason=reason)

    if plan.reason:
        return res(None, None, plan.reason)
    if plan.response is None:
        return res(None, None, "no response to check (verifiable)")
    if plan.verifier == "code":
        assert plan.tests is not None
        r = run_python_tests(plan.response, plan.tests, limits=limits)
        return res(r.ok, r.passed / r.total if r.total else 0.0, f"{r.status}: {r.reason}")
    if plan.verifier == "instructions":
        got = check_instructions(plan.response, plan.prompt, plan.instructions)
        failed = [i for (i, _), ok in zip(plan.instructions, got) if not ok]
        reason = (f"{sum(got)}/{len(got)} instructions followed"
                  + (f"; not: {', '.join(failed)}" if failed else ""))
        return res(all(got), sum(got) / len(got), reason)
    fn = check_math if plan.verifier == "math" else check_exact
    checks = [fn(plan.response, a) for a in plan.answer]
    usable = [c for c in checks if c.verifiable]
    if not usable:
        return res(None, None, checks[0].reason)
    best = next((c for c in usable if c.passed), usable[0])
    return res(bool(best.passed), best.score, best.reason)


def verify_rows(rows: Sequence[Any], *, lines: Sequence[int] | None = None,
                file: str | Path | None = None, workers: int | None = None,
                limits: SandboxLimits | None = None, threshold: float | None = None,
                preset: str = "standard",
                progress: Callable[[int, int], None] | None = None) -> VerifiabilityReport:
    """Verify every row (the row contract: see the module docstring). ``lines`` are the
    rows' line numbers for messages (default 1, 2, …). Code rows run ``workers`` child
    processes at a time (default 2). A contract error raises
    :class:`~realign.errors.InputError` naming file, line and field."""
    import time

    t0 = time.perf_counter()
    fname = str(file) if file is not None else None
    lines = list(lines) if lines is not None else list(range(1, len(rows) + 1))
    if not rows:
        raise InputError("no rows to verify", file=fname)
    plans = [_plan_row(r, fname, ln) for r, ln in zip(rows, lines)]
    limits = limits or SandboxLimits()
    results: list[RowResult | None] = [None] * len(plans)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(plans))

    code = [i for i, p in enumerate(plans) if p.verifier == "code" and not p.reason
            and p.response is not None]
    with ThreadPoolExecutor(max_workers=max(1, workers or 2)) as pool:
        futures = {i: pool.submit(_run, plans[i], limits) for i in code}
        for i, p in enumerate(plans):
            if i not in futures:
                results[i] = _run(p, limits)
                tick()
        for i, fut in futures.items():
            results[i] = fut.result()
            tick()
    final = [r for r in results if r is not None]
    return _report(final, fname, threshold, preset, time.perf_counter() - t0)


def _report(results: list[RowResult], data: str | None, threshold: float | None,
            preset: str, seconds: float) -> VerifiabilityReport:
    n = len(results)
    ok = [r for r in results if r.verifiable]
    checked = [r for r in ok if r.passed is not None]
    passed = sum(1 for r in checked if r.passed)
    share = len(ok) / n
    by = Counter(r.verifier for r in ok)
    why = Counter(_reason_key(r.reason) for r in results if not r.verifiable)
    detail = (f"{len(ok)} of {n} rows verifiable ("
              + (", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "none") + ")")
    overrides = {} if threshold is None else {RLVR_GATE: float(threshold)}
    gate = Thresholds(preset=preset, overrides=overrides).evaluate(  # type: ignore[arg-type]
        RLVR_GATE, share, detail=detail, remedy_context={"data": data or "DATA"})
    scores = [r.score for r in checked if r.score is not None]
    return VerifiabilityReport(
        data=data, rows=n, verifiable=len(ok), share_verifiable=share,
        by_verifier=dict(sorted(by.items())), not_verifiable=dict(why.most_common()),
        checked=len(checked), passed=passed,
        pass_rate=passed / len(checked) if checked else None,
        mean_score=sum(scores) / len(scores) if scores else None,
        gate=gate, status="pass" if gate.status == "pass" else "fail",
        seconds=round(seconds, 3), results=results)


def _reason_key(reason: str) -> str:
    """A reason without its row-specific part (for the histogram)."""
    if reason.startswith("instruction '") and "not supported" in reason:
        return "an instruction id is not supported"
    if reason.startswith("math-verify cannot parse"):
        return "math-verify cannot parse the answer"
    if reason.startswith("tests: SyntaxError"):
        return "tests have a syntax error"
    return reason


def read_verify_rows(path: str | Path) -> tuple[list[Any], list[int]]:
    """(rows, line numbers) of a JSONL (physical lines), JSON array or Parquet file
    (row index + 1). Raises :class:`~realign.errors.InputError` naming file and line."""
    from .data import detect_format, read_row_file

    p = Path(path)
    if p.is_dir() and detect_format(p) == "dataset":
        raise InputError("a saved datasets folder: export it to .jsonl or .parquet for "
                         "realign verify", file=p)
    f = read_row_file(p)
    return f.rows, f.lines


def verify_file(path: str | Path, **kwargs: Any) -> VerifiabilityReport:
    """:func:`verify_rows` on a file (:func:`read_verify_rows`)."""
    rows, lines = read_verify_rows(path)
    return verify_rows(rows, lines=lines, file=path, **kwargs)
