"""IFEval-style instruction checks (the ``instructions`` verifier).

The instruction ids and their keyword arguments are those of IFEval (Zhou et al. 2023,
``google-research/instruction_following_eval``, the set ``lm-eval``'s ``ifeval`` task and
``if-verifiable`` ship). Written here on purpose rather than imported: both packaged
implementations call NLTK's ``punkt`` sentence model, which must be downloaded at run time
(and ``if-verifiable`` also pulls in ``datasets``); this module needs nothing beyond the
standard library. Differences from the reference, all documented in
``docs/preference-data-generation.md``:

* sentences are split by a rule (end punctuation followed by space, not after common
  abbreviations, initials or decimal points), not by the ``punkt`` model;
* words for ``capital_word_frequency`` are runs of letters/digits joined by ``-`` or ``'``
  (NLTK's ``word_tokenize`` without its model);
* keywords are matched literally (case-insensitive), not as regular expressions;
* ``english_capital`` / ``english_lowercase`` check the letter case only: no maintained
  offline language detector is a dependency, so "in English" is not checked;
* ``language:response_language`` uses ``lingua-language-detector`` (maintained, offline;
  ``pip install 'realign[lang]'``) instead of the unmaintained ``langdetect``; without it
  the instruction cannot be checked and the row counts as not verifiable. A response whose
  language cannot be detected fails (IFEval counts it as followed).

:func:`check_instructions` returns one pass/fail per instruction (IFEval's "strict"
instruction-level accuracy); a row passes when all pass.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = ["INSTRUCTION_IDS", "InstructionError", "check_instructions", "count_sentences",
           "count_words", "language_detector_available", "split_sentences",
           "validate_instruction"]

RELATIONS = ("less than", "at least")
_CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


class InstructionError(ValueError):
    """A bad instruction: ``field`` is the kwarg (or ``id``) at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


# ----------------------------------------------------------------------------- text units

_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "eg", "ie",
           "inc", "ltd", "co", "corp", "no", "fig", "al", "approx", "dept", "est", "jan",
           "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+|\n\s*\n")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ``.``, ``!`` or ``?`` (and closing quotes or
    brackets) followed by white space, or at a blank line; not after an abbreviation
    (``Dr.``, ``e.g.``), a single initial (``J.``) or inside a number (``3.5``)."""
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        if m.group(0)[0] == ".":
            before = re.search(r"([A-Za-z][A-Za-z.]*)$", text[start:m.start()])
            word = before.group(1).replace(".", "").lower() if before else ""
            if word and (word in _ABBREV or len(word) == 1):
                continue
        chunk = text[start:m.end()].strip()
        if chunk:
            out.append(chunk)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


_WORD = re.compile(r"\w+")
_TOKEN = re.compile(r"\w+(?:[-'’]\w+)*")


def count_words(text: str) -> int:
    """Runs of word characters (IFEval's ``RegexpTokenizer(r"\\w+")``)."""
    return len(_WORD.findall(text))


def _compare(count: int, relation: str, n: int) -> bool:
    return count < n if relation == "less than" else count >= n


# ----------------------------------------------------------------------------- checkers


def _existence(r: str, p: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), r, flags=re.IGNORECASE) for k in keywords)


def _frequency(r: str, p: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(re.escape(keyword), r, flags=re.IGNORECASE)), relation,
                    frequency)


def _forbidden(r: str, p: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE)
                   for w in forbidden_words)


