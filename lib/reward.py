"""Reward models: training with TRL's ``RewardTrainer``, scoring pairs, and the statistics
stage 4 reports (docs/quality-thresholds.md#definitions: reward accuracy, preference gap).

Formulas (each pure function below states its own):

* reward accuracy = #(r(c_i) > r(r_i)) ÷ n over held-out pairs (a tie counts as wrong),
  with a Wilson score 95% interval (:func:`wilson_interval`);
* length-only baseline accuracy: predict that the response with more words is chosen,
  ties (same word count) count half (:func:`length_baseline_accuracy`);
* preference gap from a reward model: s(y) = P_BT(y ≻ y') = σ(r(y) − r(y')), the
  Bradley–Terry probability the reward model was trained to predict, so for a pair
  s(c) − s(r) = σ(Δ) − σ(−Δ) = 2σ(Δ) − 1 = tanh(Δ/2) ∈ (−1, 1), Δ = r(c) − r(r);
  the gap is the mean over pairs, with a normal 95% CI (:func:`reward_gap`).

Tokenization of a (prompt, response) for the reward model is TRL's: the chat template
applied to prompt + response messages (``apply_chat_template(..., tokenize=True)``), or
prompt text + response text + EOS without a template; sequences longer than
``max_length`` keep their last ``max_length`` tokens (the end of the response decides
the score: the head reads the last token). Training and scoring use the same function
(:func:`reward_input_ids`), so the scores are those of the trained head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .config import DEFAULT_MAX_LENGTH
from .errors import InputError

Message = dict[str, str]
Progress = Callable[[float, float | None, str], None]

#: Quantiles reported for the margin distribution r(chosen) − r(rejected).
MARGIN_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Number of pair-length buckets (quantiles of the pair's mean word count).
LENGTH_BUCKETS = 4


# ---------------------------------------------------------------------------- pure stats


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n (95% for the default z).

    center = (p + z²/2n) / (1 + z²/n), half = z·√(p(1−p)/n + z²/4n²) / (1 + z²/n),
    p = k/n. None when n = 0. Stays inside [0, 1] and is sensible at p = 0 or 1,
    unlike the normal approximation.
    """
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    center = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, center - half), min(1.0, center + half))


def pair_accuracy(r_chosen: Sequence[float], r_rejected: Sequence[float]) -> float | None:
    """#(r_c > r_r) ÷ n (ties are wrong); None when there are no pairs."""
    if len(r_chosen) != len(r_rejected):
        raise ValueError(f"{len(r_chosen)} chosen scores but {len(r_rejected)} rejected")
    n = len(r_chosen)
    return None if n == 0 else sum(c > r for c, r in zip(r_chosen, r_rejected)) / n


def words(text: str) -> int:
    """Whitespace-separated words (the unit of the stage-2 ``length_bias`` gate)."""
    return len(text.split())


def length_baseline_accuracy(chosen_words: Sequence[int], rejected_words: Sequence[int]) -> float | None:
    """Accuracy of "the longer response is chosen": (#(w_c > w_r) + #(w_c = w_r)/2) ÷ n."""
    n = len(chosen_words)
    if n == 0:
        return None
    right = sum(c > r for c, r in zip(chosen_words, rejected_words))
    ties = sum(c == r for c, r in zip(chosen_words, rejected_words))
    return (right + 0.5 * ties) / n


def quantiles(values: Sequence[float], qs: Sequence[float] = MARGIN_QUANTILES) -> dict[str, float]:
    """min, the given quantiles (numpy linear interpolation), max and mean; {} when empty."""
    import numpy as np

    if not len(values):
        return {}
    x = np.asarray(values, dtype=np.float64)
    out = {"min": float(x.min())}
    for q in qs:
        out[f"p{round(q * 100):02d}"] = float(np.quantile(x, q))
    out.update(max=float(x.max()), mean=float(x.mean()))
    return out


