"""The PyTorch backend: transformers models, TRL trainers, PEFT adapters.

What lives here: loading a causal LM + tokenizer (:meth:`TRLBackend.load`), per-token
log-probs of completions given prompts, completion-position logits for the KL gates,
generation, saving. Prompt/completion pairs are tokenized the way the model is chatted
with: when the tokenizer has a chat template, the prompt is a user turn (or a list of
messages) rendered with the generation prompt, and the completion is the text the
template adds for the assistant turn (including its end-of-turn tokens).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MAX_LENGTH
from ..errors import InputError, MissingDependencyError
from ..fileio import atomic_path
from ..messages import Message, as_messages, as_text
from .base import KLResult, LogProbs
from .encoding import Encoded, encode_pair

try:
    import torch
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        "the TRL backend needs the training extra: pip install 'realign[train]'") from _exc

Prompt = str | list[Message]


@dataclass
class ModelHandle:
    """A loaded model and its tokenizer, on ``device``."""

    model: Any
    tokenizer: Any
    device: torch.device
    source: str

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


# ---------------------------------------------------------------- devices, loading


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else cuda > mps > cpu."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA GPUs that support it; float32 elsewhere (CPU, MPS, older GPUs).

    float32 on MPS is a deliberate choice: bf16 support there depends on the macOS version.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _unwrap(model: Any) -> Any:
    """A model, or a ModelHandle, or a DDP-style wrapper → the module to call."""
    if isinstance(model, ModelHandle):
        return model.model
    inner = getattr(model, "module", None)
    if inner is not None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return inner
    return model


# ---------------------------------------------------------------- tokenization


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt ready for generation (chat template + generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(as_messages(prompt, "user"), tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(as_text(prompt), add_special_tokens=True)["input_ids"]


def _pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    return int(pid) if pid is not None else 0


def _batches(encoded: Sequence[Encoded], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first): less padding, same results."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    for k in range(0, len(order), batch_size):
        yield order[k:k + batch_size]


def _completion_logits_batch(model: Any, items: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward one right-padded batch; return (logits, targets, mask) at completion positions.

    Position j of the returned tensors is sequence position ``offset + j`` whose logits
    predict token ``offset + j + 1``; ``offset = min(start) - 1`` so prompt-only
    positions shared by the whole batch are not sent through the LM head.
    logits: B × T × V (model dtype), targets: B × T (long), mask: B × T (bool).
    """
    device = _model_device(model)
    length = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), length), dtype=torch.long)
    for r, e in enumerate(items):
        ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        attn[r, : len(e.input_ids)] = 1
    offset = min(e.start for e in items) - 1
    keep = length - offset  # logits for positions offset .. length-1
    ids, attn = ids.to(device), attn.to(device)
    try:
        out = model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep)
        logits = out.logits
        if logits.shape[1] != keep:  # a model that ignores logits_to_keep
            logits = logits[:, offset:]
    except TypeError:  # a model whose forward has no logits_to_keep
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, offset:]
    logits = logits[:, :-1]  # the last position predicts nothing we score
    targets = ids[:, offset + 1:]
    pos = torch.arange(offset, length - 1, device=device)  # position predicting token pos+1
    starts = torch.tensor([e.start for e in items], device=device)
    ends = torch.tensor([len(e.input_ids) for e in items], device=device)
    mask = (pos[None, :] + 1 >= starts[:, None]) & (pos[None, :] + 1 < ends[:, None])
    return logits, targets, mask


@contextmanager
def own_forward(*models: Any) -> Iterator[None]:
    """Within the block, each model runs its own forward, not the mixed-precision wrapper
    that ``accelerate`` put around it.

    ``Accelerator.prepare_model`` with mixed precision (a ``Trainer`` whose ``bf16`` or
    ``fp16`` is set; TRL's ``DPOConfig`` sets ``bf16`` by default) replaces
    ``model.forward`` by the same forward under ``torch.autocast`` and keeps the original
    as ``model._original_forward``; an outer ``torch.autocast(enabled=False)`` cannot undo
    it. A trainer's policy measured through that wrapper is measured in reduced
    precision while the frozen reference (and stage 3's stored distributions) are not:
    on SmolLM2-135M in float32 on a CPU that alone read KL 6e-4 nats/token between two
    identical models. The wrapper is put back on exit. Models without one (or None, or a
    :class:`ReferenceDistributions`) are left alone; ``ModelHandle`` and DDP wrappers are
    unwrapped.
    """
    swapped: list[tuple[Any, Any]] = []
    for m in models:
        if m is None or isinstance(m, ReferenceDistributions):
            continue
        m = _unwrap(m)
        original = m.__dict__.get("_original_forward")
        if original is not None and "forward" in m.__dict__:
            swapped.append((m, m.__dict__["forward"]))
            m.forward = original
    try:
        yield
    finally:
        for m, wrapped in reversed(swapped):
            m.forward = wrapped


