"""Generate the verifiable prompt set of ``realign run`` with no arguments (deterministic).

Writes ``lib/default_data/sentiment.jsonl``: short product, place and service reviews,
each asking "Is this review positive or negative? Answer with one word." with the
reference ``answer`` ``positive`` or ``negative`` (the ``exact`` verifier checks the
response's final answer). Half are positive and half negative, so a policy that gives one
answer to every prompt scores 0.5: a gain above that needs the label right.

Source: written for this repository by this script from the word lists below; no
third-party text. Licence: the repository's (Apache-2.0).

Why this task (measured on SmolLM2-135M-Instruct, 24 prompts x 4 samples each, see
docs/iterative-training.md#the-default-run): the model's greedy answers pass on about
40% of the prompts and its samples disagree with each other on about 40% of them, so
best-vs-worst pairing finds pairs; arithmetic samples almost never pass, and a check
on the answer's form alone (ends with a word) is gamed within 20 DPO steps.

Clean of the run's benchmarks: the default run evaluates realign_knowledge,
realign_arith and realign_format, and stage 2 decontaminates the pairs against every
item of them; no review mentions a capital, an element, a number problem or a format
instruction of those suites.

Run: python examples/make_default_prompts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "lib" / "default_data" / "sentiment.jsonl"
N_PER_LABEL = 120

THINGS = [
    "the blender", "the hotel room", "this laptop", "the pizza", "the tour guide", "the tent",
    "this novel", "the coffee shop", "the headset", "the delivery driver", "the museum",
    "this backpack", "the pasta", "the phone case", "the dentist", "the campsite",
    "this vacuum cleaner", "the sushi", "the yoga class", "the train ride", "this board game",
    "the bakery", "the rain jacket", "the smartwatch", "the bike repair shop", "the salad",
    "this desk lamp", "the concert", "the mattress", "this cookbook",
]
GOOD = [
    "worked perfectly", "was wonderful", "exceeded my expectations", "was a delight",
    "felt great", "was excellent", "made me very happy", "was worth every penny",
    "impressed everyone", "was fantastic", "was a pleasure", "did everything right",
]
BAD = [
    "broke after a week", "was a huge disappointment", "was awful", "made me angry",
    "was a waste of money", "felt cheap and flimsy", "was terrible", "ruined my day",
    "let me down badly", "was dreadful", "was a mess", "did nothing right",
]
GOOD_TAIL = [
    "I would happily come back.", "I recommend it to everyone.", "Five stars from me.",
    "I will buy it again.", "Truly a great experience.", "I am so glad I chose it.",
    "", "", "",
]
BAD_TAIL = [
    "I want my money back.", "I will never return.", "Avoid it if you can.",
    "One star is too many.", "What a frustrating experience.", "I regret choosing it.",
    "", "", "",
]
QUESTION = "Is this review positive or negative? Answer with one word."


def review(rng: random.Random, positive: bool) -> str:
    thing = rng.choice(THINGS)
    verb = rng.choice(GOOD if positive else BAD)
    tail = rng.choice(GOOD_TAIL if positive else BAD_TAIL)
    text = f"{thing[0].upper()}{thing[1:]} {verb}."
    return f"{text} {tail}".strip()


def main() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    rows = []
    for positive in (True, False):
        made = 0
        while made < N_PER_LABEL:
            text = review(rng, positive)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"prompt": f'Review: "{text}"\n{QUESTION}',
                         "answer": "positive" if positive else "negative"})
            made += 1
    rng.shuffle(rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    print(f"wrote {len(rows)} prompts to {OUT}")


if __name__ == "__main__":
    main()