def accuracy_by_length(r_chosen: Sequence[float], r_rejected: Sequence[float],
                       chosen_words: Sequence[int], rejected_words: Sequence[int],
                       buckets: int = LENGTH_BUCKETS) -> dict[str, Any]:
    """Reward accuracy per length bucket.

    ``by_longer``: pairs grouped by which response has more words (chosen longer,
    rejected longer, same length); a reward model that only rewards length is right on
    the first group and wrong on the second. ``by_pair_length``: pairs grouped into
    ``buckets`` quantile bins of the pair's mean word count (w_c + w_r)/2, each with its
    word range. Every group reports ``n`` and ``accuracy`` (None when empty).
    """
    import numpy as np

    rc, rr = np.asarray(r_chosen, float), np.asarray(r_rejected, float)
    wc, wr = np.asarray(chosen_words, float), np.asarray(rejected_words, float)
    right = rc > rr

    def group(mask: Any) -> dict[str, Any]:
        n = int(mask.sum())
        return {"n": n, "accuracy": float(right[mask].mean()) if n else None}

    out: dict[str, Any] = {"by_longer": {
        "chosen_longer": group(wc > wr), "rejected_longer": group(wc < wr),
        "same_length": group(wc == wr)}}
    mean_len = (wc + wr) / 2
    if mean_len.size:
        edges = np.unique(np.quantile(mean_len, np.linspace(0, 1, buckets + 1)))
        bins = []
        for k in range(max(len(edges) - 1, 1)):
            lo = edges[k]
            hi = edges[k + 1] if len(edges) > 1 else edges[0]
            last = k == len(edges) - 2 or len(edges) == 1
            mask = (mean_len >= lo) & ((mean_len <= hi) if last else (mean_len < hi))
            bins.append({"words": [float(lo), float(hi)], **group(mask)})
        out["by_pair_length"] = bins
    else:
        out["by_pair_length"] = []
    return out


class RewardGap(BaseModel):
    """Preference gap measured by a reward model (see :func:`reward_gap`)."""

    gap: float | None
    ci95: tuple[float, float] | None
    n: int
    negative: list[int]  # indices (or line numbers, when given) of pairs with gap < 0
    normalization: str = "s(y) = sigmoid(r(y) - r(y')): s(c) - s(r) = tanh((r(c) - r(r)) / 2)"


def reward_gap(r_chosen: Sequence[float], r_rejected: Sequence[float],
               ids: Sequence[int] | None = None) -> RewardGap:
    """gap = mean_i tanh(Δ_i / 2), Δ_i = r(c_i) − r(r_i), with a normal 95% CI.

    tanh(Δ/2) = 2σ(Δ) − 1 = s(c) − s(r) where s(y) = σ(r(y) − r(y')) is the
    Bradley–Terry probability that y is preferred to the other response of its pair:
    scores in [0, 1] as the preference-gap definition asks, invariant to the reward
    model's arbitrary offset (a reward model trained on −log σ(Δ) fixes differences,
    not levels), and the quantity the model was trained to predict. CI: mean ±
    1.96·sd/√n (as for explicit scores). ``negative`` lists the pairs whose gap is
    below 0 (the reward model prefers the rejected response), by ``ids[i]`` or index.
    """
    from .metrics import RunningDiff

    if len(r_chosen) != len(r_rejected):
        raise ValueError(f"{len(r_chosen)} chosen scores but {len(r_rejected)} rejected")
    diffs = [math.tanh((c - r) / 2) for c, r in zip(r_chosen, r_rejected)]
    ids = list(ids) if ids is not None else list(range(len(diffs)))
    stats = RunningDiff()
    stats.update(diffs)
    negative = [i for i, d in zip(ids, diffs) if d < 0]
    if stats.n == 0:
        return RewardGap(gap=None, ci95=None, n=0, negative=[])
    return RewardGap(gap=stats.mean, ci95=stats.ci95(), n=stats.n, negative=negative)


# ---------------------------------------------------------------------------- tokenization


def _messages(x: Any, role: str) -> list[Message]:
    if isinstance(x, list):
        return [{"role": m.get("role", role), "content": str(m["content"])} for m in x]
    return [{"role": role, "content": str(x)}]


def _text(msgs: list[Message]) -> str:
    return "\n".join(m["content"] for m in msgs)