class _EvalMode:
    """no_grad + eval() for the duration; restores each model's train/eval mode after."""

    def __init__(self, *models: Any) -> None:
        self.models = [m for m in models if m is not None]
        self.modes: list[bool] = []
        self.grad: Any = None

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.grad.__exit__(*exc)
        for m, was in zip(self.models, self.modes):
            m.train(was)


# ---------------------------------------------------------------- the backend


class TRLBackend:
    """transformers/TRL/PEFT implementation of :class:`realign.backends.base.Backend`."""

    name = "trl"

    def load(self, model: str | Path, *, device: str | None = None,
             dtype: torch.dtype | None = None) -> ModelHandle:
        """Load a causal LM + tokenizer from a local path or a hub id (see ``resolve_model``).

        ``"default"`` is the embedded SmolLM2-135M-Instruct. A directory holding a PEFT
        adapter (``adapter_config.json``) is loaded with its base model. Device: cuda >
        mps > cpu unless given; dtype: :func:`pick_dtype` unless given. The tokenizer
        gets a pad token (its EOS) when it has none. Unloadable model → ``InputError``.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..models import resolve_model

        src = resolve_model(model)
        dev = pick_device(device)
        dt = dtype or pick_dtype(dev)
        try:
            if isinstance(src, Path) and (src / "adapter_config.json").is_file():
                from peft import AutoPeftModelForCausalLM

                lm = AutoPeftModelForCausalLM.from_pretrained(str(src), dtype=dt)
            else:
                lm = AutoModelForCausalLM.from_pretrained(str(src), dtype=dt)
            tok = AutoTokenizer.from_pretrained(str(src))
        except (OSError, ValueError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
            hint = (" (the Hugging Face hub is offline here: pass a local directory or 'default')"
                    if isinstance(src, str) else "")
            if offline and isinstance(src, str):
                hint = " (HF_HUB_OFFLINE=1: only local directories and 'default' can be loaded)"
            raise InputError(f"cannot load model {str(model)!r}{hint}: {exc}", field="model") from exc
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        lm.to(dev)
        lm.eval()
        return ModelHandle(model=lm, tokenizer=tok, device=dev, source=str(src))

    # ---- scoring

    def encode(self, handle: ModelHandle, prompts: Sequence[Prompt], completions: Sequence[Prompt], *,
               max_length: int = DEFAULT_MAX_LENGTH) -> list[Encoded]:
        """Tokenize pairs once (see :func:`encode_pair`); the result can be passed as ``encoded=``."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return [encode_pair(handle.tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]

    def completion_logprobs(self, handle: ModelHandle, prompts: Sequence[Prompt],
                            completions: Sequence[Prompt], *, batch_size: int = 8,
                            max_length: int = DEFAULT_MAX_LENGTH, encoded: Sequence[Encoded] | None = None) -> LogProbs:
        """log p_θ(y_t | x, y_<t) for every completion token y_t of each (x, y).

        log p = logit[y_t] − logsumexp(logits) in float32. Batched with right padding and
        an attention mask; batches group similar lengths, and results come back in input
        order and do not depend on which examples share a batch.
        """
        enc = list(encoded) if encoded is not None else self.encode(handle, prompts, completions,
                                                                   max_length=max_length)
        model = _unwrap(handle)
        pad = _pad_id(handle.tokenizer)
        result: list[list[float]] = [[] for _ in enc]
        with _EvalMode(model):
            for idx in _batches(enc, batch_size):
                logits, targets, mask = _completion_logits_batch(model, [enc[i] for i in idx], pad)
                logits = logits.float()
                lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
                for r, i in enumerate(idx):
                    result[i] = lp[r][mask[r]].tolist()
        return LogProbs(token_logps=result)

    def completion_logits(self, handle: ModelHandle | Any, encoded: Sequence[Encoded], *,
                          batch_size: int = 8, pad_id: int | None = None) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Yield ``(indices, logits, mask)`` per batch: B × T × V logits and B × T completion mask.

        Position t of row r predicts completion token t of example ``indices[r]``. One batch
        at a time, so memory stays bounded for large vocabularies. Call under
        ``torch.no_grad()`` (``kl`` does).
        """
        model = _unwrap(handle)
        if pad_id is None:
            pad_id = _pad_id(handle.tokenizer) if isinstance(handle, ModelHandle) else 0
        for idx in _batches(encoded, batch_size):
            logits, _targets, mask = _completion_logits_batch(model, [encoded[i] for i in idx], pad_id)
            yield idx, logits, mask

    def kl(self, policy: ModelHandle | Any, reference: ModelHandle | Any | None,
           prompts: Sequence[Prompt] = (), completions: Sequence[Prompt] = (), *,
           tokenizer: Any = None, batch_size: int = 8, max_length: int = DEFAULT_MAX_LENGTH,
           encoded: Sequence[Encoded] | None = None) -> KLResult:
        """KL(π_θ ‖ π_ref) over the completion tokens of a probe set; see :func:`kl_on_probe`."""
        return kl_on_probe(policy, reference, prompts, completions, tokenizer=tokenizer,
                           batch_size=batch_size, max_length=max_length, encoded=encoded)

    # ---- generation

    def generate(self, handle: ModelHandle, prompts: Sequence[Prompt], *, max_new_tokens: int = 128,
                 batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[str]:
        """One completion per prompt: greedy when ``temperature == 0``, else sampled.

        Prompts get the chat template with the generation prompt; batches are left-padded.
        Returns the decoded new tokens without special tokens.
        """
        tok = handle.tokenizer
        model = _unwrap(handle)
        device = _model_device(model)
        pad = _pad_id(tok)
        if seed is not None:
            torch.manual_seed(seed)
        ids = [encode_prompt(tok, p) for p in prompts]
        out: list[str] = [""] * len(ids)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad}
        if tok.eos_token_id is not None:
            kwargs["eos_token_id"] = tok.eos_token_id
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        with _EvalMode(model):
            for k in range(0, len(order), batch_size):
                idx = order[k:k + batch_size]
                length = max(len(ids[i]) for i in idx)
                x = torch.full((len(idx), length), pad, dtype=torch.long)
                a = torch.zeros((len(idx), length), dtype=torch.long)
                for r, i in enumerate(idx):
                    x[r, length - len(ids[i]):] = torch.tensor(ids[i], dtype=torch.long)
                    a[r, length - len(ids[i]):] = 1
                gen = model.generate(input_ids=x.to(device), attention_mask=a.to(device), **kwargs)
                for r, i in enumerate(idx):
                    out[i] = tok.decode(gen[r, length:], skip_special_tokens=True)
        return out

    # ---- saving

    def save(self, handle: ModelHandle, path: str | Path) -> Path:
        """Save model (safetensors) + tokenizer to ``path`` atomically.

        Written to a temporary sibling directory, then renamed into place; an existing
        ``path`` is replaced only after the new copy is complete. A PEFT model saves its
        adapter (``load`` then re-attaches it to its base).
        """
        path = Path(path)
        with atomic_path(path, directory=True) as tmp:
            _unwrap(handle).save_pretrained(tmp, safe_serialization=True)
            handle.tokenizer.save_pretrained(tmp)
        return path


# ---------------------------------------------------------------- KL on a probe set


@dataclass
class ReferenceDistributions:
    """log π_ref(·| x_i, y_i,<t) over the whole vocabulary at every completion token of a
    probe set, float32 on the CPU: ``logps[i]`` is T_i × V. Computed once by
    :func:`reference_distributions`, it replaces the reference model's forward passes in
    :func:`kl_on_probe` (the reference is frozen, so the numbers are identical). Memory:
    Σ_i T_i × V × 4 bytes (1000 tokens × 49152 ≈ 197 MB).
    """

    logps: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.logps))


def reference_distributions(reference: ModelHandle | Any, encoded: Sequence[Encoded], *,
                            batch_size: int = 8) -> ReferenceDistributions:
    """Precompute the frozen reference's full next-token log-distributions on a probe set."""
    ref = _unwrap(reference)
    pad = _pad_id(reference.tokenizer) if isinstance(reference, ModelHandle) else 0
    out: list[torch.Tensor] = [torch.empty(0)] * len(encoded)
    with _EvalMode(ref):
        for idx in _batches(encoded, batch_size):
            logits, _t, mask = _completion_logits_batch(ref, [encoded[i] for i in idx], pad)
            for r, i in enumerate(idx):
                out[i] = torch.log_softmax(logits[r][mask[r]].float(), dim=-1).cpu()
    return ReferenceDistributions(logps=out)


