"""Tokenization shared by every backend: torch-free, it needs only a Hugging Face tokenizer.

* :func:`encode_pair` — one (prompt, completion) for scoring (log-probs, KL, IFD): the
  completion is scored, the prompt is context. Both backends (``trl`` and ``mlx``) score
  exactly these tokens, so their numbers are comparable.
* :func:`encode_prompt` — a prompt ready for generation.
* :func:`encode_preference` — one preference pair the way TRL's ``DPOTrainer`` tokenizes
  and truncates it (``trl.trainer.dpo_trainer``: ``tokenize_fn`` in ``_prepare_dataset``
  and ``DataCollatorForPreference``), so a DPO step on the MLX backend sees the same
  tokens as TRL's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import DEFAULT_MAX_LENGTH
from ..errors import InputError
from ..messages import Message, as_messages, as_text

Prompt = str | list[Message]


@dataclass
class Encoded:
    """One tokenized (prompt, completion): ``input_ids[start:]`` are the completion tokens."""

    input_ids: list[int]
    start: int

    @property
    def n_completion(self) -> int:
        return len(self.input_ids) - self.start


def encode_pair(tokenizer: Any, prompt: Prompt, completion: Prompt, max_length: int = DEFAULT_MAX_LENGTH) -> Encoded:
    """Tokenize one (prompt, completion); the completion is scored, the prompt is context.

    With a chat template: prompt text = template(prompt messages, add_generation_prompt),
    full text = template(prompt messages + assistant completion); the completion tokens
    are the tokens of the full text after the prompt's tokens (when the joint tokenization
    does not extend the prompt's, the completion text is tokenized on its own and appended,
    as TRL does). Without a template: tokenizer(prompt) + tokenizer(completion) + EOS.

    Longer than ``max_length``: the completion is cut from the right to ``max_length - 1``
    tokens and the prompt from the left (its end is kept), so at least one context token
    precedes the completion.
    """
    if getattr(tokenizer, "chat_template", None):
        p_msgs = as_messages(prompt, "user")
        c_msgs = as_messages(completion, "assistant")
        p_text = tokenizer.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True)
        f_text = tokenizer.apply_chat_template(p_msgs + c_msgs, tokenize=False)
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        f_ids = tokenizer(f_text, add_special_tokens=False)["input_ids"]
        if f_text.startswith(p_text) and f_ids[: len(p_ids)] == p_ids:
            c_ids = f_ids[len(p_ids):]
        elif f_text.startswith(p_text):
            c_ids = tokenizer(f_text[len(p_text):], add_special_tokens=False)["input_ids"]
        else:
            raise InputError("the tokenizer's chat template renders the prompt differently when a "
                             "completion follows it; cannot split prompt and completion tokens")
    else:
        p_ids = tokenizer(as_text(prompt), add_special_tokens=True)["input_ids"]
        c_ids = tokenizer(as_text(completion), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            c_ids = c_ids + [tokenizer.eos_token_id]
    if not p_ids:  # nothing to condition the first token on: it becomes context
        p_ids, c_ids = c_ids[:1], c_ids[1:]
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    c_ids = c_ids[: max_length - 1]
    p_ids = p_ids[-(max_length - len(c_ids)):]
    return Encoded(input_ids=list(p_ids) + list(c_ids), start=len(p_ids))


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt ready for generation (chat template + generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(as_messages(prompt, "user"), tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(as_text(prompt), add_special_tokens=True)["input_ids"])


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is never scored)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid) if pid is not None else 0


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first): less padding, same results."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for k in range(0, len(order), batch_size):
        yield order[k:k + batch_size]


# ---------------------------------------------------------------- preference pairs (DPO)


@dataclass
class PreferenceEncoded:
    """One preference pair as TRL's DPOTrainer tokenizes it (before truncation):
    ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids`` are the two sequences."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def sequences(self, max_length: int | None, truncation_mode: str = "keep_start"
                  ) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
        """((chosen ids, chosen completion mask), (rejected ids, rejected mask)), each
        truncated to ``max_length`` as TRL's ``DataCollatorForPreference`` does:
        ``keep_start`` keeps the first ``max_length`` tokens, ``keep_end`` the last."""
        out = []
        for comp in (self.chosen_ids, self.rejected_ids):
            ids = self.prompt_ids + comp
            mask = [0] * len(self.prompt_ids) + [1] * len(comp)
            if max_length is not None:
                if truncation_mode == "keep_start":
                    ids, mask = ids[:max_length], mask[:max_length]
                elif truncation_mode == "keep_end":
                    ids, mask = ids[-max_length:], mask[-max_length:]
                else:
                    raise InputError(f"unsupported truncation_mode {truncation_mode!r}: expected "
                                     "keep_start or keep_end", field="truncation_mode")
            out.append((ids, mask))
        return out[0], out[1]


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "content" in m for m in value)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer: Any, messages: list[Message], **kwargs: Any) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def encode_preference(tokenizer: Any, prompt: Prompt, chosen: Prompt, rejected: Prompt) -> PreferenceEncoded:
    """Tokenize one preference pair exactly as TRL's ``DPOTrainer`` does (TRL 1.x).

    Conversational (any field is a message list; strings become one message, the prompt
    a user turn and the responses assistant turns): ``prompt_ids`` =
    template(prompt, add_generation_prompt=True), and template(prompt + chosen),
    template(prompt + rejected) tokenized by ``apply_chat_template(tokenize=True)``.
    Plain text (all three strings): the EOS token text is appended to each response that
    does not end with it, and ``tokenizer(prompt)``, ``tokenizer(prompt + chosen)``,
    ``tokenizer(prompt + rejected)`` are tokenized with the tokenizer's special tokens.
    The completion starts where the prompt's tokens and both full sequences stop sharing
    a prefix (TRL's ``common_prefix_length``). Truncation comes later
    (:meth:`PreferenceEncoded.sequences`).
    """
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        eos = getattr(tokenizer, "eos_token", None) or ""
        c = chosen if not eos or chosen.endswith(eos) else chosen + eos  # type: ignore[union-attr]
        r = rejected if not eos or rejected.endswith(eos) else rejected + eos  # type: ignore[union-attr]
        p_ids = list(tokenizer(text=prompt)["input_ids"])
        pc = list(tokenizer(text=prompt + c)["input_ids"])  # type: ignore[operator]
        pr = list(tokenizer(text=prompt + r)["input_ids"])  # type: ignore[operator]
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("conversational preference pairs need a tokenizer with a chat template")
        pm = as_messages(prompt, "user")
        p_ids = _chat_ids(tokenizer, pm, add_generation_prompt=True)
        pc = _chat_ids(tokenizer, pm + as_messages(chosen, "assistant"))
        pr = _chat_ids(tokenizer, pm + as_messages(rejected, "assistant"))
    n = min(_common_prefix(p_ids, pc), _common_prefix(p_ids, pr))
    return PreferenceEncoded(prompt_ids=p_ids[:n], chosen_ids=pc[n:], rejected_ids=pr[n:])