def reward_input_ids(tokenizer: Any, prompt: Any, response: Any, max_length: int) -> list[int]:
    """Token ids the reward model scores for (prompt, response), as TRL's RewardTrainer
    tokenizes them: chat template over prompt + response messages, or prompt text +
    response text + EOS without a template. Longer than ``max_length``: the last
    ``max_length`` tokens are kept (the head reads the final token)."""
    p, r = _messages(prompt, "user"), _messages(response, "assistant")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(p + r, tokenize=True, return_dict=True)["input_ids"]
    else:
        text = _text(p) + _text(r)
        eos = tokenizer.eos_token or ""
        if eos and not text.endswith(eos):
            text += eos
        ids = tokenizer(text)["input_ids"]
    ids = list(ids)
    return ids[-max_length:] if len(ids) > max_length else ids


# ---------------------------------------------------------------------------- models


def load_reward_model(path: str | Path, *, device: str | None = None) -> tuple[Any, Any]:
    """A saved reward model (sequence classification, one label) and its tokenizer.

    ``path`` must hold a model saved by stage 4 (or any ``*ForSequenceClassification``
    with ``num_labels == 1``); anything else is an :class:`InputError`.
    """
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from .backends.trl import pick_device, pick_dtype

    p = Path(path)
    if not p.is_dir():
        raise InputError("reward model folder not found", file=p, field="reward_model")
    try:
        cfg = AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise InputError(f"not a reward model folder: {e}", file=p,
                         field="reward_model") from None
    if getattr(cfg, "num_labels", None) != 1 or not any(
            a.endswith("ForSequenceClassification") for a in (cfg.architectures or [])):
        raise InputError("not a reward model (need a *ForSequenceClassification with one label; "
                         "stage 4 saves one as stages/4-reward_model/reward_model)",
                         file=p, field="reward_model")
    dev = pick_device(device)
    model = AutoModelForSequenceClassification.from_pretrained(str(p), dtype=pick_dtype(dev))
    tok = AutoTokenizer.from_pretrained(str(p))
    _set_pad(model, tok)
    model.to(dev)
    model.eval()
    return model, tok


def _set_pad(model: Any, tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def score_sequences(model: Any, tokenizer: Any, seqs: Sequence[list[int]], *, batch_size: int = 8,
                    progress: Callable[[int, int], None] | None = None) -> list[float]:
    """r(x) for token-id sequences, in input order: one forward pass per batch of similar
    lengths (right-padded, attention-masked; the head reads the last non-pad token)."""
    import torch

    out: list[float] = [0.0] * len(seqs)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k in range(0, len(order), batch_size):
                idx = order[k:k + batch_size]
                length = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), length), pad, dtype=torch.long)
                att = torch.zeros((len(idx), length), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                    att[r, : len(seqs[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=att.to(device),
                               use_cache=False).logits
                for r, i in enumerate(idx):
                    out[i] = float(logits[r, 0].float())
                if progress:
                    progress(min(k + batch_size, len(order)), len(order))
    finally:
        model.train(was)
    return out


def score_pairs(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], *, batch_size: int = 8,
                max_length: int = DEFAULT_MAX_LENGTH, progress: Callable[[int, int], None] | None = None
                ) -> tuple[list[float], list[float]]:
    """(r(chosen_i), r(rejected_i)) for rows with ``prompt``, ``chosen``, ``rejected``
    (strings or message lists; TRL's conversational format as stage 2 writes it)."""
    seqs = []
    for r in rows:
        seqs.append(reward_input_ids(tokenizer, r["prompt"], r["chosen"], max_length))
        seqs.append(reward_input_ids(tokenizer, r["prompt"], r["rejected"], max_length))
    scores = score_sequences(model, tokenizer, seqs, batch_size=batch_size, progress=progress)
    return scores[0::2], scores[1::2]


def train_reward_model(base: str | Path, rows: list[dict[str, Any]], *, output_dir: Path,
                       learning_rate: float, max_steps: int, num_epochs: float, batch_size: int,
                       gradient_accumulation_steps: int, max_length: int, seed: int,
                       lora: dict[str, Any] | None = None, device: str | None = None,
                       extra: dict[str, Any] | None = None, progress: Progress | None = None,
                       log: Callable[[dict[str, Any]], None] | None = None) -> tuple[Any, Any]:
    """Train r(x, y) with TRL's ``RewardTrainer`` on preference rows; return (model, tokenizer).

    The model is ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)``:
    the base LM's body with a new linear head on the last token. Loss (TRL):
    −log σ(r(x, y_c) − r(x, y_r)) averaged over the batch. With ``lora`` (peft
    ``LoraConfig`` kwargs) only adapters and the head train, and the adapters are merged
    into the returned model. Rows are tokenized by :func:`reward_input_ids` (the same
    function scoring uses) and passed to TRL pre-tokenized (``chosen_ids``/``rejected_ids``).
    """
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import RewardConfig, RewardTrainer

    from .backends.trl import pick_device

    tok = AutoTokenizer.from_pretrained(str(base))
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1,
                                                               dtype=torch.float32)
    _set_pad(model, tok)
    data = Dataset.from_list([
        {"chosen_ids": reward_input_ids(tok, r["prompt"], r["chosen"], max_length),
         "rejected_ids": reward_input_ids(tok, r["prompt"], r["rejected"], max_length)}
        for r in rows])
    dev = pick_device(device)
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()

    class _Report(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if progress:
                progress(state.global_step, state.max_steps, "reward model training")

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if log and logs:
                log({"step": state.global_step, **{k: v for k, v in logs.items()
                                                    if isinstance(v, (int, float))}})

    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir), learning_rate=learning_rate, max_steps=max_steps,
        num_train_epochs=num_epochs, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, max_length=max_length,
        seed=seed, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        bf16=bf16, dataloader_num_workers=0, use_cpu=dev.type == "cpu")
    import dataclasses

    # checkpointing off by default (small models); transformers 5 renamed the field
    names = {f.name for f in dataclasses.fields(RewardConfig)}
    kwargs["activation_checkpointing" if "activation_checkpointing" in names
           else "gradient_checkpointing"] = False
    kwargs.update(extra or {})
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="SEQ_CLS", **lora)
    trainer = RewardTrainer(model=model, args=RewardConfig(**kwargs), train_dataset=data,
                            processing_class=tok, callbacks=[_Report()], peft_config=peft_config)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # realign reports progress itself
    trainer.train()
    trained = trainer.model
    if lora:
        trained = trained.merge_and_unload()
    trained.eval()
    return trained, tok