def kl_on_probe(policy: ModelHandle | Any, reference: ModelHandle | Any | ReferenceDistributions | None,
                prompts: Sequence[Prompt] = (), completions: Sequence[Prompt] = (), *,
                tokenizer: Any = None, batch_size: int = 8, max_length: int = DEFAULT_MAX_LENGTH,
                encoded: Sequence[Encoded] | None = None, as_trained: bool = False,
                reference_logps: bool = False) -> KLResult:
    """KL(π_θ ‖ π_ref) on a held-out probe set, exact over the vocabulary.

    mean = Σ_i Σ_t KL_it ÷ Σ_i T_i (nats per completion token, the gated number), with
    KL_it = Σ_v p_θ(v|x_i,y_i,<t)(log p_θ(v|·) − log p_ref(v|·)) computed per batch by
    :func:`realign.metrics.per_sequence_kl`; ``per_sequence`` holds Σ_t KL_it
    per example, in input order. ``policy_token_logps`` holds the policy's log p of each
    completion token, from the same forward pass (what ``completion_logprobs`` returns),
    so a caller that needs both pays one policy forward, not two; with
    ``reference_logps=True``, ``reference_token_logps`` holds the reference's likewise
    (else None).

    ``policy``/``reference`` are :class:`ModelHandle` objects or raw models (e.g. the one
    inside a ``Trainer``; a DDP wrapper is unwrapped). ``reference`` may also be a
    :class:`ReferenceDistributions` precomputed on the same ``encoded`` (no reference
    forward at all), or ``None`` with a PEFT policy: "the same model with its adapters
    disabled". The tokenizer comes from whichever argument is a handle, or ``tokenizer=``.
    Runs under ``torch.no_grad`` in eval mode and restores each model's train/eval mode.
    ``as_trained=True`` leaves the policy in the mode it is in (a policy in train mode is
    measured as the trainer's forward sees it, dropout included); the reference is always
    in eval mode.
    """
    from ..metrics import per_sequence_kl

    tok = tokenizer
    for h in (policy, reference):
        if tok is None and isinstance(h, ModelHandle):
            tok = h.tokenizer
    if encoded is None:
        if tok is None:
            raise ValueError("kl_on_probe needs a tokenizer (a ModelHandle or tokenizer=) or encoded=")
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        encoded = [encode_pair(tok, p, c, max_length) for p, c in zip(prompts, completions)]
    encoded = list(encoded)
    if not encoded:
        raise ValueError("empty probe set: KL is undefined")
    pad = _pad_id(tok) if tok is not None else 0
    pol = _unwrap(policy)
    cached = reference if isinstance(reference, ReferenceDistributions) else None
    ref = _unwrap(reference) if reference is not None and cached is None else None
    disable = None
    if cached is not None:
        if [int(t.shape[0]) for t in cached.logps] != [e.n_completion for e in encoded]:
            raise ValueError("the reference distributions were computed on a different probe set")
    elif ref is None:
        disable = getattr(pol, "disable_adapter", None)
        if disable is None:
            raise ValueError("reference=None is only meaningful for a PEFT policy (adapters disabled)")

    sums: list[float] = [0.0] * len(encoded)
    token_logps: list[list[float]] = [[] for _ in encoded]
    ref_token_logps: list[list[float]] = [[] for _ in encoded]

    def gathered(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lf = logits.float()
        return lf.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lf, dim=-1)

    with _EvalMode(*([ref] if as_trained else [pol, ref])):
        for idx in _batches(encoded, batch_size):
            items = [encoded[i] for i in idx]
            p_logits, targets, mask = _completion_logits_batch(pol, items, pad)
            lp = gathered(p_logits, targets)
            for r, i in enumerate(idx):
                token_logps[i] = lp[r][mask[r]].tolist()
            if cached is not None:
                for r, i in enumerate(idx):
                    pr = p_logits[r][mask[r]].unsqueeze(0)
                    rr = cached.logps[i].to(pr.device).unsqueeze(0)
                    sums[i] = per_sequence_kl(pr, rr, torch.ones(pr.shape[:2], dtype=torch.bool))[0]
                    if reference_logps:
                        ref_token_logps[i] = rr[0].gather(
                            -1, targets[r][mask[r]].to(rr.device).unsqueeze(-1)).squeeze(-1).tolist()
                continue
            if ref is not None:
                r_logits, _t2, _m2 = _completion_logits_batch(ref, items, pad)
            else:
                with disable():
                    r_logits, _t2, _m2 = _completion_logits_batch(pol, items, pad)
            r_logits = r_logits.to(p_logits.device)
            if reference_logps:
                lr = gathered(r_logits, targets)
                for r, i in enumerate(idx):
                    ref_token_logps[i] = lr[r][mask[r]].tolist()
            for i, s in zip(idx, per_sequence_kl(p_logits, r_logits, mask)):
                sums[i] = s
            del p_logits, r_logits
    counts = [e.n_completion for e in encoded]
    total = sum(counts)
    if total == 0:
        raise ValueError("the probe set has no completion tokens: KL is undefined")
    return KLResult(mean=sum(sums) / total, per_sequence=sums, counts=counts,
                    policy_token_logps=token_logps,
                    reference_token_logps=ref_token_logps if reference_logps else None)


