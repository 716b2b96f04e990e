"""Benchmark `realign validate` on a large synthetic preference set (issue 2, "Performance").

What it does:

1. Generates (once, cached in ``benchmarks/_data/``, git-ignored) a JSONL file of
   1,000,000 preference pairs, about 2 GB: prompts 20-80 words, responses 30-200 words,
   scores on a 1-10 scale, plus 2,000 evaluation items (15-60 words). The text is
   English-like: a word-bigram model fitted on the docstrings of the Python standard
   library, sampled with NumPy (all rows of a chunk advance together), so common phrases
   recur as they do in real text (calibrated against real text: see ``RESTART``). Planted: 0.5% duplicate rows (some re-cased and
   re-spaced) and 1 planted copy of an evaluation item per 2,000 pairs, spread over five
   kinds of edit (verbatim, case/punctuation/whitespace changed, 2 words changed, 3 words
   changed, embedded inside a longer prompt). Their line numbers are saved in a manifest.
2. Runs ``realign validate PAIRS --eval EVAL --json`` as a subprocess on the first
   100,000 pairs and on all 1,000,000, and prints wall time, peak RSS of the child
   (``resource.getrusage(RUSAGE_CHILDREN)`` read in a fresh helper process per run, so
   each figure is that run's own), the load average, and the contamination recall on
   the planted copies (also counting only edits that kept the item's numbers: an edit
   that replaced a number makes, under the rule, a different item) and the number of
   other rows flagged (false-positive candidates: the generator makes no other copies,
   though a bigram model can by chance produce a stretch that matches an item; data
   generated before the generator stopped duplicating planted rows can hold a
   duplicate of a planted row, a real copy, hence the count without duplicates).

Usage::

    python benchmarks/bench_validate.py                 # generate if needed, run both sizes
    python benchmarks/bench_validate.py --sizes 100000  # one size
    python benchmarks/bench_validate.py --generate-only
    python benchmarks/bench_validate.py --profile 100000  # cProfile of the engine in-process

Targets (issue 2): 1M pairs under 50 s wall and under 1.5 GB peak RSS on 2 cores.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
N_PAIRS = 1_000_000
N_EVAL = 2_000
PLANT_EVERY = 2_000  # one planted evaluation item per this many pairs
DUP_SHARE = 0.005
SEED = 1234
CHUNK = 20_000
#: Probability that the bigram chain restarts from a unigram draw at each word. 0.35
#: makes the synthetic text overlap the evaluation items as much as real text does:
#: against 300 items, 5.8% of its word trigrams are item trigrams (0.09 item postings
#: per trigram); for real docstring paragraphs against 300 other paragraphs, 6.1% (0.093).
#: A plain bigram chain (restart 0.08) gives 16% (0.34): a stress case, not typical data.
RESTART = 0.35
EDIT_KINDS = ("verbatim", "casepunct", "2words", "3words", "embedded")

MODULES = ("os", "os.path", "shutil", "json", "re", "string", "collections", "itertools",
           "functools", "pathlib", "subprocess", "threading", "socket", "email.message",
           "http.client", "urllib.request", "argparse", "logging", "datetime", "decimal",
           "fractions", "statistics", "random", "zipfile", "tarfile", "csv", "sqlite3",
           "textwrap", "difflib", "heapq", "bisect", "queue", "asyncio", "unittest",
           "dataclasses", "enum", "inspect", "pickle", "tempfile", "glob", "io", "codecs",
           "configparser", "ftplib", "gzip", "hashlib", "hmac", "imaplib", "locale",
           "mailbox", "mimetypes", "pprint", "selectors", "smtplib", "ssl", "struct",
           "sysconfig", "tokenize", "traceback", "types", "typing", "uuid", "warnings",
           "weakref", "xml.dom.minidom", "zipimport", "zoneinfo", "contextlib", "abc",
           "ast", "calendar", "cmd", "copy", "dis", "doctest", "filecmp", "fnmatch",
           "getopt", "gettext", "graphlib", "ipaddress", "keyword", "linecache",
           "numbers", "operator", "optparse", "platform", "plistlib", "poplib", "pydoc",
           "quopri", "reprlib", "sched", "secrets", "shelve", "shlex", "signal", "site",
           "socketserver", "stat", "symtable", "tabnanny", "timeit", "trace",
           "tracemalloc", "urllib.parse", "wave", "webbrowser", "wsgiref.util",
           "xml.etree.ElementTree", "zlib")


# --------------------------------------------------------------------------- corpus
def stdlib_text() -> str:
    """Docstrings of the standard library modules above, as one text."""
    import importlib
    import warnings

    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            for obj in [mod, *vars(mod).values()]:
                doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or callable(obj)) else None
                if doc and doc not in parts:
                    parts.append(doc)
    return "\n".join(parts)


class Bigram:
    """Word-bigram model, sampled for many sequences at once with NumPy.

    Each word's successor distribution is stored as a table of ``K`` successors drawn in
    proportion to the bigram counts, so one step is one random gather.
    """

    K = 64

    def __init__(self, text: str, rng: np.random.Generator) -> None:
        words = re.findall(r"[A-Za-z][A-Za-z'-]*[.,;:?]?|\d+", text)
        counts = Counter(words)
        self.vocab = [w for w, c in counts.items() if c >= 2]
        self.v = len(self.vocab)
        index = {w: i for i, w in enumerate(self.vocab)}
        ids = np.array([index.get(w, -1) for w in words], dtype=np.int64)
        a, b = ids[:-1], ids[1:]
        ok = (a >= 0) & (b >= 0)
        keys, cnt = np.unique(a[ok] * self.v + b[ok], return_counts=True)
        src, dst = keys // self.v, keys % self.v
        uni = np.bincount(ids[ids >= 0], minlength=self.v).astype(np.float64)
        self.uni_cdf = np.cumsum(uni) / uni.sum()
        self.rng = rng
        table = np.empty((self.v, self.K), dtype=np.int32)
        ptr = np.searchsorted(src, np.arange(self.v + 1))
        for w in range(self.v):
            lo, hi = ptr[w], ptr[w + 1]
            if hi == lo:
                table[w] = self.unigram(self.K)
            else:
                p = cnt[lo:hi] / cnt[lo:hi].sum()
                table[w] = rng.choice(dst[lo:hi], size=self.K, p=p)
        self.table = table

    def unigram(self, n: int) -> np.ndarray:
        return np.searchsorted(self.uni_cdf, self.rng.random(n), side="right").clip(0, self.v - 1)

    def sample(self, lengths: np.ndarray) -> list[np.ndarray]:
        """One word-id sequence per requested length."""
        n, m = len(lengths), int(lengths.max())
        out = np.empty((m, n), dtype=np.int32)
        cur = self.unigram(n).astype(np.int32)
        out[0] = cur
        for t in range(1, m):
            cur = self.table[cur, self.rng.integers(0, self.K, n)]
            jump = self.rng.random(n) < RESTART  # restart: see RESTART
            if jump.any():
                cur[jump] = self.unigram(int(jump.sum()))
            out[t] = cur
        out = out.T.copy()
        return [out[i, : lengths[i]] for i in range(n)]

    def render(self, seqs: list[np.ndarray]) -> list[str]:
        """Word ids -> text (space-joined, first letter upper-cased, final period)."""
        vocab = self.vocab
        out = []
        for s in seqs:
            t = " ".join([vocab[i] for i in s.tolist()])
            t = t[:1].upper() + t[1:]
            out.append(t if t.endswith((".", "?")) else t.rstrip(",;:") + ".")
        return out


# --------------------------------------------------------------------------- edits
def edit(text: str, kind: str, rng: np.random.Generator, model: Bigram, filler: str) -> str:
    words = text.split()
    if kind == "verbatim":
        return text
    if kind == "casepunct":
        t = text.upper() if rng.random() < 0.5 else text.lower()
        t = re.sub(r"[.,;:?]", lambda _: str(rng.choice(["", " ,", "!", " - "])), t)
        return re.sub(r" ", lambda _: str(rng.choice([" ", "  ", "\n"])), t)
    if kind in ("2words", "3words"):
        k = int(kind[0])
        for p in rng.choice(len(words), size=k, replace=False):
            words[p] = model.vocab[int(model.unigram(1)[0])].rstrip(".,;:?")
        return " ".join(words)
    if kind == "embedded":
        return f"{filler} Here is the task: {text} Please answer carefully."
    raise ValueError(kind)


# --------------------------------------------------------------------------- generate
def generate(n_pairs: int = N_PAIRS) -> dict:
    DATA.mkdir(parents=True, exist_ok=True)
    pairs_path, eval_path, manifest_path = (DATA / "pairs_1m.jsonl", DATA / "eval.jsonl",
                                            DATA / "manifest.json")
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        if m.get("n_pairs") == n_pairs and pairs_path.exists():
            return m
    t0 = time.perf_counter()
    rng = np.random.default_rng(SEED)
    model = Bigram(stdlib_text(), rng)
    items = model.render(model.sample(rng.integers(15, 61, N_EVAL)))
    with open(eval_path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(items):
            fh.write(json.dumps({"id": i, "question": t}) + "\n")
    planted: dict[int, dict] = {}
    n_plant = n_pairs // PLANT_EVERY
    plant_rows = rng.choice(n_pairs, size=n_plant, replace=False)
    for j, r in enumerate(sorted(plant_rows.tolist())):
        planted[r] = {"item": int(rng.integers(N_EVAL)), "kind": EDIT_KINDS[j % len(EDIT_KINDS)]}
    dup_rows = set(rng.choice(n_pairs, size=int(n_pairs * DUP_SHARE), replace=False).tolist())
    dup_rows -= set(planted)
    recent: list[str] = []
    line_of_dups: list[int] = []
    tmp = pairs_path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        for start in range(0, n_pairs, CHUNK):
            n = min(CHUNK, n_pairs - start)
            p = model.render(model.sample(rng.integers(20, 81, n)))
            c = model.render(model.sample(rng.integers(30, 201, n)))
            r = model.render(model.sample(rng.integers(30, 201, n)))
            sc = rng.integers(5, 11, n)
            sr = np.minimum(sc - 1 - rng.integers(0, 4, n), 10).clip(1)
            lines = []
            for i in range(n):
                row = start + i
                if row in planted:
                    pl = planted[row]
                    p[i] = edit(items[pl["item"]], pl["kind"], rng, model, p[i])
                if row in dup_rows and recent:
                    line = recent[int(rng.integers(len(recent)))]
                    if rng.random() < 0.3:  # re-cased / re-spaced duplicate
                        obj = json.loads(line)
                        obj["prompt"] = "  " + obj["prompt"].upper().replace(" ", "   ")
                        line = json.dumps(obj)
                    lines.append(line)
                    line_of_dups.append(row + 1)
                    continue
                line = json.dumps({"prompt": p[i], "chosen": c[i], "rejected": r[i],
                                   "score_chosen": int(sc[i]), "score_rejected": int(sr[i])})
                lines.append(line)
                if i % 97 == 0 and row not in planted:  # duplicates copy clean rows only
                    recent.append(line)
                    recent = recent[-500:]
            fh.write(("\n".join(lines) + "\n").encode())
            print(f"\rgenerated {start + n:,} pairs", end="", file=sys.stderr, flush=True)
    os.replace(tmp, pairs_path)
    print(file=sys.stderr)
    m = {"n_pairs": n_pairs, "bytes": pairs_path.stat().st_size, "eval_items": N_EVAL,
         "planted": {str(k + 1): v for k, v in sorted(planted.items())},
         "duplicates": line_of_dups, "seed": SEED,
         "generate_seconds": round(time.perf_counter() - t0, 1)}
    manifest_path.write_text(json.dumps(m))
    return m


def numbers_changed(manifest: dict) -> dict[int, bool]:
    """Planted line -> whether the edit replaced a number of the item (digits or a number
    word). Under the decontamination rule such a copy is a different item, so recall is
    also reported without them. Computed once from the data and cached in the manifest."""
    if "numbers_changed" in manifest:
        return {int(k): v for k, v in manifest["numbers_changed"].items()}
    import pyarrow as pa

    from realign.decontamination import NUMBER_WORDS, normalize_text

    items = [json.loads(ln)["question"] for ln in open(DATA / "eval.jsonl", encoding="utf-8")]
    planted = {int(k): v for k, v in manifest["planted"].items()}
    out: dict[int, bool] = {}
    with open(DATA / "pairs_1m.jsonl", "rb") as fh:
        for i, line in enumerate(fh, start=1):
            pl = planted.get(i)
            if pl is None:
                continue
            out[i] = False
            if pl["kind"] in ("2words", "3words"):
                a, b = (normalize_text(pa.array([t])).to_pylist()[0].split()
                        for t in (items[pl["item"]], json.loads(line)["prompt"]))
                out[i] = any(x != y and (x in NUMBER_WORDS or re.search(r"\d", x))
                             for x, y in zip(a, b))
    manifest["numbers_changed"] = {str(k): v for k, v in out.items()}
    (DATA / "manifest.json").write_text(json.dumps(manifest))
    return out


def head_file(n: int) -> Path:
    """The first n pairs of the big file (lines are rows: no blank lines are generated)."""
    path = DATA / f"pairs_{n}.jsonl"
    if not path.exists():
        with open(DATA / "pairs_1m.jsonl", "rb") as src, open(path, "wb") as dst:
            for i, line in enumerate(src):
                if i >= n:
                    break
                dst.write(line)
    return path


# --------------------------------------------------------------------------- run
_RUNNER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall": wall, "maxrss_kb": ru.ru_maxrss,
                  "user": ru.ru_utime, "sys": ru.ru_stime,
                  "stdout": p.stdout.decode(), "stderr": p.stderr.decode()[-2000:]}))
"""


