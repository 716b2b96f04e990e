"""On-policy preference pairs: sample k responses per prompt, score them, pair best vs worst.

What stage 2 runs in generation mode (config ``prompts``) and what stage 6 runs every
iteration (docs/preference-data-generation.md § "Generating pairs from the policy"):

1. **Sample** ``k`` responses per prompt from the current policy
   (:func:`realign.backends.trl.sample_many`: temperature ``T``, nucleus ``top_p``, at most
   ``max_new_tokens`` tokens; the k samples of a prompt share its prompt's forward pass;
   seeded per sample).
2. **Score** each response: with the **verifier** of its row
   (:func:`realign.verifiers.verify_rows`: the row's ``answer``, ``tests`` or
   ``instructions``; score in [0, 1]), or with a **reward model**
   (:func:`realign.reward.score_sequences`, raw rewards r). The reward model must read
   the prompt the way the policy does: when its chat template differs from the policy's
   the result carries a warning (:func:`chat_template_mismatch`).
3. **Pair** (:data:`PAIRING_RULES`): ``max_min`` (RLHFlow's rule: the best-scored response
   as chosen, the worst as rejected; among equal scores the lowest sample index) or
   ``max_random`` (the best as chosen, a response drawn at random, seeded, among those
   scored lower as rejected).
4. **Drop** prompts without a real difference: every response scored the same, a
   score gap below ``min_gap``, chosen and rejected the same text, or no response the
   verifier can check. The gap is on [0, 1]: the verifier scores' difference, or for a
   reward model the Bradley–Terry probability difference σ(Δ) − σ(−Δ) = tanh(Δ/2),
   Δ = r(chosen) − r(rejected). The pair records ``score_chosen`` / ``score_rejected`` on
   that 0-1 scale (σ(Δ) and σ(−Δ) for a reward model), so stage 2's ``preference_gap``
   gate is measured from them.

The pairs then go through the stage-2 validation like any pair file (the caller's job).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["PAIRING_RULES", "GenerationResult", "PromptRow", "chat_template_mismatch",
           "generate_pairs", "make_pairs", "outside_probe_first", "pick_pair", "prompt_key",
           "prompt_rows_from_pairs", "read_prompt_rows", "reference_of",
           "score_with_reward_model", "score_with_verifier", "split_prompts"]

#: The pair-selection rules (config ``generation.pairing``).
PAIRING_RULES: tuple[str, ...] = ("max_min", "max_random")
#: Ground-truth keys of a prompt row, passed to the verifiers as they are.
TRUTH_KEYS: tuple[str, ...] = ("answer", "tests", "instructions", "instruction_id_list",
                               "kwargs", "verifier")

Progress = Callable[[float, float | None, str], None]


@dataclass
class PromptRow:
    """One prompt of a prompt file: the prompt (text or messages), its ground truth
    (:data:`TRUTH_KEYS` present in the row) and its line in the file."""

    prompt: Any
    truth: dict[str, Any]
    line: int

    @property
    def reference(self) -> str | None:
        return reference_of(self.truth)


def reference_of(truth: dict[str, Any]) -> str | None:
    """The reference answer of a row (its ``answer``, the first when a list) as a string,
    for stage 7's verifier judge and stage 1's perplexity; None without one."""
    a = truth.get("answer")
    if isinstance(a, list):
        a = a[0] if a else None
    if a is None or isinstance(a, bool):
        return None
    return str(a)


def _is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)


def read_prompt_rows(path: str | Path) -> list[PromptRow]:
    """The rows of a prompt file (JSONL, JSON array or Parquet): each needs ``prompt`` (a
    string or a list of ``{role, content}`` messages); the ground-truth keys
    (:data:`TRUTH_KEYS`) are kept for the verifiers. Raises :class:`InputError` naming the
    file, line and field."""
    from .verifiers import read_verify_rows

    raw, lines = read_verify_rows(path)
    if not raw:
        raise InputError("the prompt file has no rows", file=path)
    out = []
    for row, line in zip(raw, lines):
        if not isinstance(row, dict):
            raise InputError("expected a JSON object", file=path, line=line)
        if not _is_prompt(row.get("prompt")):
            raise InputError("missing or empty (a prompt row needs a prompt: text or a list of "
                             "{role, content} messages)", file=path, line=line, field="prompt")
        out.append(PromptRow(prompt=row["prompt"], line=line,
                             truth={k: row[k] for k in TRUTH_KEYS if k in row}))
    return out


def _messages(prompt: Any) -> list[dict[str, str]]:
    from .messages import as_messages

    return as_messages(prompt, "user")


def split_prompts(rows: Sequence[PromptRow], *, fraction: float, min_pairs: int, max_pairs: int,
                  seed: int) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, held-out) prompts by :func:`realign.rows.split_heldout` (a seeded hash of
    the prompt text; the held-out count from ``fraction`` clamped to ``min_pairs`` ..
    ``max_pairs``): stage 1 and stage 2 compute the same split."""
    from .rows import split_heldout

    wrapped = [{"prompt": _messages(r.prompt), "i": i} for i, r in enumerate(rows)]
    train, held = split_heldout(wrapped, fraction=fraction, min_pairs=min_pairs,
                                max_pairs=max_pairs, seed=seed)
    return [rows[w["i"]] for w in train], [rows[w["i"]] for w in held]