# ---------------------------------------------------------------- sampling from the policy


def _left_padded(seqs: list[list[int]], pad: int, device: Any) -> tuple[Any, Any, Any]:
    """Token lists as one left-padded batch for generation: ``(input_ids, attention_mask,
    position_ids)``, with positions counted from each row's first real token."""
    import torch

    length = max(len(s) for s in seqs)
    x = torch.full((len(seqs), length), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, length - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[r, length - len(s):] = 1
    x, attn = x.to(device), attn.to(device)
    return x, attn, (attn.cumsum(-1) - 1).clamp(min=0)


def _last_logits(model: Any, past: tuple[str, Any] | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, tuple[str, Any]]:
    """One forward with a KV cache: (B × V logits at the last position, the cache).

    The cache goes back in under the name the model's output used for it (``cache`` in
    transformers ≥ 5.2x, ``past_key_values`` before), so a model never silently gets a
    keyword it ignores.
    """
    if past is not None:
        kwargs[past[0]] = past[1]
    try:
        out = model(**kwargs, use_cache=True, logits_to_keep=1)
    except TypeError:  # a model whose forward has no logits_to_keep
        out = model(**kwargs, use_cache=True)
    name = "cache" if "cache" in getattr(out, "__dataclass_fields__", {}) else "past_key_values"
    return out.logits[:, -1], (name, getattr(out, name))


def _draw(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row drawn from softmax(logits), by the inverse CDF: the first v with
    Σ_{w ≤ v} p_w > u·Σ_w p_w, u ~ U[0, 1) from ``gen`` (a CPU generator: the same draws
    on every device). The CDF is summed in float64 on the CPU (MPS has no float64), one
    uniform per row (``torch.multinomial`` takes ~70 ms per batch over a 49k vocabulary on
    a CPU). Returns the token ids on ``logits``' device."""
    cdf = torch.softmax(logits.float(), dim=-1).to("cpu", torch.float64).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.squeeze(-1).clamp(max=cdf.shape[-1] - 1).to(logits.device)


def sample_responses(handle: ModelHandle | Any, prompts: Sequence[Prompt], *, max_new_tokens: int,
                     seed: int, tokenizer: Any = None, batch_size: int = 8,
                     max_length: int = DEFAULT_MAX_LENGTH) -> list[Encoded]:
    """One response per prompt sampled from the model itself, as token ids.

    Pure ancestral sampling at temperature 1: y_t ~ softmax(logits_t) in float32, no
    top-k/top-p/repetition or any other logits processor (the model's generation config
    is not consulted), so the responses are draws from π(· | x), the distribution
    KL(π ‖ π_ref) is an expectation under. Each response stops after its first EOS token
    (kept) or ``max_new_tokens`` tokens. Prompts get the chat template with the
    generation prompt (:func:`encode_prompt`), cut from the left to
    ``max(1, max_length − max_new_tokens)`` tokens.

    Seeded by its own CPU ``torch.Generator`` (the global RNG is left alone); the draws
    depend on ``seed`` and ``batch_size``. Batches are left-padded with explicit position
    ids and a KV cache. Returns :class:`Encoded` items (prompt ids + sampled ids, ``start``
    at the first sampled token) to score with ``encoded=`` exactly as sampled, never
    re-tokenized from text.
    """
    tok = tokenizer if tokenizer is not None else handle.tokenizer
    model = _unwrap(handle)
    device = _model_device(model)
    pad = _pad_id(tok)
    eos = tok.eos_token_id
    keep = max(1, max_length - max_new_tokens)
    ids = [encode_prompt(tok, p)[-keep:] for p in prompts]
    new: list[list[int]] = [[] for _ in ids]
    gen = torch.Generator().manual_seed(seed)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    with _EvalMode(model):
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            x, attn, pos = _left_padded([ids[i] for i in idx], pad, device)
            logits, past = _last_logits(model, input_ids=x, attention_mask=attn, position_ids=pos)
            done = [False] * len(idx)
            for _ in range(max_new_tokens):
                nxt = _draw(logits, gen)
                for r, (i, t) in enumerate(zip(idx, nxt.tolist())):
                    if not done[r]:
                        new[i].append(t)
                        done[r] = t == eos
                if all(done):
                    break
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                logits, past = _last_logits(model, past, input_ids=nxt.unsqueeze(-1),
                                            attention_mask=attn, position_ids=pos)
            del past
    return [Encoded(input_ids=list(p) + c, start=len(p)) for p, c in zip(ids, new)]


#: Candidates kept by the top-k pass of :func:`_nucleus_draw` before it falls back to a
#: full sort (a row whose top candidates hold less than ``top_p`` of the mass).
NUCLEUS_TOPK = 256


def _row_generators(seed: int, keys: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sequence, seeded by (``seed``, the sequence's key): a
    sequence's draws do not depend on which sequences share its batch."""
    return [torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + 0x632BE5AB * (k + 1))
                                          % (2**63 - 1)) for k in keys]


def _nucleus_draw(logits: torch.Tensor, gens: Sequence[torch.Generator], temperature: float,
                  top_p: float) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to the nucleus:
    the smallest set of most probable tokens whose mass reaches ``top_p`` (the token that
    crosses it included; ``top_p >= 1``: the whole vocabulary), renormalized. Drawn by the
    inverse CDF in float64 with one uniform per row from the row's own generator.
    ``temperature == 0``: the most probable token. Exact: the top-k pass (``NUCLEUS_TOPK``
    candidates) is used only for rows whose candidates hold ``top_p`` of the mass, and the
    other rows are sorted in full."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1).to("cpu", torch.float64)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
    vocab = probs.shape[-1]
    if top_p >= 1:
        cdf = probs.cumsum(-1)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
        return idx.squeeze(-1).clamp(max=vocab - 1).to(logits.device)
    k = min(vocab, NUCLEUS_TOPK)
    vals, ids = probs.topk(k, dim=-1)  # sorted, most probable first
    full = vals.sum(-1) < top_p
    out = torch.empty(probs.shape[0], dtype=torch.long)

    def pick(v: torch.Tensor, ix: torch.Tensor, uu: torch.Tensor) -> torch.Tensor:
        before = v.cumsum(-1) - v  # mass of the more probable tokens
        v = torch.where(before < top_p, v, torch.zeros_like(v))
        cdf = v.cumsum(-1)
        pos = torch.searchsorted(cdf, (uu * cdf[:, -1]).unsqueeze(-1), right=True)
        return ix.gather(-1, pos.clamp(max=v.shape[-1] - 1)).squeeze(-1)

    rows = (~full).nonzero().flatten()
    if len(rows):
        out[rows] = pick(vals[rows], ids[rows], u[rows])
    rows = full.nonzero().flatten()
    if len(rows):
        sv, si = probs[rows].sort(dim=-1, descending=True)
        out[rows] = pick(sv, si, u[rows])
    return out.to(logits.device)


def sample_many(handle: ModelHandle | Any, prompts: Sequence[Prompt], *, num_samples: int,
                max_new_tokens: int, seed: int, temperature: float = 1.0, top_p: float = 1.0,
                tokenizer: Any = None, batch_size: int = 32,
                max_length: int = DEFAULT_MAX_LENGTH,
                progress: Any = None) -> list[list[Encoded]]:
    """``num_samples`` responses per prompt sampled from the model, as token ids:
    ``out[i][j]`` is sample j of prompt i.

    Sampling: softmax(logits / ``temperature``) restricted to the ``top_p`` nucleus
    (:func:`_nucleus_draw`; temperature 0 is greedy), no other logits processor (the
    model's generation config is not consulted). Each response stops after its first EOS
    token (kept) or ``max_new_tokens`` tokens. Prompts get the chat template with the
    generation prompt (:func:`encode_prompt`), cut from the left to
    ``max(1, max_length − max_new_tokens)`` tokens.

    Cost: a batch holds ``max(1, batch_size // num_samples)`` prompts; their prompt tokens
    go through the model once (left-padded, with position ids) and the KV cache is
    repeated ``num_samples`` times, so the samples of a prompt share its prefill; a
    sequence that has ended leaves the batch. Seeded per sequence (:func:`_row_generators`:
    seed, prompt index, sample index), so a sample's draws do not depend on which sequences
    share its batch or when they end (its logits may, in the last bits, through the
    padding of a batch); the global RNG is left alone. ``progress(done, total)`` counts
    prompts.
    """
    tok = tokenizer if tokenizer is not None else handle.tokenizer
    model = _unwrap(handle)
    device = _model_device(model)
    pad = _pad_id(tok)
    eos = tok.eos_token_id
    k = max(1, int(num_samples))
    keep = max(1, max_length - max_new_tokens)
    ids = [encode_prompt(tok, p)[-keep:] for p in prompts]
    new: list[list[list[int]]] = [[[] for _ in range(k)] for _ in ids]
    per_batch = max(1, batch_size // k)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    done_prompts = 0
    with _EvalMode(model):
        for b in range(0, len(order), per_batch):
            idx = order[b:b + per_batch]
            x, attn, pos = _left_padded([ids[i] for i in idx], pad, device)
            logits, past = _last_logits(model, input_ids=x, attention_mask=attn, position_ids=pos)
            if k > 1:
                past[1].batch_repeat_interleave(k)
                logits = logits.repeat_interleave(k, dim=0)
                attn = attn.repeat_interleave(k, dim=0)
                pos = pos.repeat_interleave(k, dim=0)
            rows = [(i, j) for i in idx for j in range(k)]  # (prompt, sample) of each row
            gens = _row_generators(seed, [i * k + j for i, j in rows])
            for _ in range(max_new_tokens):
                nxt = _nucleus_draw(logits, gens, temperature, top_p)
                alive = []
                for r, ((i, j), t) in enumerate(zip(rows, nxt.tolist())):
                    new[i][j].append(t)
                    if t != eos:
                        alive.append(r)
                if not alive or len(new[rows[0][0]][rows[0][1]]) >= max_new_tokens:
                    break
                if len(alive) < len(rows):  # ended sequences leave the batch
                    sel = torch.tensor(alive, device=device)
                    past[1].batch_select_indices(sel)
                    nxt, attn, pos = nxt[sel], attn[sel], pos[sel]
                    rows = [rows[r] for r in alive]
                    gens = [gens[r] for r in alive]
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                logits, past = _last_logits(model, past, input_ids=nxt.unsqueeze(-1),
                                            attention_mask=attn, position_ids=pos)
            del past
            done_prompts += len(idx)
            if progress is not None:
                progress(done_prompts, len(ids))
    return [[Encoded(input_ids=list(p) + c, start=len(p)) for c in cs] for p, cs in zip(ids, new)]


def decode_responses(tokenizer: Any, samples: Sequence[Encoded]) -> list[str]:
    """The text of each sampled response (the tokens after ``start``, special tokens such
    as the end-of-turn token left out)."""
    return [tokenizer.decode(e.input_ids[e.start:], skip_special_tokens=True) for e in samples]


# ---------------------------------------------------------------------------- KL of two saved models
# (``realign kl`` and the MCP tool ``compute_kl`` call this; the pipeline measures KL in
# stages 3 and 5 with kl_on_probe directly.)


from .base import KLBetween


def kl_between(policy: str | Path, probe: str | Path, reference: str | Path | None = None, *,
               completion: str = "chosen", max_examples: int = 64, batch_size: int = 8,
               max_length: int = DEFAULT_MAX_LENGTH, device: str | None = None, thresholds: Any = None,
               progress: Any = None) -> KLBetween:
    """KL(π_policy ‖ π_reference) on the first ``max_examples`` pairs of a probe file, gated.

    KL = Σ_i Σ_t Σ_v p_θ(v|·)(log p_θ(v|·) − log p_ref(v|·)) ÷ Σ_i T_i over the
    ``completion`` tokens (chosen or rejected) of each pair, exact over the vocabulary
    (:func:`kl_on_probe`), in nats/token; compared with the ``kl_divergence`` gate of
    ``thresholds`` (default preset when None). ``reference=None``: the policy must be a
    PEFT adapter and the reference is its base with the adapters disabled.
    ``progress(done, total, message)`` is called as the models load and the KL is measured.
    Returns a :class:`KLBetween`.
    """
    from ..gates import Thresholds
    from ..rows import read_rows, to_trl_row

    if completion not in ("chosen", "rejected"):
        raise InputError(f"completion must be chosen or rejected, got '{completion}'",
                         field="completion")
    probe = Path(probe)
    rows = [to_trl_row(r) for r in read_rows(probe)][:max_examples]
    if not rows:
        raise InputError("no pairs to probe", file=probe)
    thresholds = thresholds or Thresholds()
    say = progress or (lambda d, t, m: None)
    backend = TRLBackend()
    steps = 3 if reference else 2
    say(0, steps, "loading the policy")
    pol = backend.load(policy, device=device)
    ref = None
    if reference:
        say(1, steps, "loading the reference")
        ref = backend.load(reference, device=device)
    say(steps - 1, steps, f"measuring KL on {len(rows)} pairs")
    kl = kl_on_probe(pol, ref, [r["prompt"] for r in rows], [r[completion] for r in rows],
                     batch_size=batch_size, max_length=max_length)
    say(steps, steps, "done")
    gate = thresholds.evaluate(
        "kl_divergence", kl.mean,
        detail=f"mean per-token KL(policy || {'reference' if reference else 'adapters disabled'}) "
               f"over {kl.tokens} {completion} tokens of {len(rows)} probe pairs from {probe.name}")
    return KLBetween(gate=gate, mean_per_token=kl.mean, mean_per_sequence=kl.mean_sequence,
                     per_sequence=kl.per_sequence, tokens=kl.tokens, examples=len(rows))


def make_policy(ref_model: Any, lora: dict[str, Any] | None, *, disable_dropout: bool = True) -> Any:
    """A trainable policy starting at the reference: a deep copy, or LoRA on a copy, in
    train mode, with dropout disabled as TRL's ``DPOTrainer`` disables it
    (``DPOConfig.disable_dropout``, default true: every ``torch.nn.Dropout`` gets p = 0;
    a dropout a model applies by a config float, such as Llama's ``attention_dropout``,
    stays on in train mode, as it does in TRL's training).

    Stage 3 measures ``initial_kl`` on what this returns, in train mode, and stage 5
    trains what it returns: one construction (:func:`realign.stages.context.build_policy`).
    """
    import copy

    policy = copy.deepcopy(ref_model)
    for p in policy.parameters():  # the reference may be frozen; the copy trains
        p.requires_grad_(True)
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **lora))
    if disable_dropout:
        for module in policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0
    policy.train()
    return policy
