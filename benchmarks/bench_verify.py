"""Throughput of the verifiers (``realign verify``): rows per second for each verifier.

Each verifier gets N synthetic rows, half right and half wrong, and runs through
:func:`realign.verifiers.verify_rows` in-process (the row contract included). Baselines,
measured in the same run:

* ``exact`` is the cheapest in-process verifier: other in-process rates are given as a
  ratio to it;
* the ``code`` verifier starts one child process per row; its baseline is starting a bare
  ``python -I -B -S -c pass`` child as fast as possible (one at a time), so the ratio
  shows what the sandbox (limits, audit hook, job transfer, temp folder) costs on top of
  process start. ``code`` is measured with 1 worker and with 2.

Usage::

    python benchmarks/bench_verify.py            # 1000 rows per in-process verifier, 40 code rows
    python benchmarks/bench_verify.py --n 1000 --code-n 100

Measured on the shared 2-core development machine (load average in the output; other
engineers' jobs were running, so treat the figures as lower bounds) — see the module's
report in the verifiers section of ``docs/preference-data-generation.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from realign.sandbox import SandboxLimits
from realign.verifiers import verify_rows


def _rows(kind: str, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        right = i % 2 == 0
        a, b = i, i + 7
        if kind == "exact":
            rows.append({"prompt": f"Capital number {i}?", "answer": f"City{i}",
                         "response": f"The capital is City{i if right else i + 1}.",
                         "verifier": "exact"})
        elif kind == "math":
            rows.append({"prompt": f"{a}/{b}?", "answer": f"\\frac{{{a}}}{{{b}}}",
                         "response": f"So the answer is $\\boxed{{\\frac{{{a if right else a + 1}}}{{{b}}}}}$."})
        elif kind == "instructions":
            rows.append({"prompt": "Answer in lowercase, no commas, at least 5 words.",
                         "response": ("this is a fine lowercase answer without them"
                                      if right else "This, is wrong."),
                         "instructions": [
                             {"id": "change_case:english_lowercase"},
                             {"id": "punctuation:no_comma"},
                             {"id": "length_constraints:number_words",
                              "kwargs": {"num_words": 5, "relation": "at least"}}]})
        elif kind == "code":
            op = "+" if right else "-"
            rows.append({"prompt": "Write add(a, b).",
                         "response": f"```python\ndef add(a, b):\n    return a {op} b\n```",
                         "tests": f"assert add({a}, {b}) == {a + b}\nassert add(0, 0) == 0"})
    return rows


def _rate(rows: list[dict], **kw: object) -> tuple[float, float]:
    t0 = time.perf_counter()
    rep = verify_rows(rows, **kw)  # type: ignore[arg-type]
    dt = time.perf_counter() - t0
    assert rep.verifiable == len(rows), rep.not_verifiable
    assert rep.passed == (len(rows) + 1) // 2, (rep.passed, [r.reason for r in rep.results][:4])
    return len(rows) / dt, dt


def _bare_spawn(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run([sys.executable, "-I", "-B", "-S", "-c", "pass"], env={}, check=True)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="rows per in-process verifier")
    ap.add_argument("--code-n", type=int, default=40, help="rows for the code verifier")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}; cores: {os.cpu_count()}")
    _rate(_rows("math", 4))  # warm up: math-verify's import and grammar
    res: dict[str, float] = {}
    for kind in ("exact", "math", "instructions"):
        res[kind], dt = _rate(_rows(kind, args.n))
        print(f"{kind:13s} {res[kind]:9.1f} rows/s  ({args.n} rows, {dt:.2f} s)  "
              f"× exact: {res[kind] / res['exact']:.3f}")
    bare = _bare_spawn(args.code_n)
    print(f"{'bare spawn':13s} {bare:9.1f} procs/s (python -I -B -S -c pass, one at a time)")
    limits = SandboxLimits()
    for workers in (1, 2):
        rate, dt = _rate(_rows("code", args.code_n), workers=workers, limits=limits)
        print(f"code, {workers} worker{'s' if workers > 1 else ' '} {rate:6.1f} rows/s  "
              f"({args.code_n} rows, {dt:.2f} s)  × bare spawn: {rate / bare:.2f}  "
              f"× exact: {rate / res['exact']:.4f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