def save_reward_model(model: Any, tokenizer: Any, path: Path) -> Path:
    """Save model (safetensors) + tokenizer to ``path`` atomically, through the backend's
    own save (temp folder, then rename; an existing folder is swapped out once complete)."""
    from .backends.trl import ModelHandle, TRLBackend

    device = next(model.parameters()).device
    return TRLBackend().save(ModelHandle(model=model, tokenizer=tokenizer, device=device,
                                         source="reward_model"), path)


# ---------------------------------------------------------------------------- files


def _block_rows(block: Any) -> list[dict[str, Any]]:
    """The original rows of a :class:`realign.data.PairBlock`, aligned with its table."""
    import json

    if block.raw_lines is not None:
        return [json.loads(ln) for ln in block.raw_lines]
    if block.raw_objects is not None:
        return list(block.raw_objects)
    assert block.raw_table is not None
    return block.raw_table.to_pylist()


def gap_on_file(path: str | Path, reward_model: str | Path, *, thresholds: Any = None,
                exclude_lines: Sequence[int] = (), split: str | None = None,
                skip_bad_rows: bool = False, drop_negative: str | Path | None = None,
                batch_size: int = 8, max_length: int = DEFAULT_MAX_LENGTH, device: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """The ``preference_gap`` gate of a preference file, scored by a reward model.

    Every parsed pair whose line is not in ``exclude_lines`` (pass the stage-2 findings:
    duplicates, identical, empty, contaminated, so the gap is over usable pairs) is scored:
    gap = mean tanh((r(c) − r(r)) / 2) (:func:`reward_gap`). Returns ``(gate, findings)``;
    ``findings["negative_gap"]`` lists the 1-based lines whose gap is below 0.
    ``drop_negative``: also write the input without those pairs (and without malformed
    rows), in the input's format, atomically (:class:`realign.validation.CleanWriter`).
    """
    import numpy as np

    from .data import PairSource
    from .gates import Thresholds
    from .rows import to_trl_row
    from .validation import CleanWriter

    thresholds = thresholds or Thresholds()
    model, tok = load_reward_model(reward_model, device=device)
    skip = set(int(x) for x in exclude_lines)
    lines: list[int] = []
    rows: list[dict[str, Any]] = []
    source = PairSource(path, split=split, skip_bad_rows=skip_bad_rows)
    for block in source.blocks():
        blines = block.table.column("line").to_pylist()
        for ln, raw in zip(blines, _block_rows(block)):
            if int(ln) not in skip:
                lines.append(int(ln))
                rows.append(to_trl_row(raw))
    rc, rr = score_pairs(model, tok, rows, batch_size=batch_size, max_length=max_length,
                         progress=progress)
    g = reward_gap(rc, rr, ids=lines)
    detail = (f"{g.n} pairs scored by the reward model {reward_model}; "
              "s(y) = sigmoid(r(y) - r(y')), gap = mean tanh((r(c) - r(r))/2); "
              f"{len(g.negative)} pairs with a negative gap")
    if g.n == 0:
        detail = "unmeasured: no usable pair to score"
    gate = thresholds.evaluate("preference_gap", g.gap, ci95=g.ci95, detail=detail,
                               remedy_context={"data": str(path), "negative_lines": g.negative,
                                               "negative_source": "the data's"})
    accuracy = pair_accuracy(rc, rr)
    findings: dict[str, Any] = {
        "reward_model": str(reward_model), "scored_pairs": g.n, "gap": g.gap, "ci95": g.ci95,
        "normalization": g.normalization, "accuracy": accuracy,
        "margin": quantiles([c - r for c, r in zip(rc, rr)]),
        "negative_gap": g.negative,
    }
    if drop_negative:
        neg = set(g.negative)
        writer = CleanWriter(PairSource(path, split=split, skip_bad_rows=skip_bad_rows),
                             Path(drop_negative))
        try:
            for block in writer.source.blocks():
                bl = np.asarray(block.table.column("line").to_pylist(), dtype=np.int64)
                writer.write(block, np.asarray([int(x) not in neg for x in bl], dtype=bool))
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        findings["written"] = {"path": str(drop_negative), "dropped": len(neg)}
    return gate, findings


def apply_reward_gap(verdict: Any, path: str | Path, reward_model: str | Path, *,
                     thresholds: Any = None, split: str | None = None, skip_bad_rows: bool = False,
                     drop_negative: str | Path | None = None, batch_size: int = 8,
                     max_length: int = DEFAULT_MAX_LENGTH, device: str | None = None) -> Any:
    """Add the reward model's gap to a stage-2 verdict (``realign validate --reward-model``).

    The usable pairs (lines not in the verdict's duplicates, identical, empty or
    contaminated findings) are scored by :func:`gap_on_file`. When the verdict's
    ``preference_gap`` is unmeasured (no explicit scores) the reward-model gate replaces
    it; explicit scores keep precedence and the reward-model gap is reported beside them.
    ``findings["reward_model"]`` holds the gap, accuracy, margins and the lines with a
    negative gap.
    """
    from .gates import verdict_status

    f = verdict.findings
    exclude = [x for k in ("duplicates", "identical", "empty", "contaminated") for x in f.get(k, [])]
    gate, found = gap_on_file(path, reward_model, thresholds=thresholds, exclude_lines=exclude,
                              split=split, skip_bad_rows=skip_bad_rows, drop_negative=drop_negative,
                              batch_size=batch_size, max_length=max_length, device=device)
    current = next((i for i, g in enumerate(verdict.gates) if g.name == "preference_gap"), None)
    if current is None or verdict.gates[current].status == "unmeasured":
        found["used_for_gate"] = True
        if current is None:
            verdict.gates.append(gate)
        else:
            verdict.gates[current] = gate
    else:
        found["used_for_gate"] = False
        verdict.warnings.append("preference_gap comes from the explicit scores; the reward "
                                f"model's gap ({found['gap']}) is in findings.reward_model")
    f["reward_model"] = found
    if drop_negative:
        verdict.artifacts["without_negative_gap"] = str(drop_negative)
    verdict.status = verdict_status(verdict.gates)
    return verdict
