"""Generate the sample preference set shipped in examples/ (deterministic, seed 0).

Source: written for this repository by this script; no third-party text. Licence: the
repository's (Apache-2.0). The pairs teach a simple, checkable preference: a correct,
direct answer (chosen) over a wrong or evasive one (rejected), on arithmetic, unit
conversion (kilometres to metres, kilograms to grams) and word facts (how many letters
a word has, a word spelled backwards). Lengths are mixed on purpose (the chosen answer
is not always the longer one) so the length-bias gate is meaningful. Scores are on a
1-10 scale (chosen 8-10, rejected 1-4) and use both ends of it. Each row carries a
``reference`` answer (a number or a word) that stage 7's verifier checks when it
judges the win rate.

Clean of its own benchmarks: examples/run.yaml evaluates the shipped suites
realign_knowledge, realign_arith and realign_format (stages 1 and 7), and stage 2
decontaminates against them. No pair asks or answers one of their items: there are no
capital, chemical-symbol or everyday-fact questions, and no arithmetic problem uses the
two numbers of a realign_arith item (read from lib/suites/data/arith.jsonl). The
regenerated file is checked: 0 pairs contain an item of the three suites.

A handful of problems are planted so `realign validate` has something to find: 3
duplicate rows (lines 11, 21 (upper-cased), 31), 2 identical pairs (line 41; line 51,
which differs only by spaces), 1 empty response (line 61) and 2 pairs that copy an item
of examples/eval.jsonl (line 71 verbatim inside a longer prompt, line 81 lower-cased
with a number spelled out). Many more duplicates occur naturally (119 besides the three
planted ones: the word-fact questions come from a small template space), so 1,073 of the
1,200 pairs are usable.

Run: python examples/make_sample.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
ARITH_SUITE = HERE.parent / "lib" / "suites" / "data" / "arith.jsonl"

WORDS = ["garden", "window", "pencil", "river", "basket", "candle", "ladder", "mirror",
         "rocket", "saddle", "tunnel", "velvet", "wagon", "anchor", "blanket", "button",
         "cactus", "dragon", "feather", "guitar", "hammer", "island", "jacket", "kettle",
         "lantern", "marble", "needle", "orchard", "parrot", "quilt", "ribbon", "sandal",
         "teapot", "umbrella", "violin", "walnut", "yogurt", "zipper", "biscuit", "compass"]
EVASIVE = ["I am not sure.", "That depends on how you count.", "Hard to say without a dictionary."]


def _suite_number_pairs() -> set[tuple[int, int]]:
    """The two numbers of every realign_arith item ("What is 39 + 7?" -> (39, 7))."""
    pairs = set()
    for line in ARITH_SUITE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            nums = [int(x) for x in re.findall(r"\d+", json.loads(line)["question"])]
            pairs.add((nums[0], nums[1]))
    return pairs


SUITE_PAIRS = _suite_number_pairs()


def arithmetic(rng: random.Random) -> dict:
    while True:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if (a, b) not in SUITE_PAIRS:
            break
    op = rng.choice(["+", "-", "*"])
    val = {"+": a + b, "-": a - b, "*": a * b}[op]
    prompt = f"What is {a} {op} {b}? Answer with the number."
    if rng.random() < 0.5:
        chosen, rejected = f"{val}", f"The answer is {val + rng.choice([-2, -1, 1, 3])}, I believe."
    else:
        chosen = f"{a} {op} {b} = {val}. So the answer is {val}."
        rejected = f"{val + rng.choice([-10, 1, 7])}"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "reference": str(val),
            "score_chosen": rng.choice([8, 9, 10]), "score_rejected": rng.choice([1, 2, 3])}


def letters(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    n = len(word)
    prompt = rng.choice([f"How many letters does the word '{word}' have?",
                         f"Count the letters in '{word}'. Reply with the number only."])
    chosen = rng.choice([f"{n}", f"The word '{word}' has {n} letters."])
    wrong = n + rng.choice([-2, -1, 1, 2])
    rejected = rng.choice([f"{wrong}", f"It has {wrong} letters, counting carefully.",
                           rng.choice(EVASIVE)])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "reference": str(n),
            "score_chosen": rng.choice([8, 9, 10]), "score_rejected": rng.choice([1, 2, 3, 4])}


def backwards(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    rev = word[::-1]
    prompt = rng.choice([f"Spell the word '{word}' backwards.",
                         f"Write '{word}' with its letters in reverse order."])
    chosen = rng.choice([rev, f"Backwards, '{word}' is {rev}."])
    scrambled = rev[1:] + rev[0]
    rejected = rng.choice([scrambled, f"Reversed it reads {word}, the same as before.",
                           rng.choice(EVASIVE)])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "reference": rev,
            "score_chosen": rng.choice([8, 9, 10]), "score_rejected": rng.choice([1, 2, 3, 4])}


def conversion(rng: random.Random) -> dict:
    n = rng.randint(1, 500)
    unit, small = rng.choice([("kilometers", "meters"), ("kilograms", "grams")])
    prompt = f"How many {small} are in {n} {unit}?"
    chosen = rng.choice([f"{n * 1000} {small}.", f"There are {n * 1000} {small} in {n} {unit}."])
    rejected = rng.choice([f"{n * 100} {small}.",
                           f"About {n * 10} {small}, since one of them is ten {small}."])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "reference": str(n * 1000),
            "score_chosen": rng.choice([8, 9, 10]), "score_rejected": rng.choice([1, 2, 3])}


EVAL_ITEMS = [
    "A train leaves the station at 3 pm travelling at 60 miles per hour; how far has it gone by 5 pm?",
    "Which gas do plants absorb from the atmosphere during photosynthesis to build sugars?",
    "If a rectangle has a length of 12 centimeters and a width of 5 centimeters, what is its area?",
    "Name the largest ocean on Earth and the continent that borders it on the west side.",
    "Translate the English sentence 'the cat sleeps on the warm windowsill' into simple French.",
]


def main() -> None:
    rng = random.Random(0)
    makers = [arithmetic, letters, backwards, conversion]
    rows = [rng.choice(makers)(rng) for _ in range(1200)]
    # planted problems
    rows[10] = dict(rows[3])  # duplicate of row 4 (line 11)
    rows[20] = dict(rows[5], prompt=rows[5]["prompt"].upper())  # duplicate up to case (line 21)
    rows[30] = dict(rows[7])  # duplicate (line 31)
    rows[40] = dict(rows[40], rejected=rows[40]["chosen"])  # identical (line 41)
    rows[50] = dict(rows[50], rejected=" " + rows[50]["chosen"] + "  ")  # identical up to spaces
    rows[60] = dict(rows[60], rejected="   ")  # empty (line 61)
    rows[70] = dict(rows[70], prompt="Quick question: " + EVAL_ITEMS[1])  # contaminated (line 71)
    rows[80] = dict(rows[80], prompt=EVAL_ITEMS[2].replace("12", "twelve").lower())  # edited copy
    with open(HERE / "pairs.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(HERE / "eval.jsonl", "w", encoding="utf-8") as fh:
        for q in EVAL_ITEMS:
            fh.write(json.dumps({"question": q}) + "\n")


if __name__ == "__main__":
    main()
