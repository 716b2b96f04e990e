"""Instruction-following difficulty (IFD, Li et al. 2023, "From Quantity to Quality").

IFD(Q, A) = PPL(A | Q) ÷ PPL(A), with a causal LM:

* PPL(A | Q) = exp(−(1/T) Σ_t log p(a_t | Q, a_<t)): the answer's tokens after the
  instruction, rendered as the model is chatted with (every backend's
  :func:`realign.backends.encoding.encode_pair`: chat template with the user turn Q and the
  generation prompt, then the assistant turn A);
* PPL(A) = exp(−(1/T) Σ_t log p(a_t | C₀, a_<t)): the **same T answer tokens** after a
  context C₀ holding no instruction. With a chat template C₀ is the template applied to
  one empty user message with the generation prompt (the same system preamble and
  assistant header as the conditional case, only the instruction text is missing);
  without a template C₀ is the BOS token (EOS when the tokenizer has no BOS). The
  answer tokens are copied from the conditional encoding, so numerator and denominator
  score identical tokens;
* hence IFD = exp(mean_t log p(a_t | C₀, ·) − mean_t log p(a_t | Q, ·)).

IFD < 1: the instruction makes the answer easier to predict (the usual case); IFD ≥ 1:
the instruction does not help, which Li et al. read as a misaligned pair (their data
selection drops IFD > 1, then keeps the highest IFD: the hardest answers that still
follow from their instruction). Both encodings go through the backend's log-prob
function in one batched call (:meth:`realign.backends.trl.TRLBackend.completion_logprobs`,
or :meth:`realign.backends.mlx.MLXBackend.completion_logprobs` with ``backend="mlx"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .config import DEFAULT_MAX_LENGTH
from .data import read_row_file
from .errors import InputError
from .fileio import atomic_path

#: Quantiles of the IFD distribution in a report.
IFD_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)


# ---------------------------------------------------------------------------- pure math


def ifd_from_logprobs(conditional: Sequence[float], unconditional: Sequence[float]) -> float | None:
    """IFD = PPL(A|Q) / PPL(A) = exp(mean(unconditional) − mean(conditional)).

    ``conditional[t]`` = log p(a_t | Q, a_<t), ``unconditional[t]`` = log p(a_t | C₀, a_<t),
    over the same answer tokens. None when the answer has no tokens.
    """
    if len(conditional) != len(unconditional):
        raise ValueError(f"{len(conditional)} conditional but {len(unconditional)} unconditional "
                         "log-probs: both must cover the same answer tokens")
    if not conditional:
        return None
    mc = sum(conditional) / len(conditional)
    mu = sum(unconditional) / len(unconditional)
    return math.exp(mu - mc)


class IFDReport(BaseModel):
    """Distribution of IFD over a data set."""

    n: int
    measured: int
    mean: float | None
    quantiles: dict[str, float]
    share_above_1: float | None  # share of measured examples with IFD > 1


def ifd_report(scores: Sequence[float | None]) -> IFDReport:
    """mean, min/quantiles/max (numpy linear interpolation) and #(IFD > 1) ÷ measured."""
    import numpy as np

    vals = np.asarray([s for s in scores if s is not None], dtype=np.float64)
    if vals.size == 0:
        return IFDReport(n=len(scores), measured=0, mean=None, quantiles={}, share_above_1=None)
    q = {"min": float(vals.min())}
    q.update({f"p{round(x * 100):02d}": float(np.quantile(vals, x)) for x in IFD_QUANTILES})
    q["max"] = float(vals.max())
    return IFDReport(n=len(scores), measured=int(vals.size), mean=float(vals.mean()), quantiles=q,
                     share_above_1=float((vals > 1).mean()))


def select_by_ifd(scores: Sequence[float | None], *, top_k: int | None = None,
                  max_ifd: float | None = None) -> list[int]:
    """Indices (in input order) of the examples to keep.

    ``max_ifd``: keep IFD ≤ max_ifd. ``top_k``: then keep the k highest IFD; with
    ``top_k`` and no ``max_ifd`` the cap is 1 (Li et al.: IFD > 1 means the instruction
    does not help). Unmeasured scores (empty answers) are never kept. Ties at the k-th
    value are broken by input order.
    """
    if top_k is not None and top_k < 0:
        raise ValueError("top_k must be ≥ 0")
    cap = max_ifd if max_ifd is not None else (1.0 if top_k is not None else math.inf)
    keep = [i for i, s in enumerate(scores) if s is not None and s <= cap]
    if top_k is not None:
        keep = sorted(sorted(keep, key=lambda i: -scores[i])[:top_k])  # type: ignore[operator]
    return keep


# ---------------------------------------------------------------------------- encoding


