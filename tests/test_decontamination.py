"""Decontamination: the documented rule, the eval-set readers, and a quality check.

The quality check uses ``tests/data/stdlib_paragraphs.json``: 677 paragraphs (15-60
words, no digits) of Python standard-library docstrings, deduplicated so that no two
share a 6-word run or are near copies. 300 are evaluation items; lightly edited copies
of them must be caught (recall >= 0.95), the other paragraphs (same topics: files,
processes, sockets, parsing...) must not be flagged, alone or five in a row.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from realign.decontamination import (
    DecontamConfig,
    EvalSet,
    NgramIndex,
    iter_scan,
    load_eval_set,
    normalize_text,
)
from realign.errors import InputError

CORPUS = json.loads((Path(__file__).parent / "data" / "stdlib_paragraphs.json").read_text())[
    "paragraphs"]

ITEM = ("If a rectangle has a length of 12 centimeters and a width of 5 centimeters, "
        "what is its area in square centimeters?")


def index_of(*texts: str, **cfg: float) -> NgramIndex:
    return NgramIndex([EvalSet("eval", list(texts), list(range(1, len(texts) + 1)))],
                      DecontamConfig(**cfg))


def flagged(index: NgramIndex, docs: list[str]) -> dict[int, int]:
    return {h.doc: h.item_line for h in iter_scan(index, docs)}


def test_normalize_text() -> None:
    out = normalize_text(pa.array(["  Hello,   WORLD!! ﬁne\tthings—ok ", "Ünïcode ＡＢＣ"]))
    assert out.to_pylist() == ["hello world fine things ok", "ünïcode abc"]


def test_rule_verbatim_edited_embedded_and_numbers() -> None:
    idx = index_of(ITEM, "Which gas do plants absorb from the atmosphere during photosynthesis?")
    docs = [
        ITEM,  # verbatim
        ITEM.upper().replace(",", " ;").replace(" ", "   "),  # case/punct/whitespace
        ITEM.replace("rectangle", "box").replace("width", "breadth"),  # 2 words changed
        "Please solve this. " + ITEM + " Show your work step by step, then state the answer.",
        ITEM.replace("12", "twelve"),  # number written in words: the same problem
        ITEM.replace("12", "7").replace("5 ", "3 "),  # same template, other numbers
        "A rectangle is a quadrilateral with four right angles; its area is length times "
        "width, measured in square units such as square centimeters.",  # same topic
        "which GAS do plants absorb from the atmosphere during photosynthesis",
    ]
    got = flagged(idx, docs)
    assert got == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 7: 2}


def test_coverage_values_and_short_items() -> None:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    idx = index_of(" ".join(words))
    # one changed word in the middle uncovers exactly that word
    edited = words.copy()
    edited[5] = "omega"
    (hit,) = iter_scan(idx, [" ".join(edited)])
    assert hit.coverage == pytest.approx(9 / 10)
    # changes 3 apart uncover the two words between them as well
    words14 = words + ["lambda", "mu", "nu", "xi"]
    edited = words14.copy()
    edited[4], edited[7] = "psi", "chi"
    (hit,) = iter_scan(index_of(" ".join(words14)), [" ".join(edited)])
    assert hit.coverage == pytest.approx(10 / 14)
    edited[10] = "rho"  # a third change: 7 of 14 covered, under 0.6
    assert iter_scan(index_of(" ".join(words14)), [" ".join(edited)]) == []
    # pieces that do not line up do not add up: each window holds at most 4 of 10 words
    filler = " ".join(["filler"] * 30)
    scattered = f"{' '.join(words[:4])} {filler} {' '.join(words[4:7])} {filler} " \
                f"{' '.join(words[7:])}"
    assert iter_scan(idx, [scattered]) == []
    # while a few inserted words keep the copy in one window
    inserted = " ".join(words[:4] + ["really", "quite"] + words[4:])
    assert iter_scan(idx, [inserted])[0].coverage == pytest.approx(1.0)
    # items shorter than n words match only whole; under min_item_words only as a whole
    # text or sentence (exact match, issue 13 item 2); items without words not at all
    short = index_of("red apples", "hi", "?!", ngram=3, min_item_words=2)
    assert short.skipped_items == 1 and short.n_checked == 2
    assert short.method_counts == {"ngram": 0, "whole": 1, "exact": 1}
    assert flagged(short, ["I like red apples a lot", "red and apples", "hi there",
                           "Well. Hi!"]) == {0: 1, 3: 2}


def test_template_ngrams_are_not_indexed() -> None:
    template = "Which of the following statements best describes the"
    items = [f"{template} topic number {w} here" for w in
             "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()]
    idx = index_of(*items, max_item_df=5)
    doc = f"{template} weather today in the mountains"
    assert flagged(idx, [doc]) == {}
    assert flagged(idx, [items[3]]) == {0: 4}


def test_fields_are_separate_texts() -> None:
    idx = index_of("one two three four five six seven eight nine ten")
    prompt = pa.array(["one two three four five", "x"])
    chosen = pa.array(["six seven eight nine ten", "one two three four five six seven eight nine ten"])
    hits = idx.scan_fields([prompt, chosen, pa.array(["", ""])])
    assert [h.doc for h in hits] == [1]


def _edit_words(text: str, k: int, rng: random.Random, vocab: list[str]) -> str:
    w = text.split()
    for p in rng.sample(range(len(w)), k):
        w[p] = rng.choice(vocab)
    return " ".join(w)


def _case_punct(text: str, rng: random.Random) -> str:
    t = text.upper() if rng.random() < 0.5 else text.lower()
    t = re.sub(r"[,;:!?]", lambda _: rng.choice(["", " ,", "!", "  "]), t)
    return re.sub(" ", lambda _: rng.choice([" ", "  ", "\n", " \t "]), t)


def test_quality_recall_and_false_positives_fixed_seed() -> None:
    rng = random.Random(20261127)
    paras = CORPUS.copy()
    rng.shuffle(paras)
    items, rest = paras[:300], paras[300:]
    vocab = sorted({w.strip(".,;:()") for p in paras for w in p.split()} - {""})
    idx = NgramIndex([EvalSet("eval", items, list(range(1, 301)))])
    kinds = ("verbatim", "casepunct", "2words", "3words", "embedded", "embedded+2words")
    docs, truth, kind_of = [], [], []
    for i, item in enumerate(items):
        for kind in kinds:
            if kind == "verbatim":
                t = item
            elif kind == "casepunct":
                t = _case_punct(item, rng)
            elif kind in ("2words", "3words"):
                t = _edit_words(item, int(kind[0]), rng, vocab)
            elif kind == "embedded":
                t = f"{rng.choice(rest)} {item} {rng.choice(rest)}"
            else:
                t = f"{rng.choice(rest)} Consider: {_edit_words(item, 2, rng, vocab)} Thanks."
            docs.append(t)
            truth.append(i + 1)
            kind_of.append(kind)
    got = flagged(idx, docs)
    correct = [got.get(d) == truth[d] for d in range(len(docs))]
    recall = sum(correct) / len(docs)
    per_kind = {k: sum(c for c, kk in zip(correct, kind_of) if kk == k) / 300 for k in kinds}
    assert recall >= 0.95, per_kind
    assert per_kind["verbatim"] == 1.0 and per_kind["embedded"] == 1.0
    assert per_kind["2words"] >= 0.98 and per_kind["3words"] >= 0.95, per_kind
    # negatives: unrelated paragraphs on the same topics, alone and five in a row
    negatives = rest + [" ".join(rest[j: j + 5]) for j in range(0, len(rest) - 5, 3)]
    assert flagged(idx, negatives) == {}


# ---------------------------------------------------------------- evaluation set files
EVAL_ROWS = [{"id": 1, "question": "Which gas do plants absorb during photosynthesis?"},
             {"id": 2, "question": "Name the largest ocean on Earth."}]


def test_eval_readers_agree(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(r) for r in EVAL_ROWS[:1]) + "\n\n"
                                      + json.dumps(EVAL_ROWS[1]) + "\n")
    (tmp_path / "e.json").write_text(json.dumps(EVAL_ROWS))
    pq.write_table(pa.Table.from_pylist(EVAL_ROWS), tmp_path / "e.parquet")
    (tmp_path / "e.txt").write_text("\n".join(r["question"] for r in EVAL_ROWS) + "\n")
    texts = [r["question"] for r in EVAL_ROWS]
    assert load_eval_set(tmp_path / "e.jsonl").lines == [1, 3]
    for name in ("e.jsonl", "e.json", "e.parquet", "e.txt"):
        assert load_eval_set(tmp_path / name).texts == texts, name
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(EVAL_ROWS)}).save_to_disk(
        str(tmp_path / "ds"))
    assert load_eval_set(tmp_path / "ds").texts == texts


def test_eval_field_and_messages(tmp_path: Path) -> None:
    rows = [{"prompt": "ignored prompt", "body": "the real item text"},
            {"messages": [{"role": "user", "content": "hello there"}]}]
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_eval_set(tmp_path / "e.jsonl").texts == ["ignored prompt", "hello there"]
    with pytest.raises(InputError) as ei:
        load_eval_set(tmp_path / "e.jsonl", field="body")
    assert (ei.value.line, ei.value.field) == (2, "body")
    (tmp_path / "b.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert load_eval_set(tmp_path / "b.jsonl", field="body").texts == ["the real item text"]


@pytest.mark.parametrize(("content", "line", "what"), [
    (b'{"question": "a b c"}\n{oops\n', 2, "malformed JSON"),
    (b'{"answer": "x"}\n', 1, "no text field"),
    (b'', None, "empty"),
    (b'{"question": "a"}\n{"question": "\xff"}\n', 2, "UTF-8"),
])
def test_eval_bad_input(tmp_path: Path, content: bytes, line: int | None, what: str) -> None:
    p = tmp_path / "e.jsonl"
    p.write_bytes(content)
    with pytest.raises(InputError) as ei:
        load_eval_set(p)
    assert ei.value.line == line and what in ei.value.message
    with pytest.raises(InputError, match="not found"):
        load_eval_set(tmp_path / "missing.jsonl")


def test_word_hashes_match_a_python_split() -> None:
    """realign.text_hash splits bytes exactly as str.split/normalize_text would."""
    from realign.decontamination import text_word_hashes
    from realign.text_hash import word_hashes

    rng = random.Random(0)
    alpha = "abcXYZ019 \t\n.,-éß\x00"
    rows = ["".join(rng.choice(alpha) for _ in range(rng.randint(0, 40))) for _ in range(2000)]
    arr = pa.array(rows + ["", "a" * 30, "A" * 30 + " b", None])
    for part in (arr, arr.slice(7, 1500), arr.slice(5, 0)):
        py = part.to_pylist()
        for got, expected in (
            (word_hashes(part, "space_lower"),
             [[w for w in re.split(r"[ \t\n\v\f\r]+", (r or "").lower()) if w] for r in py]),
            (text_word_hashes(part),
             [(t or "").split() for t in normalize_text(part).to_pylist()] if len(part) else []),
        ):
            assert got.counts.tolist() == [len(e) for e in expected]
            seen: dict[str, int] = {}
            for word, h in zip([w for e in expected for w in e], got.hashes.tolist()):
                assert seen.setdefault(word, h) == h  # same word, same hash
            assert len(set(seen.values())) == len(seen)  # different words, different hashes


# ------------------------------------------------------------ numbers, code, zero width
def test_numbers_must_lie_inside_the_matched_window() -> None:
    """A short item's numbers must be covered by the aligned match, not merely occur
    somewhere: "What is 9 * 80?" does not contain "What is 9 + 9?" (it used to: 3 of 4
    words covered, and the 9 occurs)."""
    idx = index_of("What is 9 + 9?", "What is 3 times 3?", "What is 36 + 44?")
    docs = ["What is 9 * 80? Answer with the number.", "What is 3 - 31?",
            "What is 36 * 2 and 44?", "Quick: what is 9 + 9? Then stop.",
            "what is three times three"]
    assert flagged(idx, docs) == {3: 1, 4: 2}


CODE_ITEMS = [
    '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
''',
    '''

def strlen(string: str) -> int:
    """ Return length of given string
    >>> strlen('')
    0
    >>> strlen('abc')
    3
    """
''',
    '''

def greatest_common_divisor(a: int, b: int) -> int:
    """ Return a greatest common divisor of two integers a and b
    >>> greatest_common_divisor(3, 5)
    1
    >>> greatest_common_divisor(25, 15)
    5
    """
''',
    '''

def count_vowels(word: str) -> int:
    """ Return how many vowels (a, e, i, o, u) the given word contains
    >>> count_vowels('banana')
    3
    >>> count_vowels('sky')
    0
    """
''',
    '''

def sum_of_squares(values: list) -> int:
    """ Return the sum of the squares of the given integers
    >>> sum_of_squares([1, 2, 3])
    14
    >>> sum_of_squares([])
    0
    """
''',
]
RENAMED = [("has_close_elements", "any_two_near"), ("strlen", "text_size"),
           ("greatest_common_divisor", "gcd_of"), ("count_vowels", "vowel_total"),
           ("sum_of_squares", "square_total")]


def _rename(text: str, old: str, new: str) -> str:
    return re.sub(rf"\b{old}\b", new, text)


def test_code_copied_with_its_function_renamed_is_the_same_item() -> None:
    """Issue 13 item 3: identifiers in code are masked on both sides, so a renamed copy
    (doctests included) covers the item (before: the short ones were missed)."""
    idx = index_of(*CODE_ITEMS)
    assert idx.mask_code
    copies = [_rename(t, a, b) for t, (a, b) in zip(CODE_ITEMS, RENAMED)]
    assert all(a not in c and b in c for c, (a, b) in zip(copies, RENAMED))
    copies.append(_rename(copies[0], "numbers", "values"))  # a parameter renamed too
    copies.append("Complete this function.\n```python" + copies[2] + "```\nThanks!")
    got = {h.doc: (h.item_line, h.coverage) for h in iter_scan(idx, copies)}
    assert {d: line for d, (line, _) in got.items()} == {0: 1, 1: 2, 2: 3, 3: 4, 4: 5, 5: 1,
                                                           6: 3}
    assert all(cov >= 0.9 for _, cov in got.values())


def test_unrelated_code_in_the_same_style_is_not_flagged() -> None:
    for i, item in enumerate(CODE_ITEMS):
        idx = index_of(item)
        others = [_rename(t, a, b) for j, (t, (a, b)) in enumerate(zip(CODE_ITEMS, RENAMED))
                  if j != i]
        assert iter_scan(idx, others) == [], i
    # prose items never turn masking on (documents are then scanned as before)
    assert not index_of(ITEM).mask_code


def test_zero_width_characters_do_not_hide_an_item() -> None:
    idx = index_of(ITEM)
    hidden = " ".join(w[:1] + "\u200b" + w[1:] if len(w) > 3 else w for w in ITEM.split())
    hidden = hidden.replace("width", "wi\u2060dth")
    assert flagged(idx, [hidden]) == {0: 1}