def prompt_rows_from_pairs(pairs: Sequence[dict[str, Any]]) -> list[PromptRow]:
    """The distinct prompts of preference rows (TRL rows or plain pairs), in order; a row's
    ``reference`` becomes the ``answer`` the verifier checks."""
    out: dict[str, PromptRow] = {}
    for i, r in enumerate(pairs):
        key = prompt_key(r["prompt"])
        if key not in out:
            truth = {"answer": str(r["reference"])} if r.get("reference") is not None else {}
            out[key] = PromptRow(prompt=r["prompt"], truth=truth, line=i + 1)
        elif r.get("reference") is not None and "answer" not in out[key].truth:
            out[key].truth["answer"] = str(r["reference"])
    return list(out.values())


def prompt_key(prompt: Any) -> str:
    """A prompt (text or a message list) as a comparable string: text and a one-user-message
    list are the same prompt."""
    return json.dumps(_messages(prompt), sort_keys=True, ensure_ascii=False)


def outside_probe_first(rows: Sequence[PromptRow], probe: Sequence[dict[str, Any]],
                        limit: int) -> list[PromptRow]:
    """At most ``limit`` prompts, those that are not prompts of the KL ``probe`` first
    (stage 5 selected its checkpoint on the probe)."""
    keys = {prompt_key(r["prompt"]) for r in probe}
    outside = [r for r in rows if prompt_key(r.prompt) not in keys]
    inside = [r for r in rows if prompt_key(r.prompt) in keys]
    return (outside + inside)[:limit]


# ----------------------------------------------------------------------------- scoring


def score_with_verifier(rows: Sequence[PromptRow], responses: Sequence[Sequence[str]], *,
                        file: str | Path | None = None, workers: int | None = None
                        ) -> list[list[float | None]]:
    """The verifier score in [0, 1] of every response (None: the row cannot be verified),
    ``out[i][j]`` for response j of row i (:func:`realign.verifiers.verify_rows`)."""
    from .verifiers import verify_rows

    flat, lines = [], []
    for r, resp in zip(rows, responses):
        for text in resp:
            flat.append({**r.truth, "prompt": r.prompt, "response": text})
            lines.append(r.line)
    if not flat:
        return [[] for _ in rows]
    rep = verify_rows(flat, lines=lines, file=file, workers=workers)
    out: list[list[float | None]] = []
    k = 0
    for resp in responses:
        out.append([rep.results[k + j].score if rep.results[k + j].verifiable else None
                    for j in range(len(resp))])
        k += len(resp)
    return out


def score_with_reward_model(model: Any, tokenizer: Any, rows: Sequence[PromptRow],
                            responses: Sequence[Sequence[str]], *, max_length: int,
                            batch_size: int = 8) -> list[list[float]]:
    """The reward r(prompt, response) of every response (:func:`realign.reward.reward_input_ids`,
    :func:`realign.reward.score_sequences`), ``out[i][j]``."""
    from .reward import reward_input_ids, score_sequences

    seqs = [reward_input_ids(tokenizer, r.prompt, text, max_length)
            for r, resp in zip(rows, responses) for text in resp]
    scores = score_sequences(model, tokenizer, seqs, batch_size=batch_size) if seqs else []
    out, k = [], 0
    for resp in responses:
        out.append([float(s) for s in scores[k:k + len(resp)]])
        k += len(resp)
    return out