def unconditional_context(tokenizer: Any) -> list[int]:
    """C₀: the token ids that precede the answer when there is no instruction (see module doc)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise InputError("the tokenizer has no chat template, BOS or EOS token: there is no "
                         "instruction-free context to score the answer in", field="model")
    return [int(tid)]


def encode_ifd(tokenizer: Any, prompt: Any, answer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> tuple[Any, Any]:
    """(conditional, unconditional) :class:`realign.backends.encoding.Encoded` of one
    example, scoring the same answer tokens (at most ``max_length − 1`` of them)."""
    from .backends.encoding import Encoded, encode_pair

    cond = encode_pair(tokenizer, prompt, answer, max_length)
    ans = cond.input_ids[cond.start:]
    ctx = unconditional_context(tokenizer)
    ctx = ctx[-max(1, max_length - len(ans)):]
    return cond, Encoded(input_ids=ctx + ans, start=len(ctx))


@dataclass
class IFDScores:
    """Per-example results: IFD and both perplexities (None for an empty answer)."""

    ifd: list[float | None]
    ppl_conditional: list[float | None]
    ppl_unconditional: list[float | None]
    tokens: list[int]


def ifd_scores(handle: Any, prompts: Sequence[Any], answers: Sequence[Any], *, batch_size: int = 16,
               max_length: int = DEFAULT_MAX_LENGTH, backend: Any = None,
               progress: Callable[[int, int], None] | None = None,
               chunk: int = 256) -> IFDScores:
    """IFD of each (prompt, answer) with the model in ``handle`` (a backend ModelHandle).

    All 2·N encodings go through ``backend.completion_logprobs`` in chunks of ``chunk``
    examples (batches of ``batch_size`` sequences of similar length inside each chunk);
    results are in input order.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if backend is None:
        from .backends.trl import TRLBackend

        backend = TRLBackend()
    out = IFDScores([], [], [], [])
    n = len(prompts)
    for start in range(0, n, chunk):
        enc = []
        for p, a in zip(prompts[start:start + chunk], answers[start:start + chunk]):
            c, u = encode_ifd(handle.tokenizer, p, a, max_length)
            enc += [c, u]
        lp = backend.completion_logprobs(handle, [], [], encoded=enc, batch_size=batch_size)
        for k in range(0, len(enc), 2):
            cond, unc = lp.token_logps[k], lp.token_logps[k + 1]
            out.tokens.append(len(cond))
            out.ifd.append(ifd_from_logprobs(cond, unc))
            out.ppl_conditional.append(math.exp(-sum(cond) / len(cond)) if cond else None)
            out.ppl_unconditional.append(math.exp(-sum(unc) / len(unc)) if unc else None)
        if progress:
            progress(min(start + chunk, n), n)
    return out


def _backend_and_handle(model: Any, backend: Any, device: str | None) -> tuple[Any, Any]:
    """(backend instance, loaded handle): ``backend`` is a name (``realign.backends.get_backend``)
    or an instance; ``model`` a handle of that backend (anything with ``.model`` and
    ``.tokenizer``) or something its ``load`` takes."""
    from .backends import get_backend

    be = get_backend(backend) if isinstance(backend, str) else backend
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        return be, model
    return be, be.load(model, device=device)


def calculate_ifd_score(model: Any, instructions: str | Sequence[Any], responses: str | Sequence[Any],
                        *, batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH, device: str | None = None,
                        backend: Any = "trl") -> float | None | list[float | None]:
    """IFD(Q, A) = PPL(A | Q) ÷ PPL(A) (Li et al. 2023) of one example or a list of them.

    ``model``: a backend's model handle, or a model path / ``"default"`` (loaded with
    ``backend``: ``"trl"``, ``"mlx"``, ``"auto"`` or a backend instance).
    ``instructions``/``responses``: strings or message lists; one of each gives one float,
    sequences give a list in input order. None: empty answer.
    """
    backend, handle = _backend_and_handle(model, backend, device)
    single = isinstance(responses, str) or (
        isinstance(responses, list) and responses and isinstance(responses[0], dict))
    qs = [instructions] if single else list(instructions)  # type: ignore[list-item]
    rs = [responses] if single else list(responses)  # type: ignore[list-item]
    res = ifd_scores(handle, qs, rs, batch_size=batch_size, max_length=max_length, backend=backend)
    return res.ifd[0] if single else res.ifd


# ---------------------------------------------------------------------------- data files


@dataclass
class Example:
    """One IFD example: the instruction (messages), the answer (messages), its 1-based line."""

    prompt: list[dict[str, str]]
    answer: list[dict[str, str]]
    line: int