def run_once(pairs: Path, manifest: dict, n: int, extra: list[str]) -> dict:
    # the console script's entry point, run with this interpreter
    cmd = [sys.executable, "-c", "import sys; from realign.cli import main; sys.exit(main())",
           "validate", str(pairs), "--eval", str(DATA / "eval.jsonl"), "--json", *extra]
    load = os.getloadavg()
    res = json.loads(subprocess.run([sys.executable, "-c", _RUNNER, *cmd], check=True,
                                    capture_output=True, text=True).stdout)
    if res["rc"] not in (0, 1, 3):
        raise SystemExit(f"validate failed (exit {res['rc']}): {res['stderr']}")
    verdict = json.loads(res["stdout"])
    flagged = set(verdict["findings"]["contaminated"])
    planted = {int(k): v for k, v in manifest["planted"].items() if int(k) <= n}
    by_kind: dict[str, list[int]] = {}
    for line, pl in planted.items():
        by_kind.setdefault(pl["kind"], [0, 0])
        by_kind[pl["kind"]][1] += 1
        by_kind[pl["kind"]][0] += line in flagged
    hits = sum(v[0] for v in by_kind.values())
    changed = numbers_changed(manifest)
    kept = [line for line in planted if not changed.get(line)]
    dups = {d for d in manifest["duplicates"] if d <= n}
    others = flagged - set(planted)
    return {
        "pairs": n, "wall_s": round(res["wall"], 1), "cpu_s": round(res["user"] + res["sys"], 1),
        "peak_rss_mb": round(res["maxrss_kb"] / 1024), "load_before": [round(x, 2) for x in load],
        "recall": round(hits / max(len(planted), 1), 4), "planted": len(planted),
        "recall_by_kind": {k: f"{a}/{b}" for k, (a, b) in sorted(by_kind.items())},
        "recall_numbers_kept": round(sum(x in flagged for x in kept) / max(len(kept), 1), 4),
        "planted_numbers_kept": len(kept),
        # rows flagged that were not planted: duplicates of planted rows are real copies
        "other_rows_flagged": len(others),
        "other_rows_flagged_not_duplicates": len(others - dups),
        "planted_duplicates_found": f"{len(dups & set(verdict['findings']['duplicates']))}/{len(dups)}",
        "status": verdict["status"],
    }