def chat_template_mismatch(policy_tokenizer: Any, scorer_tokenizer: Any) -> str | None:
    """Why the scorer reads prompts differently from the policy (their chat templates
    differ, or one has none), or None when the templates are the same text."""
    a = getattr(policy_tokenizer, "chat_template", None) or None
    b = getattr(scorer_tokenizer, "chat_template", None) or None
    if a == b:
        return None
    if a is None or b is None:
        which = "the policy" if a is None else "the reward model"
        return (f"{which} has no chat template and the other has one: the reward model scores "
                "prompts formatted differently from how the policy sees them")
    return ("the reward model's chat template differs from the policy's: it scores prompts "
            "formatted differently from how the policy sees them (train the reward model from "
            "the policy's base model, or expect noisier pairs)")


# ----------------------------------------------------------------------------- pairing


def pick_pair(scores: Sequence[float], rule: str = "max_min",
              rng: random.Random | None = None) -> tuple[int, int] | None:
    """(chosen index, rejected index) by ``rule`` (:data:`PAIRING_RULES`), or None when every
    score is the same. ``max_min``: the first best and the first worst; ``max_random``:
    the first best and a random one of those scored lower (``rng``, seeded by the caller)."""
    if rule not in PAIRING_RULES:
        raise ValueError(f"unknown pairing rule {rule!r} (choose from {', '.join(PAIRING_RULES)})")
    if len(scores) < 2:
        return None
    best, worst = max(scores), min(scores)
    if best == worst:
        return None
    i = scores.index(best)
    if rule == "max_min":
        return i, scores.index(worst)
    lower = [j for j, s in enumerate(scores) if s < best]
    return i, (rng or random.Random(0)).choice(lower)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def make_pairs(rows: Sequence[PromptRow], responses: Sequence[Sequence[str]],
               scores: Sequence[Sequence[float | None]], *, scorer: str, rule: str = "max_min",
               min_gap: float = 0.1, seed: int = 0
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pairs, records): one pair per prompt with a real difference (see the module doc),
    and one record per prompt (its responses, scores, the indices picked or why it was
    dropped). ``scorer`` is ``verifier`` (scores in [0, 1]) or ``reward_model`` (raw
    rewards). A pair row: ``prompt``, ``chosen``, ``rejected``, ``score_chosen``,
    ``score_rejected`` (0-1 scale) and ``reference`` when the row has an answer."""
    rng = random.Random(seed)
    pairs: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for r, resp, sc in zip(rows, responses, scores):
        rec: dict[str, Any] = {"line": r.line, "prompt": r.prompt, "responses": list(resp),
                               "scores": list(sc), "chosen": None, "rejected": None,
                               "dropped": None}
        records.append(rec)
        usable = [(j, s) for j, s in enumerate(sc) if s is not None]
        if not usable:
            rec["dropped"] = "not verifiable"
            continue
        got = pick_pair([s for _, s in usable], rule, rng)
        if got is None:
            rec["dropped"] = "no difference"
            continue
        ci, ri = usable[got[0]][0], usable[got[1]][0]
        sc_c, sc_r = float(sc[ci]), float(sc[ri])  # type: ignore[arg-type]
        if scorer == "reward_model":
            s_c = _sigmoid(sc_c - sc_r)
            s_r = 1.0 - s_c
        else:
            s_c, s_r = sc_c, sc_r
        if s_c - s_r < min_gap:
            rec["dropped"] = "gap below min_score_gap"
            continue
        if resp[ci].strip() == resp[ri].strip():
            rec["dropped"] = "identical responses"
            continue
        rec["chosen"], rec["rejected"] = ci, ri
        pair: dict[str, Any] = {**_pair_texts(r.prompt, resp[ci], resp[ri]),
                                "score_chosen": s_c, "score_rejected": s_r}
        if r.reference is not None:
            pair["reference"] = r.reference
        pairs.append(pair)
    return pairs, records


def _pair_texts(prompt: Any, chosen: str, rejected: str) -> dict[str, Any]:
    """A pair in one style: plain strings when the prompt is text or one user message,
    else the messages with the responses as assistant messages (conversational)."""
    msgs = _messages(prompt)
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return {"prompt": msgs[0]["content"], "chosen": chosen, "rejected": rejected}
    return {"prompt": msgs, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


# ----------------------------------------------------------------------------- the whole step


@dataclass
class GenerationResult:
    """What :func:`generate_pairs` made: the pairs, one record per prompt, the counts and
    timings (``stats``) and warnings (a chat-template mismatch)."""

    pairs: list[dict[str, Any]]
    records: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def write_records(self, path: Path) -> Path:
        from .fileio import write_jsonl_atomic

        write_jsonl_atomic(path, self.records)
        return path


def generate_pairs(policy: Any, rows: Sequence[PromptRow], *, samples: int = 4,
                   temperature: float = 1.0, top_p: float = 0.95, max_new_tokens: int = 64,
                   batch_size: int = 32, max_length: int = 256, seed: int = 0,
                   scorer: str = "verifier", reward_model: Any = None,
                   reward_max_length: int = 256, pairing: str = "max_min",
                   min_gap: float = 0.1, file: str | Path | None = None,
                   progress: Progress | None = None) -> GenerationResult:
    """Sample, score and pair (see the module doc) for ``rows`` with the policy
    (a :class:`realign.backends.trl.ModelHandle`). ``scorer``: ``verifier`` or
    ``reward_model`` (then ``reward_model`` is a ``(model, tokenizer)`` pair, see
    :func:`realign.reward.load_reward_model`). ``progress(done, total, message)`` follows
    the sampling (prompts) and the scoring."""
    from .backends.trl import decode_responses, sample_many

    if scorer not in ("verifier", "reward_model"):
        raise ValueError(f"scorer must be verifier or reward_model, got {scorer!r}")
    say = progress or (lambda d, t, m: None)
    warnings: list[str] = []
    t0 = time.perf_counter()
    say(0, len(rows), f"sampling {samples} responses per prompt")
    enc = sample_many(policy, [r.prompt for r in rows], num_samples=samples,
                      max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                      top_p=top_p, batch_size=batch_size, max_length=max_length,
                      progress=lambda d, t: say(d, t, f"sampling {samples} responses per prompt"))
    t_sample = time.perf_counter() - t0
    responses = [decode_responses(policy.tokenizer, e) for e in enc]
    tokens = sum(x.n_completion for e in enc for x in e)
    say(0, None, f"scoring {len(rows) * samples} responses ({scorer.replace('_', ' ')})")
    t1 = time.perf_counter()
    if scorer == "verifier":
        scores: list[list[float | None]] = score_with_verifier(rows, responses, file=file)
    else:
        if reward_model is None:
            raise ValueError("scorer reward_model needs reward_model=(model, tokenizer)")
        rm, rm_tok = reward_model
        why = chat_template_mismatch(policy.tokenizer, rm_tok)
        if why:
            warnings.append(why)
        scores = score_with_reward_model(rm, rm_tok, rows, responses, max_length=reward_max_length)  # type: ignore[assignment]
    t_score = time.perf_counter() - t1
    pairs, records = make_pairs(rows, responses, scores, scorer=scorer, rule=pairing,
                                min_gap=min_gap, seed=seed)
    flat = [s for sc in scores for s in sc if s is not None]
    words = [len(t.split()) for resp in responses for t in resp]
    dropped = Counter(r["dropped"] for r in records if r["dropped"])
    stats = {
        "prompts": len(rows), "samples_per_prompt": samples, "responses": len(words),
        "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
        "scorer": scorer, "pairing": pairing, "min_score_gap": min_gap,
        "pairs": len(pairs), "dropped": dict(dropped.most_common()),
        "mean_score": sum(flat) / len(flat) if flat else None,
        "pass_rate": (sum(1 for s in flat if s >= 1.0) / len(flat)
                      if flat and scorer == "verifier" else None),
        "scored_responses": len(flat),
        "mean_response_words": sum(words) / len(words) if words else None,
        "response_tokens": tokens, "sampling_seconds": round(t_sample, 3),
        "scoring_seconds": round(t_score, 3),
        "tokens_per_second": round(tokens / t_sample, 2) if t_sample > 0 else None,
    }
    return GenerationResult(pairs=pairs, records=records, stats=stats, warnings=warnings)
