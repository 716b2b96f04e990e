"""Generate the sample preference set shipped in examples/ (deterministic, seed 0).

Source: written for this repository by this script; no third-party text. Licence: the
repository's (Apache-2.0). The pairs teach a simple, checkable preference: a correct,
direct answer (chosen) over a wrong or evasive one (rejected), on arithmetic, unit
conversion, capitals and word facts. Lengths are mixed on purpose (the chosen answer
is not always the longer one) so the length-bias gate is meaningful. Each row carries a
``reference`` answer (the number or the city) that stage 7's verifier checks when it
judges the win rate. A handful of
problems are planted so `realign validate` has something to find: 3 duplicate rows,
2 identical pairs, 1 empty response and 2 pairs that copy an item of examples/eval.jsonl
(one verbatim inside a longer prompt, one lower-cased with a number spelled out). The
capital questions also repeat naturally (a small template space), so expect more
duplicates than the three planted ones.

Run: python examples/make_sample.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Chile", "Santiago"),
            ("Spain", "Madrid"), ("India", "New Delhi"), ("Italy", "Rome"), ("Ghana", "Accra")]
WRONG = ["I am not sure.", "Probably somewhere in Europe.", "That is hard to say."]


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
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


def capital(rng: random.Random) -> dict:
    country, city = rng.choice(CAPITALS)
    other = rng.choice([c for _, c in CAPITALS if c != city])
    style = rng.choice(["short", "sentence"])
    prompt = rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}.",
                         f"Which city is the capital of {country}? Reply briefly."])
    chosen = city if style == "short" else f"The capital of {country} is {city}."
    rejected = rng.choice([f"The capital of {country} is {other}, a large and well known city.",
                           rng.choice(WRONG)])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "reference": city,
            "score_chosen": rng.choice([8, 9, 10]), "score_rejected": rng.choice([1, 2, 3, 4])}


def conversion(rng: random.Random) -> dict:
    km = rng.randint(1, 500)
    prompt = f"How many meters are in {km} kilometers?"
    chosen = rng.choice([f"{km * 1000} meters.", f"There are {km * 1000} meters in {km} kilometers."])
    rejected = rng.choice([f"{km * 100} meters.", f"About {km * 10} meters, since a kilometer is ten meters."])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "reference": str(km * 1000),
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
    makers = [arithmetic, capital, conversion]
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