def profile(n: int) -> None:
    import cProfile
    import pstats

    from realign.validation import validate_file

    pairs = head_file(n)
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    validate_file(pairs, eval_sets=[DATA / "eval.jsonl"])
    pr.disable()
    print(f"{n} pairs in {time.perf_counter() - t0:.1f} s (in-process, profiled)")
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, N_PAIRS])
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--profile", type=int, default=None, metavar="N")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="extra arguments for realign validate")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    manifest = generate()
    print(f"data: {manifest['n_pairs']:,} pairs, {manifest['bytes'] / 1e9:.2f} GB, "
          f"{manifest['eval_items']} eval items, {len(manifest['planted'])} planted copies, "
          f"{len(manifest['duplicates'])} planted duplicates "
          f"(generated in {manifest['generate_seconds']} s)")
    if args.generate_only:
        return
    if args.profile:
        profile(args.profile)
        return
    print(f"cpus: {os.cpu_count()}, load average now: {os.getloadavg()}")
    for n in args.sizes:
        pairs = DATA / "pairs_1m.jsonl" if n >= manifest["n_pairs"] else head_file(n)
        print(json.dumps(run_once(pairs, manifest, min(n, manifest["n_pairs"]), args.extra)),
              flush=True)


if __name__ == "__main__":
    main()