def _msgs(value: Any, role: str, file: str, line: int, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return [{"role": str(m.get("role", role)), "content": m["content"]} for m in value]
    raise InputError("expected a string or a non-empty list of {role, content} messages",
                     file=file, line=line, field=field)


def example_from_row(row: Any, file: str, line: int) -> Example:
    """Instruction and answer of a row, in the first matching shape:

    ``messages`` (the last message is the answer, the ones before it the instruction);
    ``instruction`` + ``response``/``output`` (an ``input`` field, when non-empty, is
    appended to the instruction after a blank line, Alpaca style); ``prompt`` +
    ``completion``; ``prompt`` + ``chosen`` (preference data; the rejected response is
    ignored); ``chosen`` alone (implicit prompt: the messages before the last one).
    """
    if not isinstance(row, dict):
        raise InputError(f"expected a JSON object, got {type(row).__name__}", file=file, line=line)
    if "messages" in row:
        m = _msgs(row["messages"], "user", file, line, "messages")
        if len(m) < 2:
            raise InputError("need at least an instruction and an answer message",
                             file=file, line=line, field="messages")
        return Example(m[:-1], m[-1:], line)
    if "instruction" in row:
        key = "response" if "response" in row else "output" if "output" in row else None
        if key is None:
            raise InputError("'instruction' needs a 'response' (or 'output') field",
                             file=file, line=line, field="response")
        q = row["instruction"]
        if not isinstance(q, str):
            raise InputError("expected a string", file=file, line=line, field="instruction")
        extra = row.get("input")
        if isinstance(extra, str) and extra.strip():
            q = f"{q}\n\n{extra}"
        return Example(_msgs(q, "user", file, line, "instruction"),
                       _msgs(row[key], "assistant", file, line, key), line)
    for key in ("completion", "chosen"):
        if key in row and "prompt" in row:
            return Example(_msgs(row["prompt"], "user", file, line, "prompt"),
                           _msgs(row[key], "assistant", file, line, key), line)
    if isinstance(row.get("chosen"), list):
        m = _msgs(row["chosen"], "user", file, line, "chosen")
        if len(m) >= 2:
            return Example(m[:-1], m[-1:], line)
    raise InputError("expected 'messages', 'instruction'+'response', 'prompt'+'completion' or "
                     "'prompt'+'chosen'", file=file, line=line)


def read_examples(path: str | Path) -> tuple[list[Example], str, list[Any]]:
    """(examples, format, raw rows) of an SFT or preference file (JSONL, JSON array, Parquet).

    Line numbers: JSONL physical lines (1-based), JSON/Parquet row index + 1. Raw rows are
    the original lines (bytes) for JSONL, objects for JSON, and the Arrow table for Parquet,
    so :func:`write_subset` can write kept rows back unchanged.
    """
    p = Path(path)
    f = read_row_file(p)  # the preference reader's format rule: extension, then content
    examples = [example_from_row(row, str(p), i) for row, i in zip(f.rows, f.lines)]
    return examples, f.format, f.raw


def write_subset(out: str | Path, fmt: str, raw: list[Any], keep: Sequence[int]) -> Path:
    """Write the kept rows (indices into the examples) in the input's format, atomically."""
    out = Path(out)
    with atomic_path(out) as tmp:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(raw[0].take(pa.array(list(keep), pa.int64())), tmp)
        elif fmt == "json":
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump([raw[i] for i in keep], fh, ensure_ascii=False)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(raw[i].rstrip("\r") + "\n" for i in keep)
    return out


# ---------------------------------------------------------------------------- a whole file


class IFDExample(BaseModel):
    """One example's IFD = ppl_conditional ÷ ppl_unconditional (None: empty answer)."""

    line: int
    ifd: float | None
    ppl_conditional: float | None
    ppl_unconditional: float | None
    tokens: int


class IFDFileResult(BaseModel):
    """IFD of every example of a data file and the distribution (:func:`ifd_of_file`)."""

    data: str
    model: str
    report: IFDReport
    examples: list[IFDExample]


def ifd_of_file(path: str | Path, model: Any = "default", *, limit: int | None = None,
                batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH, device: str | None = None,
                progress: Callable[[int, int], None] | None = None, backend: Any = "trl") -> IFDFileResult:
    """IFD(Q, A) = PPL(A | Q) ÷ PPL(A) of the first ``limit`` (default: all) examples of a file.

    Rows are read by :func:`read_examples` (SFT or preference shapes; line numbers as
    there), scored by :func:`ifd_scores` with the model loaded by ``backend`` (``"trl"``,
    ``"mlx"``, ``"auto"`` or an instance; the model a folder, ``"default"`` or a hub id, or
    a loaded handle) and summarized by :func:`ifd_report`. ``progress(done, total)``
    counts scored examples.
    """
    if limit is not None and limit < 1:
        raise InputError(f"limit must be ≥ 1, got {limit}", field="limit")
    examples = read_examples(path)[0][:limit]
    if not examples:
        raise InputError("no examples", file=path)
    if getattr(backend, "name", backend) in ("trl", "torch", "pytorch"):
        from .backends.trl_train import quiet_hf

        quiet_hf()
    backend, handle = _backend_and_handle(model, backend, device)
    res = ifd_scores(handle, [e.prompt for e in examples], [e.answer for e in examples],
                     batch_size=batch_size, max_length=max_length, backend=backend,
                     progress=progress)
    return IFDFileResult(
        data=str(path), model=str(handle.source), report=ifd_report(res.ifd),
        examples=[IFDExample(line=e.line, ifd=s, ppl_conditional=pc, ppl_unconditional=pu, tokens=t)
                  for e, s, pc, pu, t in zip(examples, res.ifd, res.ppl_conditional,
                                             res.ppl_unconditional, res.tokens)])