def _letter_frequency(r: str, p: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(collections.Counter(r.lower())[letter.lower()], let_relation, let_frequency)


def _language(r: str, p: str, language: str) -> bool:
    detector = _detector()
    if detector is None:  # validate_instruction rejects the row first; this is a guard
        raise InstructionError("language", "needs lingua-language-detector")
    found = detector.detect_language_of(r)
    if found is None:  # IFEval counts an undetectable language as followed; here it fails
        return False
    return found.iso_code_639_1.name.lower() == language.lower()


def _number_sentences(r: str, p: str, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(r), relation, num_sentences)


def _number_paragraphs(r: str, p: str, num_paragraphs: int) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", r)
    n = len(paragraphs)
    for i, para in enumerate(paragraphs):
        if not para.strip():
            if i in (0, len(paragraphs) - 1):
                n -= 1
            else:
                return False
    return n == num_paragraphs


def _number_words(r: str, p: str, num_words: int, relation: str) -> bool:
    return _compare(count_words(r), relation, num_words)


def _nth_paragraph_first_word(r: str, p: str, num_paragraphs: int, nth_paragraph: int,
                              first_word: str) -> bool:
    paragraphs = re.split(r"\n\n", r)
    n = sum(1 for para in paragraphs if para.strip())
    if nth_paragraph > n:
        return False
    para = paragraphs[nth_paragraph - 1].strip()
    if not para:
        return False
    word = para.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return n == num_paragraphs and first == first_word.lower()


def _placeholders(r: str, p: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= num_placeholders


def _postscript(r: str, p: str, postscript_marker: str) -> bool:
    value = r.lower()
    if postscript_marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif postscript_marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(postscript_marker.lower()) + r".*$"
    return bool(re.findall(pattern, value, flags=re.MULTILINE))


def _bullets(r: str, p: str, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def _constrained(r: str, p: str) -> bool:
    value = r.strip()
    return any(option in value for option in _CONSTRAINED)


def _highlights(r: str, p: str, num_highlights: int) -> bool:
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r)
             if h.removeprefix("**").removesuffix("**").strip())
    return n >= num_highlights


def _sections(r: str, p: str, section_spliter: str, num_sections: int) -> bool:
    parts = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", r)
    return len(parts) - 1 >= num_sections


def _json(r: str, p: str) -> bool:
    value = (r.strip().removeprefix("```json").removeprefix("```Json")
             .removeprefix("```JSON").removeprefix("```").removesuffix("```").strip())
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _title(r: str, p: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _two_responses(r: str, p: str) -> bool:
    valid = []
    parts = r.split("******")
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _repeat_prompt(r: str, p: str, prompt_to_repeat: str) -> bool:
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _end_checker(r: str, p: str, end_phrase: str) -> bool:
    return r.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _quotation(r: str, p: str) -> bool:
    value = r.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def _capital_word_frequency(r: str, p: str, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(sum(1 for w in _TOKEN.findall(r) if w.isupper()), capital_relation,
                    capital_frequency)


def _english_capital(r: str, p: str) -> bool:
    return r.isupper()


def _english_lowercase(r: str, p: str) -> bool:
    return r.islower()


def _no_comma(r: str, p: str) -> bool:
    return "," not in r


@dataclass(frozen=True)
class _Spec:
    fn: Callable[..., bool]
    kwargs: Mapping[str, type]  # every kwarg is required (as in IFEval's prompts)


_S, _I, _L = str, int, list
_SPECS: dict[str, _Spec] = {
    "keywords:existence": _Spec(_existence, {"keywords": _L}),
    "keywords:frequency": _Spec(_frequency, {"keyword": _S, "frequency": _I, "relation": _S}),
    "keywords:forbidden_words": _Spec(_forbidden, {"forbidden_words": _L}),
    "keywords:letter_frequency": _Spec(_letter_frequency, {"letter": _S, "let_frequency": _I,
                                                           "let_relation": _S}),
    "language:response_language": _Spec(_language, {"language": _S}),
    "length_constraints:number_sentences": _Spec(_number_sentences, {"num_sentences": _I,
                                                                      "relation": _S}),
    "length_constraints:number_paragraphs": _Spec(_number_paragraphs, {"num_paragraphs": _I}),
    "length_constraints:number_words": _Spec(_number_words, {"num_words": _I, "relation": _S}),
    "length_constraints:nth_paragraph_first_word": _Spec(
        _nth_paragraph_first_word, {"num_paragraphs": _I, "nth_paragraph": _I,
                                    "first_word": _S}),
    "detectable_content:number_placeholders": _Spec(_placeholders, {"num_placeholders": _I}),
    "detectable_content:postscript": _Spec(_postscript, {"postscript_marker": _S}),
    "detectable_format:number_bullet_lists": _Spec(_bullets, {"num_bullets": _I}),
    "detectable_format:constrained_response": _Spec(_constrained, {}),
    "detectable_format:number_highlighted_sections": _Spec(_highlights, {"num_highlights": _I}),
    "detectable_format:multiple_sections": _Spec(_sections, {"section_spliter": _S,
                                                             "num_sections": _I}),
    "detectable_format:json_format": _Spec(_json, {}),
    "detectable_format:title": _Spec(_title, {}),
    "combination:two_responses": _Spec(_two_responses, {}),
    "combination:repeat_prompt": _Spec(_repeat_prompt, {"prompt_to_repeat": _S}),
    "startend:end_checker": _Spec(_end_checker, {"end_phrase": _S}),
    "startend:quotation": _Spec(_quotation, {}),
    "change_case:capital_word_frequency": _Spec(_capital_word_frequency,
                                                {"capital_frequency": _I,
                                                 "capital_relation": _S}),
    "change_case:english_capital": _Spec(_english_capital, {}),
    "change_case:english_lowercase": _Spec(_english_lowercase, {}),
    "punctuation:no_comma": _Spec(_no_comma, {}),
}

#: Every instruction id this module checks (IFEval's 25).
INSTRUCTION_IDS: tuple[str, ...] = tuple(_SPECS)


@lru_cache(maxsize=1)
def _detector() -> Any:
    try:
        from lingua import LanguageDetectorBuilder
    except ImportError:
        return None
    return LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()


def language_detector_available() -> bool:
    """Whether ``lingua-language-detector`` is installed (``language:response_language``)."""
    try:
        import lingua  # noqa: F401
    except ImportError:
        return False
    return True


def validate_instruction(inst_id: str, kwargs: Mapping[str, Any]) -> dict[str, Any] | str:
    """The kwargs ``check_instructions`` will pass, or a reason string when the instruction
    cannot be checked here (an unknown id, a language without the detector). Raises
    :class:`InstructionError` (naming the kwarg) for kwargs of the wrong type or value.
    ``None`` values are dropped first (the IFEval data set pads kwargs with nulls)."""
    spec = _SPECS.get(inst_id)
    if spec is None:
        return f"instruction '{inst_id}' is not supported"
    if inst_id == "language:response_language" and not language_detector_available():
        return ("instruction 'language:response_language' needs lingua-language-detector "
                "(pip install 'realign[lang]')")
    given = {k: v for k, v in kwargs.items() if v is not None}
    extra = sorted(set(given) - set(spec.kwargs))
    if extra:
        raise InstructionError(extra[0], f"unknown kwarg for '{inst_id}' (expected: "
                               f"{', '.join(spec.kwargs) or 'none'})")
    out: dict[str, Any] = {}
    for name, typ in spec.kwargs.items():
        if name not in given:
            raise InstructionError(name, f"missing (required by '{inst_id}')")
        value = given[name]
        if typ is int:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    isinstance(value, float) and not value.is_integer()):
                raise InstructionError(name, f"expected an integer, got {value!r}")
            value = int(value)
            if value < 0:
                raise InstructionError(name, f"must be ≥ 0, got {value}")
        elif typ is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(w, str) and w for w in value):
                raise InstructionError(name, "expected a list of non-empty strings")
        elif not isinstance(value, str) or not value:
            raise InstructionError(name, f"expected a non-empty string, got {value!r}")
        if name.endswith("relation") and value not in RELATIONS:
            raise InstructionError(name, f"expected 'less than' or 'at least', got {value!r}")
        if name == "letter" and len(value) != 1:
            raise InstructionError(name, f"expected one letter, got {value!r}")
        if name == "nth_paragraph" and value < 1:
            raise InstructionError(name, "must be ≥ 1")
        out[name] = value
    return out


def check_instructions(response: str, prompt: str,
                       instructions: list[tuple[str, dict[str, Any]]]) -> list[bool]:
    """One bool per (id, validated kwargs) instruction: whether ``response`` follows it."""
    return [_SPECS[i].fn(response, prompt, **kw) for i, kw in instructions]
