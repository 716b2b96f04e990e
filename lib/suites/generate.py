"""Deterministic generator of the realign offline evaluation suites.

Run ``python lib/suites/generate.py`` to rewrite ``data/*.jsonl``; the output is
byte-identical on every run (fixed seed, no network). Every fact and instruction below
was written for this project (see README.md in this folder for source and licence).

Suites:

* ``knowledge.jsonl`` — general-knowledge multiple choice (4 options), scored by
  log-likelihood (``acc``); chance = 0.25.
* ``arith.jsonl`` — short integer arithmetic, generated answer, exact match of the last
  integer on the first line; chance ≈ 0.
* ``format.jsonl`` — a simple, code-checkable format instruction attached to an easy
  question (all caps, lowercase only, one word, JSON with a key, starts with a word,
  yes/no, number only, a list of exactly three lines), with one demonstration of the
  format on another question; chance ≈ 0 (see README).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240601

# ---------------------------------------------------------------- knowledge (MC)
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("India", "New Delhi"),
    ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Turkey", "Ankara"),
    ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Cuba", "Havana"), ("Iran", "Tehran"),
    ("the United Kingdom", "London"), ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"), ("Switzerland", "Bern"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Nigeria", "Abuja"), ("Colombia", "Bogota"),
]

ELEMENTS = [
    ("oxygen", "O"), ("hydrogen", "H"), ("carbon", "C"), ("nitrogen", "N"),
    ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("sodium", "Na"),
    ("potassium", "K"), ("helium", "He"), ("calcium", "Ca"), ("copper", "Cu"),
    ("lead", "Pb"), ("zinc", "Zn"), ("chlorine", "Cl"), ("neon", "Ne"),
    ("sulfur", "S"), ("mercury", "Hg"), ("tin", "Sn"), ("magnesium", "Mg"),
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("up", "down"), ("early", "late"), ("full", "empty"),
    ("open", "closed"), ("rich", "poor"), ("strong", "weak"), ("young", "old"),
    ("wet", "dry"), ("loud", "quiet"), ("hard", "soft"), ("tall", "short"),
    ("first", "last"), ("win", "lose"), ("push", "pull"),
    ("buy", "sell"), ("inside", "outside"), ("above", "below"), ("true", "false"),
]

# (question, correct answer, three wrong answers) — written for this project.
FACTS = [
    ("How many days are in a week?", "seven", ["five", "ten", "twelve"]),
    ("How many legs does a spider have?", "eight", ["six", "four", "ten"]),
    ("How many legs does an insect have?", "six", ["eight", "four", "ten"]),
    ("What is the largest planet in our solar system?", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Jupiter", "Venus", "Saturn"]),
    ("What is the closest star to the Earth?", "the Sun", ["the Moon", "Mars", "Sirius"]),
    ("What do bees make?", "honey", ["milk", "silk", "wool"]),
    ("What gas do plants absorb from the air?", "carbon dioxide", ["oxygen", "helium", "neon"]),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100", ["50", "0", "212"]),
    ("What is the freezing point of water in degrees Celsius?", "0", ["100", "32", "10"]),
    ("Which animal is known as the king of the jungle?", "the lion", ["the mouse", "the cow", "the frog"]),
    ("What is the largest ocean on Earth?", "the Pacific Ocean", ["the Indian Ocean", "the Arctic Ocean", "the Atlantic Ocean"]),
    ("How many continents are there?", "seven", ["three", "ten", "five"]),
    ("What color is a ripe banana?", "yellow", ["blue", "purple", "black"]),
    ("What color is grass?", "green", ["red", "blue", "white"]),
    ("What is frozen water called?", "ice", ["steam", "sand", "glass"]),
    ("Which organ pumps blood through the body?", "the heart", ["the lungs", "the stomach", "the brain"]),
    ("Which organ do humans use to breathe?", "the lungs", ["the heart", "the liver", "the kidneys"]),
    ("How many hours are in a day?", "24", ["12", "60", "100"]),
    ("How many minutes are in an hour?", "60", ["100", "24", "30"]),
    ("How many months are in a year?", "twelve", ["ten", "six", "eight"]),
    ("Which month comes after January?", "February", ["March", "December", "June"]),
    ("What is the opposite of north?", "south", ["east", "west", "up"]),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare", ["Charles Dickens", "Mark Twain", "Jane Austen"]),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ["Pablo Picasso", "Vincent van Gogh", "Claude Monet"]),
    ("Who developed the theory of relativity?", "Albert Einstein", ["Isaac Newton", "Charles Darwin", "Galileo Galilei"]),
    ("What is the main language spoken in Brazil?", "Portuguese", ["Spanish", "French", "German"]),
    ("What is the currency of Japan?", "the yen", ["the euro", "the dollar", "the peso"]),
    ("Which animal gives us wool?", "the sheep", ["the cow", "the pig", "the horse"]),
    ("What do caterpillars turn into?", "butterflies", ["spiders", "frogs", "birds"]),
    ("What is the tallest animal in the world?", "the giraffe", ["the elephant", "the horse", "the dog"]),
    ("What is the largest mammal?", "the blue whale", ["the elephant", "the giraffe", "the hippo"]),
    ("Which instrument has black and white keys?", "the piano", ["the drum", "the violin", "the flute"]),
    ("How many sides does a triangle have?", "three", ["four", "five", "six"]),
    ("How many sides does a square have?", "four", ["three", "five", "six"]),
    ("What shape has six sides?", "a hexagon", ["a triangle", "a circle", "a square"]),
    ("What is the chemical formula of water?", "H2O", ["CO2", "O2", "NaCl"]),
    ("What force pulls objects toward the Earth?", "gravity", ["magnetism", "friction", "wind"]),
    ("What is the hardest natural substance?", "diamond", ["gold", "iron", "wood"]),
    ("Which season comes after winter?", "spring", ["autumn", "summer", "winter"]),
    ("In which country are the pyramids of Giza?", "Egypt", ["Mexico", "China", "Peru"]),
    ("Which country is home to the kangaroo?", "Australia", ["Canada", "Brazil", "Norway"]),
    ("What is the longest river in Africa?", "the Nile", ["the Amazon", "the Thames", "the Danube"]),
    ("What do you call a baby dog?", "a puppy", ["a kitten", "a calf", "a foal"]),
    ("What do you call a baby cat?", "a kitten", ["a puppy", "a lamb", "a chick"]),
    ("What is the primary source of energy for the Earth?", "the Sun", ["the Moon", "volcanoes", "the wind"]),
    ("Which gas do humans need to breathe in to live?", "oxygen", ["carbon dioxide", "helium", "nitrogen"]),
    ("How many wheels does a bicycle have?", "two", ["three", "four", "one"]),
    ("What is the largest desert in the world?", "the Sahara", ["the Gobi", "the Kalahari", "the Mojave"]),
    ("What tool is used to measure temperature?", "a thermometer", ["a ruler", "a clock", "a scale"]),
    ("What do we call a person who flies an airplane?", "a pilot", ["a sailor", "a chef", "a farmer"]),
    ("What do we call a person who treats sick people?", "a doctor", ["a pilot", "a baker", "a painter"]),
    ("Which metal is liquid at room temperature?", "mercury", ["iron", "gold", "copper"]),
    ("What is the square root of 81?", "9", ["8", "7", "12"]),
    ("How many bones does an adult human have?", "206", ["106", "306", "56"]),
    ("Which letter comes after A in the English alphabet?", "B", ["C", "Z", "D"]),
    ("Which language has the most native speakers?", "Mandarin Chinese", ["French", "Italian", "Dutch"]),
    ("What is the fastest land animal?", "the cheetah", ["the turtle", "the cow", "the snail"]),
    ("Which bird is a symbol of peace?", "the dove", ["the crow", "the vulture", "the owl"]),
    ("Which part of a plant makes food using sunlight?", "the leaf", ["the root", "the seed", "the bark"]),
]


def knowledge(rng: random.Random) -> list[dict]:
    items: list[tuple[str, str, list[str], str]] = []
    caps = [c for _, c in CAPITALS]
    for country, cap in CAPITALS:
        wrong = rng.sample([c for c in caps if c != cap], 3)
        items.append((f"What is the capital of {country}?", cap, wrong, "capital"))
    syms = [s for _, s in ELEMENTS]
    for el, sym in ELEMENTS:
        wrong = rng.sample([s for s in syms if s != sym], 3)
        items.append((f"What is the chemical symbol for {el}?", sym, wrong, "element"))
    words = sorted({w for pair in OPPOSITES for w in pair})
    for a, b in OPPOSITES:
        wrong = rng.sample([w for w in words if w not in (a, b)], 3)
        items.append((f'What is the opposite of "{a}"?', b, wrong, "opposite"))
    for q, right, wrong in FACTS:
        items.append((q, right, list(wrong), "fact"))
    rows = []
    for i, (q, right, wrong, cat) in enumerate(items):
        choices = [right, *wrong]
        rng.shuffle(choices)
        rows.append({"id": f"knowledge-{i:03d}", "category": cat, "question": q,
                     "choices": choices, "answer": choices.index(right)})
    return rows


# ---------------------------------------------------------------- arithmetic (gen)
def arith(rng: random.Random) -> list[dict]:
    rows: list[dict] = []

    def add(kind: str, a: int, b: int, op: str) -> None:
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        sym = {"+": "+", "-": "-", "*": "times"}[op]
        rows.append({"id": f"arith-{len(rows):03d}", "category": kind,
                     "question": f"What is {a} {sym} {b}?", "answer": str(val)})

    for _ in range(40):
        add("add_1d", rng.randint(1, 9), rng.randint(1, 9), "+")
    for _ in range(40):
        add("add_2d_1d", rng.randint(10, 99), rng.randint(1, 9), "+")
    for _ in range(40):
        add("add_2d_2d", rng.randint(10, 99), rng.randint(10, 99), "+")
    for _ in range(40):
        a = rng.randint(2, 20)
        add("sub", a, rng.randint(1, a - 1), "-")
    for _ in range(40):
        add("mul_1d", rng.randint(2, 9), rng.randint(2, 9), "*")
    return rows


# ---------------------------------------------------------------- format following
QUESTIONS = [
    ("What color is the sky on a clear day?", "blue"),
    ("What animal says moo?", "cow"),
    ("What is the capital of France?", "Paris"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("What is the opposite of hot?", "cold"),
    ("Which planet do we live on?", "Earth"),
    ("What fruit is yellow and long?", "banana"),
    ("What do cows drink?", "water"),
    ("What do you use to write on paper?", "pen"),
    ("What season is the coldest?", "winter"),
    ("What animal barks?", "dog"),
    ("Where do fish live?", "water"),
    ("What shines in the sky during the day?", "sun"),
    ("What do you wear on your feet?", "shoes"),
    ("What color is snow?", "white"),
    ("What do plants need to grow?", "sunlight"),
    ("What is a baby cat called?", "kitten"),
    ("What is the largest ocean?", "Pacific"),
    ("What do you call the meal eaten in the morning?", "breakfast"),
]
YESNO = [
    "Is the sun hot?", "Is ice cold?", "Can fish swim?", "Do cats bark?",
    "Is the sky green?", "Is water wet?", "Can birds fly?", "Is snow black?",
    "Is Paris in France?", "Do cows lay eggs?", "Is one bigger than ten?",
    "Do people need water?", "Is the Earth round?", "Can a car fly?",
    "Is summer warmer than winter?", "Do trees have leaves?",
    "Is a mouse bigger than an elephant?", "Does the moon shine at night?",
    "Is fire cold?", "Do dogs have four legs?",
]
NUMBERQ = [
    "How many legs does a dog have?", "How many days are in a week?",
    "How many months are in a year?", "How many hours are in a day?",
    "How many wheels does a car have?", "How many fingers are on one hand?",
    "How many sides does a triangle have?", "How many minutes are in an hour?",
    "How many eyes does a person have?", "How many legs does a spider have?",
    "How many seasons are in a year?", "How many continents are there?",
    "How many letters are in the word cat?", "How many wheels does a bicycle have?",
    "How many days are in a year?", "How many sides does a square have?",
    "How many legs does a bird have?", "How many noses does a person have?",
    "How many hours are in half a day?", "How many cents are in a dollar?",
]
LISTQ = [
    "Name some fruits.", "Name some colors.", "Name some animals.",
    "Name some countries.", "Give some tips for sleeping well.",
    "Name some vegetables.", "Name some sports.", "Name some musical instruments.",
    "Give some reasons to exercise.", "Name some things found in a kitchen.",
    "Name some jobs.", "Name some planets.", "Name some school subjects.",
    "Give some ways to save water.", "Name some farm animals.",
    "Name some things you can read.", "Name some drinks.", "Name some flowers.",
    "Name some things in the sky.", "Give some tips for studying.",
]
START_WORDS = ["Sure", "Yes", "Hello", "Well", "Answer", "Okay", "Indeed", "Certainly"]
JSON_KEYS = ["answer", "result", "value", "reply"]


# Each format check: (instruction, demonstration question, demonstration reply). The
# prompt shows one demonstration of the format on a question outside the test questions.
FORMAT_CHECKS = {
    "all_caps": ("Write your whole reply in capital letters only.",
                 "What color is grass?", "GRASS IS GREEN."),
    "lowercase": ("Write your whole reply in lowercase letters only, with no capital letters.",
                  "What color is grass?", "grass is green."),
    "one_word": ("Reply with one word only.", "What color is grass?", "Green."),
    "json_key": ('Reply only with a JSON object that has the key "{arg}".',
                 "What color is grass?", '{{"{arg}": "green"}}'),
    "starts_with": ('Begin your reply with the word "{arg}".',
                    "What color is grass?", "{arg}, grass is green."),
    "yes_no": ('Reply with only "yes" or "no".', "Is grass green?", "yes"),
    "number_only": ("Reply with a number only, in digits, with no words.",
                    "How many legs does a cat have?", "4"),
    "three_items": ("Reply with a list of exactly three items, one per line.",
                    "Name some colors.", "red\nblue\ngreen"),
}


def format_items(rng: random.Random) -> list[dict]:
    rows: list[dict] = []

    def add(check: str, question: str, arg: str = "") -> None:
        instr, demo_q, demo_a = (t.format(arg=arg) for t in FORMAT_CHECKS[check])
        prompt = (f"{instr}\n\nExample question: {demo_q}\nExample reply:\n{demo_a}\n\n"
                  f"Question: {question}")
        rows.append({"id": f"format-{len(rows):03d}", "check": check, "arg": arg,
                     "question": question, "prompt": prompt})

    for check in ("all_caps", "lowercase", "one_word"):
        for q, _ in QUESTIONS:
            add(check, q)
    for q, _ in QUESTIONS:
        add("json_key", q, rng.choice(JSON_KEYS))
    for q, _ in QUESTIONS:
        add("starts_with", q, rng.choice(START_WORDS))
    for q in YESNO:
        add("yes_no", q)
    for q in NUMBERQ:
        add("number_only", q)
    for q in LISTQ:
        add("three_items", q)
    return rows


def write(name: str, rows: list[dict], out_dir: Path) -> None:
    path = out_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def main(out_dir: Path = HERE / "data") -> None:
    write("knowledge.jsonl", knowledge(random.Random(SEED)), out_dir)
    write("arith.jsonl", arith(random.Random(SEED + 1)), out_dir)
    write("format.jsonl", format_items(random.Random(SEED + 2)), out_dir)


if __name__ == "__main__":
    main()
