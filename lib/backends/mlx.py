"""The MLX backend: mlx-lm models on Apple Silicon (and on Linux CPUs with ``mlx[cpu]``).

What lives here, the same surface as :mod:`realign.backends.trl`:

* :meth:`MLXBackend.load` — ``mlx_lm.load`` from a local safetensors folder ("default",
  a path, or a hub id when online), or an mlx-lm LoRA adapter folder with its base;
  parameters cast to float32 unless told otherwise (what the TRL backend uses on CPUs
  and MPS, so numbers agree across backends).
* :meth:`MLXBackend.completion_logprobs` — log p(y_t | x, y_<t) per completion token,
  tokenized by :func:`realign.backends.encoding.encode_pair` (the TRL backend's encoding).
* :meth:`MLXBackend.kl` — exact KL(π_θ ‖ π_ref) over the vocabulary on a probe set (the
  KL monitor's measurement), with :func:`reference_distributions` as the precomputed
  reference, or ``reference=None`` for a LoRA policy (adapters disabled).
* :meth:`MLXBackend.generate` — batched generation with ``mlx_lm.generate.batch_generate``.
* :meth:`MLXBackend.save` / :func:`merge` / :func:`make_policy` / :func:`apply_lora` —
  saving (a folder both backends load), LoRA through mlx-lm's tuner
  (``mlx_lm.tuner.utils.linear_to_lora_layers``).
* :func:`kl_between` — ``realign kl --backend mlx``.

DPO training is in :mod:`realign.backends.mlx_dpo`.

Sequences are right-padded; with a causal mask the real tokens never attend to the
padding after them and their positions are unchanged, so no attention mask is needed and
results do not depend on which examples share a batch. The LM head runs only at the
positions that predict completion tokens (gathered on the host, where they are known)
when the model's logits are ``head(backbone(x))``, which is checked numerically once per
model (:func:`_plain_head`); otherwise the full logits are computed and gathered.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEFAULT_MAX_LENGTH
from ..errors import InputError, MissingDependencyError
from ..fileio import atomic_path
from .base import KLResult, LogProbs
from .encoding import (
    Encoded,
    Prompt,
    encode_pair,
    encode_prompt,
    length_batches,
    pad_token_id,
)

#: The install command for this backend's packages.
INSTALL = "pip install 'realign[mlx]'  (mlx[cpu] on Linux, mlx on macOS, and mlx-lm)"

try:
    import mlx.core as mx
    import mlx_lm  # noqa: F401
    from mlx import nn
    from mlx.utils import tree_flatten, tree_unflatten
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(f"the MLX backend needs mlx and mlx-lm: {INSTALL}") from _exc

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
#: Parameter-name suffixes of mlx-lm's adapter layers (LoRA, DoRA).
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


@dataclass
class MLXModelHandle:
    """A loaded mlx-lm model and its tokenizer.

    ``tokenizer`` is the Hugging Face tokenizer (what :mod:`realign.backends.encoding`
    needs); ``wrapper`` is mlx-lm's ``TokenizerWrapper`` around it (for generation).
    ``lora`` holds mlx-lm's LoRA parameters (rank, scale, dropout, keys, num_layers) when
    adapters are attached; ``base_source`` is then the folder of the base model.
    """

    model: Any
    tokenizer: Any
    source: str
    config: dict[str, Any]
    wrapper: Any = None
    device: str = "cpu"
    lora: dict[str, Any] | None = None
    base_source: str | None = None
    dtype: str = "float32"
    path: str | None = None  # the local folder of the (base) model's files

    @property
    def model_dir(self) -> Path:
        """The local folder holding the (base) model's config and weights."""
        return Path(self.path or self.base_source or self.source)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


# ---------------------------------------------------------------- devices, loading


def pick_device(device: str | None = None) -> str:
    """``"gpu"`` (Metal on Apple Silicon, or CUDA with ``mlx[cuda]``) or ``"cpu"``, and make
    it MLX's default device. ``None``: MLX's default (the GPU when there is one).
    ``"mps"``/``"metal"``/``"cuda"``/``"gpu"`` mean the GPU."""
    if device is None:
        return "gpu" if mx.default_device() == mx.gpu else "cpu"
    d = str(device).split(":")[0].lower()
    if d == "cpu":
        mx.set_default_device(mx.cpu)
        return "cpu"
    if d in ("gpu", "mps", "metal", "cuda"):
        if not _gpu_available():
            raise InputError(f"device {device!r}: MLX has no GPU here (use cpu)", field="device")
        mx.set_default_device(mx.gpu)
        return "gpu"
    raise InputError(f"unknown MLX device {device!r}: expected cpu or gpu", field="device")


def _gpu_available() -> bool:
    for mod in ("metal", "cuda"):
        m = getattr(mx, mod, None)
        try:
            if m is not None and m.is_available():
                return True
        except Exception:  # noqa: BLE001 - a backend that cannot be queried is absent
            continue
    return False


def rope_config(model_dir: str | Path) -> dict[str, Any] | None:
    """Config overrides that make mlx-lm read a transformers-5 ``config.json``.

    transformers 5 writes RoPE settings as ``rope_parameters: {rope_theta, rope_type,
    ...}``; mlx-lm 0.32's Llama (and most of its models) read only the older top-level
    ``rope_theta`` / ``rope_scaling`` and would silently fall back to θ = 10000 (the default
    model uses 100000: every log-prob would be off). This copies them to the top level;
    a config that already has ``rope_theta``, or per-layer-type rope parameters, is left
    alone (None)."""
    p = Path(str(model_dir)) / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" in cfg or "rope_theta" not in rp:
        return None
    out: dict[str, Any] = {"rope_theta": rp["rope_theta"]}
    if rp.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
        out["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return out


def _local_dir(model: str | Path) -> str | None:
    """The local folder of a model: the path itself, or a hub id's snapshot in the
    Hugging Face cache (mlx-lm downloaded it there); None when neither is found."""
    if isinstance(model, Path) or Path(str(model)).is_dir():
        return str(model)
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(str(model), local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache
        return None


def _is_mlx_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (path / "adapters.safetensors").is_file()


class MLXBackend:
    """mlx / mlx-lm implementation of :class:`realign.backends.base.Backend`."""

    name = "mlx"

    def load(self, model: str | Path, *, device: str | None = None,
             dtype: str | None = "float32") -> MLXModelHandle:
        """Load a causal LM + tokenizer with ``mlx_lm.load``.

        ``model``: ``"default"`` (the embedded SmolLM2-135M-Instruct), a local
        safetensors folder, an mlx-lm adapter folder (``adapter_config.json`` +
        ``adapters.safetensors``, written by :meth:`save` for a LoRA policy or by
        ``mlx_lm.lora``; its base is loaded and the adapters attached) or a hub id.
        ``dtype``: floating parameters are cast to it (``None`` keeps the stored dtype).
        The tokenizer gets a pad token (its EOS) when it has none. Unloadable → InputError.
        """
        from mlx_lm import load as mlx_load

        from ..models import resolve_model

        src = resolve_model(model)
        dev = pick_device(device)
        adapter = None
        base: str | Path = src
        if isinstance(src, Path) and (src / "adapter_config.json").is_file():
            if not _is_mlx_adapter(src):
                raise InputError(f"{src} holds a PEFT adapter: the MLX backend loads full models "
                                 "and mlx-lm adapters; merge it first or use backend trl",
                                 field="model")
            cfg = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
            b = cfg.get("base_model") or cfg.get("model")
            if not b:
                raise InputError(f"{src}/adapter_config.json names no base model", field="model")
            adapter, base = src, resolve_model(b)
        try:
            lm, wrapper, config = mlx_load(str(base), adapter_path=str(adapter) if adapter else None,
                                           return_config=True, model_config=rope_config(base))
        except (OSError, ValueError, FileNotFoundError) as exc:
            raise InputError(f"cannot load model {str(model)!r} with mlx-lm: {exc}", field="model") from exc
        except Exception as exc:  # noqa: BLE001 - hub errors (offline, unknown repo) have many types
            raise InputError(f"cannot load model {str(model)!r} with mlx-lm: {exc}", field="model") from exc
        if dtype is not None:
            if dtype not in DTYPES:
                raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
            lm.set_dtype(DTYPES[dtype])
            mx.eval(lm.parameters())
        tok = wrapper._tokenizer
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        lm.eval()
        lora = None
        if adapter is not None:
            acfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
            lora = dict(acfg.get("lora_parameters", {}), num_layers=acfg.get("num_layers"))
        return MLXModelHandle(model=lm, tokenizer=tok, wrapper=wrapper, source=str(src), config=config,
                              device=dev, lora=lora, base_source=str(base) if adapter else None,
                              dtype=dtype or _param_dtype(lm), path=_local_dir(base))

    # ---- scoring

    def encode(self, handle: MLXModelHandle, prompts: Sequence[Prompt], completions: Sequence[Prompt], *,
               max_length: int = DEFAULT_MAX_LENGTH) -> list[Encoded]:
        """Tokenize pairs once (:func:`encode_pair`); the result can be passed as ``encoded=``."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return [encode_pair(handle.tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]

    def completion_logprobs(self, handle: MLXModelHandle, prompts: Sequence[Prompt],
                            completions: Sequence[Prompt], *, batch_size: int = 8,
                            max_length: int = DEFAULT_MAX_LENGTH,
                            encoded: Sequence[Encoded] | None = None) -> LogProbs:
        """log p_θ(y_t | x, y_<t) for every completion token y_t of each (x, y).

        log p = logit[y_t] − logsumexp(logits) in float32, as the TRL backend. Results come
        back in input order and do not depend on which examples share a batch.
        """
        enc = list(encoded) if encoded is not None else self.encode(handle, prompts, completions,
                                                                   max_length=max_length)
        model = _model_of(handle)
        pad = pad_token_id(handle.tokenizer)
        out: list[list[float]] = [[] for _ in enc]
        with _eval_mode(model):
            for idx in length_batches([len(e.input_ids) for e in enc], batch_size):
                b = completion_batch([enc[i] for i in idx], pad)
                logits = completion_logits(model, b.ids, b.flat)
                lp = token_logps(logits, b.targets)
                lp_np = np.array(lp.astype(mx.float32))
                for r, i in enumerate(idx):
                    out[i] = lp_np[b.offsets[r]:b.offsets[r + 1]].tolist()
        return LogProbs(token_logps=out)

    def kl(self, policy: Any, reference: Any, prompts: Sequence[Prompt] = (),
           completions: Sequence[Prompt] = (), *, tokenizer: Any = None, batch_size: int = 8,
           max_length: int = DEFAULT_MAX_LENGTH, encoded: Sequence[Encoded] | None = None) -> KLResult:
        """KL(π_θ ‖ π_ref) over the completion tokens of a probe set; see :func:`kl_on_probe`."""
        return kl_on_probe(policy, reference, prompts, completions, tokenizer=tokenizer,
                           batch_size=batch_size, max_length=max_length, encoded=encoded)

    # ---- generation

    def generate(self, handle: MLXModelHandle, prompts: Sequence[Prompt], *, max_new_tokens: int = 128,
                 batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[str]:
        """One completion per prompt with mlx-lm's batched generation
        (``mlx_lm.generate.batch_generate``): greedy when ``temperature == 0``, else
        sampled (``top_p < 1``: nucleus). Prompts get the chat template with the generation
        prompt; generation stops at the tokenizer's EOS tokens. Returns the decoded new
        tokens without special tokens, in input order.
        """
        from mlx_lm.generate import batch_generate
        from mlx_lm.sample_utils import make_sampler

        tok = handle.tokenizer
        model = _model_of(handle)
        wrapper = handle.wrapper
        if wrapper is None:
            from mlx_lm.tokenizer_utils import TokenizerWrapper

            wrapper = TokenizerWrapper(tok)
        if seed is not None:
            mx.random.seed(seed)
        sampler = make_sampler(temp=float(temperature), top_p=float(top_p) if 0 < top_p < 1 else 0.0)
        ids = [encode_prompt(tok, p) for p in prompts]
        out: list[str] = [""] * len(ids)
        with _eval_mode(model):
            for idx in length_batches([len(x) for x in ids], batch_size):
                res = batch_generate(model, wrapper, [ids[i] for i in idx], max_tokens=max_new_tokens,
                                     sampler=sampler, return_token_ids=True,
                                     prefill_batch_size=len(idx), completion_batch_size=len(idx))
                for r, i in enumerate(idx):
                    out[i] = tok.decode(res.token_ids[r], skip_special_tokens=True)
        return out

    # ---- saving

    def save(self, handle: MLXModelHandle, path: str | Path, *, merge_adapters: bool = False) -> Path:
        """Save to ``path`` atomically (a temporary sibling, renamed into place).

        A full model: ``model.safetensors`` (+ index), ``config.json`` and the tokenizer —
        a folder both backends load (transformers reads MLX's safetensors). A LoRA policy:
        its adapters in mlx-lm's format (``adapters.safetensors`` + ``adapter_config.json``
        naming the base), which :meth:`load` re-attaches to the base; with
        ``merge_adapters`` the adapters are fused (:func:`merge`) and a full model is saved.
        """
        path = Path(path)
        if handle.lora is not None and merge_adapters:
            handle = merge(handle)
        with atomic_path(path, directory=True) as tmp:
            if handle.lora is not None:
                save_adapters(handle, tmp)
            else:
                save_full(handle, tmp)
        return path


# ---------------------------------------------------------------- forward passes


def _model_of(handle: Any) -> Any:
    return handle.model if isinstance(handle, MLXModelHandle) else handle


def _param_dtype(model: Any) -> str:
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).replace("mlx.core.", "")
    return "float32"


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Dropout off for the block; the model's train/eval mode is restored after."""
    was = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@dataclass
class CompletionBatch:
    """A right-padded batch of sequences and where their completion tokens are.

    ``ids``: B × L token ids. ``flat``: indices into the B·L positions of those that
    predict a completion token (position t−1 for completion token t), grouped by row;
    ``targets``: those tokens; ``offsets``: row r's entries are ``offsets[r]:offsets[r+1]``;
    ``rows``: the row of each entry.
    """

    ids: Any
    flat: Any
    targets: Any
    offsets: list[int]
    rows: np.ndarray
    length: int

    @property
    def n_rows(self) -> int:
        return len(self.offsets) - 1


def completion_batch(items: Sequence[Encoded] | Sequence[tuple[list[int], list[int]]], pad: int) -> CompletionBatch:
    """Build a :class:`CompletionBatch` from :class:`Encoded` items (completion = tokens
    from ``start``) or from ``(ids, completion_mask)`` pairs (TRL's DPO layout: a token t
    is scored when ``mask[t] == 1`` and t ≥ 1)."""
    seqs: list[list[int]] = []
    masks: list[list[int]] = []
    for it in items:
        if isinstance(it, Encoded):
            seqs.append(list(it.input_ids))
            masks.append([0] * it.start + [1] * it.n_completion)
        else:
            seqs.append(list(it[0]))
            masks.append(list(it[1]))
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), pad, dtype=np.int32)
    flat: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    offsets = [0]
    for r, (s, m) in enumerate(zip(seqs, masks)):
        ids[r, : len(s)] = s
        for t in range(1, len(s)):
            if m[t]:
                flat.append(r * length + t - 1)
                targets.append(s[t])
                rows.append(r)
        offsets.append(len(flat))
    return CompletionBatch(ids=mx.array(ids), flat=mx.array(np.asarray(flat, dtype=np.int32)),
                           targets=mx.array(np.asarray(targets, dtype=np.int32)), offsets=offsets,
                           rows=np.asarray(rows, dtype=np.int32), length=length)


def _plain_head(model: Any) -> Callable[[Any], Any] | None:
    """The LM head as a function of the backbone's hidden states when the model's logits
    are exactly ``head(model.model(x))`` (no soft-capping, scaling or other transform),
    else None. Checked numerically once per model on a short input: a model that
    transforms its logits fails the check and is scored through its full forward pass."""
    cached = getattr(model, "_realign_plain_head", None)
    if cached is not None:
        return cached or None
    backbone = getattr(model, "model", None)
    head: Callable[[Any], Any] | None = None
    if backbone is not None and callable(backbone):
        lm_head = getattr(model, "lm_head", None) if "lm_head" in model else None
        if lm_head is not None:
            head = lm_head
        elif getattr(backbone, "embed_tokens", None) is not None:
            head = backbone.embed_tokens.as_linear
    ok = False
    if head is not None:
        was = bool(getattr(model, "training", False))
        model.eval()  # dropout (LoRA's) off, or the two passes would differ at random
        try:
            x = mx.array([[1, 2, 3, 4, 5]], dtype=mx.int32)
            full = model(x).astype(mx.float32)
            fast = head(backbone(x)).astype(mx.float32)
            ok = full.shape == fast.shape and bool(mx.allclose(full, fast, rtol=1e-4, atol=1e-4))
        except Exception:  # noqa: BLE001 - any mismatch in structure: use the full forward
            ok = False
        finally:
            model.train(was)
    object.__setattr__(model, "_realign_plain_head", head if ok else False)
    return head if ok else None


def completion_logits(model: Any, ids: Any, flat: Any, *, frozen_token: int | None = None) -> Any:
    """Logits (N × V) at the positions ``flat`` (indices into B·L) of a B × L batch.

    ``frozen_token``: no gradient flows into that token's input-embedding row through the
    embedding lookup (the forward values are unchanged). This reproduces transformers'
    ``nn.Embedding(..., padding_idx=config.pad_token_id)``, whose backward zeroes that row:
    with the default model's pad = EOS (``<|im_end|>``, id 2) and tied embeddings, PyTorch
    trains that row only through the LM head, and so does this (DPO gradients then match
    TRL's for every parameter). Needs a model that accepts ``input_embeddings``.
    """
    head = _plain_head(model)
    b, length = ids.shape
    backbone = getattr(model, "model", None)
    emb = None
    if frozen_token is not None and backbone is not None and _takes_input_embeddings(backbone) \
            and getattr(backbone, "embed_tokens", None) is not None:
        e = backbone.embed_tokens(ids)
        emb = mx.where((ids == frozen_token)[..., None], mx.stop_gradient(e), e)
    if head is not None:
        hidden = backbone(ids, input_embeddings=emb) if emb is not None else backbone(ids)
        h = hidden.reshape(b * length, hidden.shape[-1])[flat]
        return head(h)
    logits = model(ids, input_embeddings=emb) if emb is not None and _takes_input_embeddings(model) \
        else model(ids)
    return logits.reshape(b * length, logits.shape[-1])[flat]


def _takes_input_embeddings(fn: Any) -> bool:
    import inspect

    try:
        return "input_embeddings" in inspect.signature(fn.__call__).parameters
    except (TypeError, ValueError):
        return False


#: Block size of :func:`vocab_sum`'s two-level sum.
SUM_BLOCK = 256


def vocab_sum(x: Any) -> Any:
    """Σ over the last axis (the vocabulary) in two levels: blocks of :data:`SUM_BLOCK`,
    then the block sums (the last axis kept, size 1).

    Deliberately not ``x.sum(-1)``: MLX's CPU build sums a row sequentially, and over a
    49152-wide float32 row of probabilities that loses the low bits of every small term —
    measured on the default model, ``mx.logsumexp`` was off by up to 2.1e-4 (mean
    −9.8e-5, always low) against float64, and every token log-prob with it; PyTorch's
    float32 reduction is within 2e-6. Two levels bring MLX to 3e-6.
    """
    v = x.shape[-1]
    if v <= SUM_BLOCK:
        return x.sum(axis=-1, keepdims=True)
    pad = (-v) % SUM_BLOCK
    if pad:
        x = mx.concatenate([x, mx.zeros((*x.shape[:-1], pad), dtype=x.dtype)], axis=-1)
    blocks = x.reshape(*x.shape[:-1], -1, SUM_BLOCK).sum(axis=-1)
    return blocks.sum(axis=-1, keepdims=True)


def logsumexp(x: Any) -> Any:
    """log Σ exp(x) over the last axis (kept, size 1), with :func:`vocab_sum`; the max is
    a constant for the gradient (which is softmax(x) either way)."""
    m = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return mx.log(vocab_sum(mx.exp(x - m))) + m


def log_softmax(logits: Any) -> Any:
    """log softmax over the last axis, in float32."""
    lf = logits.astype(mx.float32)
    return lf - logsumexp(lf)


def token_logps(logits: Any, targets: Any) -> Any:
    """log softmax(logits)[target] per row, in float32."""
    lf = logits.astype(mx.float32)
    return mx.take_along_axis(lf, targets[:, None], axis=-1)[:, 0] - logsumexp(lf)[:, 0]


# ---------------------------------------------------------------- KL on a probe set


@dataclass
class ReferenceDistributions:
    """log π_ref(·| x_i, y_i,<t) over the whole vocabulary at every completion token of a
    probe set (float32): ``logps[i]`` is T_i × V. Computed once by
    :func:`reference_distributions`, it replaces the reference's forward passes in
    :func:`kl_on_probe` (the reference is frozen, so the numbers are identical)."""

    logps: list[Any]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.logps))


def reference_distributions(reference: Any, encoded: Sequence[Encoded], *, batch_size: int = 8,
                            tokenizer: Any = None) -> ReferenceDistributions:
    """Precompute the frozen reference's full next-token log-distributions on a probe set."""
    model = _model_of(reference)
    tok = tokenizer if tokenizer is not None else getattr(reference, "tokenizer", None)
    pad = pad_token_id(tok) if tok is not None else 0
    out: list[Any] = [None] * len(encoded)
    with _eval_mode(model):
        for idx in length_batches([len(e.input_ids) for e in encoded], batch_size):
            b = completion_batch([encoded[i] for i in idx], pad)
            lp = log_softmax(completion_logits(model, b.ids, b.flat))
            mx.eval(lp)
            for r, i in enumerate(idx):
                out[i] = lp[b.offsets[r]:b.offsets[r + 1]]
    return ReferenceDistributions(logps=out)


@contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Within the block a LoRA model computes its base model: every adapter layer's
    ``scale`` is 0 (mlx-lm's LoRA adds ``scale · x A B``); restored on exit."""
    layers = [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]
    if not layers:
        raise ValueError("reference=None is only meaningful for a policy with LoRA adapters")
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


def kl_on_probe(policy: Any, reference: Any, prompts: Sequence[Prompt] = (),
                completions: Sequence[Prompt] = (), *, tokenizer: Any = None, batch_size: int = 8,
                max_length: int = DEFAULT_MAX_LENGTH, encoded: Sequence[Encoded] | None = None) -> KLResult:
    """KL(π_θ ‖ π_ref) on a held-out probe set, exact over the vocabulary — the same
    definition as :func:`realign.backends.trl.kl_on_probe`.

    mean = Σ_i Σ_t KL_it ÷ Σ_i T_i (nats per completion token), with KL_it =
    Σ_v p_θ(v|x_i,y_i,<t)(log p_θ(v|·) − log p_ref(v|·)), log p = log_softmax in float32,
    each sequence's sum accumulated in float64 (as :func:`realign.metrics.per_sequence_kl`).
    ``policy_token_logps`` are the policy's log p of each completion token from the same
    forward pass. ``reference``: an :class:`MLXModelHandle` or model, a
    :class:`ReferenceDistributions` precomputed on the same ``encoded``, or ``None`` for a
    LoRA policy (its base, adapters disabled).
    """
    tok = tokenizer
    for h in (policy, reference):
        if tok is None and isinstance(h, MLXModelHandle):
            tok = h.tokenizer
    if encoded is None:
        if tok is None:
            raise ValueError("kl_on_probe needs a tokenizer (an MLXModelHandle or tokenizer=) or encoded=")
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        encoded = [encode_pair(tok, p, c, max_length) for p, c in zip(prompts, completions)]
    encoded = list(encoded)
    if not encoded:
        raise ValueError("empty probe set: KL is undefined")
    pad = pad_token_id(tok) if tok is not None else 0
    pol = _model_of(policy)
    cached = reference if isinstance(reference, ReferenceDistributions) else None
    ref = _model_of(reference) if reference is not None and cached is None else None
    if cached is not None and [int(a.shape[0]) for a in cached.logps] != [e.n_completion for e in encoded]:
        raise ValueError("the reference distributions were computed on a different probe set")
    if cached is None and ref is None:
        with adapters_disabled(pol):  # raises for a policy without adapters
            pass
    sums: list[float] = [0.0] * len(encoded)
    token_lp: list[list[float]] = [[] for _ in encoded]
    with _eval_mode(pol), (_eval_mode(ref) if ref is not None else _nullcontext()):
        for idx in length_batches([len(e.input_ids) for e in encoded], batch_size):
            b = completion_batch([encoded[i] for i in idx], pad)
            lp = log_softmax(completion_logits(pol, b.ids, b.flat))
            if cached is not None:
                lr = mx.concatenate([cached.logps[i] for i in idx], axis=0) if b.flat.size else lp
            elif ref is not None:
                lr = log_softmax(completion_logits(ref, b.ids, b.flat))
            else:
                with adapters_disabled(pol):
                    lr = log_softmax(completion_logits(pol, b.ids, b.flat))
                    mx.eval(lr)
            kl_t = vocab_sum(mx.exp(lp) * (lp - lr))[:, 0]
            tok_lp = mx.take_along_axis(lp, b.targets[:, None], axis=-1)[:, 0]
            mx.eval(kl_t, tok_lp)
            kl_np = np.array(kl_t, dtype=np.float64)
            tl_np = np.array(tok_lp)
            for r, i in enumerate(idx):
                lo, hi = b.offsets[r], b.offsets[r + 1]
                sums[i] = float(kl_np[lo:hi].sum())
                token_lp[i] = tl_np[lo:hi].tolist()
    counts = [e.n_completion for e in encoded]
    total = sum(counts)
    if total == 0:
        raise ValueError("the probe set has no completion tokens: KL is undefined")
    return KLResult(mean=sum(sums) / total, per_sequence=sums, counts=counts,
                    policy_token_logps=token_lp)


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


# ---------------------------------------------------------------- sampling (the KL gate)


def sample_responses(handle: Any, prompts: Sequence[Prompt], *, max_new_tokens: int, seed: int,
                     tokenizer: Any = None, batch_size: int = 8,
                     max_length: int = DEFAULT_MAX_LENGTH) -> list[Encoded]:
    """One response per prompt sampled from the model itself, as token ids — the
    definition of :func:`realign.backends.trl.sample_responses` on MLX: pure ancestral
    sampling at temperature 1 (y_t ~ softmax(logits_t) in float32, no logits processor),
    each response stopping after its first EOS token (kept) or ``max_new_tokens``; prompts
    with the chat template's generation prompt, cut from the left to
    ``max(1, max_length − max_new_tokens)`` tokens. Seeded by ``mx.random.key(seed)``
    (the draws differ from torch's). One prompt at a time with mlx-lm's KV cache
    (``batch_size`` is accepted for the TRL signature). Returns :class:`Encoded` items
    (prompt ids + sampled ids) to score with ``encoded=``."""
    from mlx_lm.models.cache import make_prompt_cache

    tok = tokenizer if tokenizer is not None else handle.tokenizer
    model = _model_of(handle)
    eos = tok.eos_token_id
    keep = max(1, max_length - max_new_tokens)
    key = mx.random.key(seed)
    out: list[Encoded] = []
    with _eval_mode(model):
        for p in prompts:
            ids = encode_prompt(tok, p)[-keep:]
            cache = make_prompt_cache(model)
            logits = model(mx.array([ids]), cache=cache)[:, -1, :].astype(mx.float32)
            new: list[int] = []
            for _ in range(max_new_tokens):
                key, sub = mx.random.split(key)
                t = int(mx.random.categorical(logits, key=sub).item())
                new.append(t)
                if t == eos:
                    break
                logits = model(mx.array([[t]]), cache=cache)[:, -1, :].astype(mx.float32)
            out.append(Encoded(input_ids=list(ids) + new, start=len(ids)))
    return out


# ---------------------------------------------------------------- policies, LoRA, saving


def make_policy(reference: MLXModelHandle, lora: dict[str, Any] | None = None) -> MLXModelHandle:
    """A trainable policy that starts at the reference: the same architecture with the
    reference's parameter arrays (MLX arrays are immutable, so nothing is copied until
    the optimizer writes new ones), or, with ``lora``, that copy with LoRA adapters
    (:func:`apply_lora`; zero-initialized B, so the policy equals the reference)."""
    from mlx_lm.utils import load_model

    src = reference.model_dir
    if reference.lora is not None:
        raise InputError("the reference carries LoRA adapters: merge them first (merge())")
    try:
        # structure only: the lazy weights it maps are replaced before they are ever read
        model, _ = load_model(src, lazy=True, model_config=rope_config(src))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot rebuild the model of {src} for a policy: {exc}", field="model") from exc
    model.update(reference.model.parameters())
    model.unfreeze()
    pol = MLXModelHandle(model=model, tokenizer=reference.tokenizer, wrapper=reference.wrapper,
                         source=reference.source, config=dict(reference.config), device=reference.device,
                         dtype=reference.dtype, path=reference.path)
    if lora:
        apply_lora(pol, lora)
    model.train()
    return pol


def lora_parameters(model: Any, lora: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm LoRA parameters from PEFT ``LoraConfig`` kwargs (the config's ``dpo.lora``
    is written for both backends) or from mlx-lm's own keys.

    PEFT → mlx-lm: ``r`` → ``rank`` (PEFT's default 8); ``lora_alpha / r`` → ``scale``
    (PEFT scales the update by α/r, or α/√r with ``use_rslora``; mlx-lm multiplies by
    ``scale``; PEFT's default α is 8); ``lora_dropout`` → ``dropout``; ``target_modules``
    (module names such as ``q_proj``, or ``all-linear``) → ``keys`` (paths inside a
    block, e.g. ``self_attn.q_proj``). Without ``target_modules``, PEFT's default for
    Llama-style models: ``q_proj`` and ``v_proj``. ``num_layers``: the last N blocks
    (default all). Keys PEFT has that mlx-lm lacks (``bias``, ``modules_to_save``, ...)
    raise InputError unless they hold PEFT's default.
    """
    mlx_keys = {"rank", "scale", "dropout", "keys", "num_layers"}
    allowed_peft = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "task_type",
                    "bias", "init_lora_weights"}
    unknown = set(lora) - mlx_keys - allowed_peft
    if unknown:
        raise InputError(f"LoRA settings the MLX backend does not support: {', '.join(sorted(unknown))}",
                         field="lora")
    if lora.get("bias", "none") != "none":
        raise InputError("LoRA bias training is not supported by the MLX backend", field="lora")
    rank = int(lora.get("rank", lora.get("r", 8)))
    if "scale" in lora:
        scale = float(lora["scale"])
    else:
        alpha = float(lora.get("lora_alpha", 8))
        scale = alpha / (rank ** 0.5 if lora.get("use_rslora") else rank)
    dropout = float(lora.get("dropout", lora.get("lora_dropout", 0.0)))
    layers = list(model.layers)
    num_layers = int(lora.get("num_layers") or len(layers))
    keys = lora.get("keys")
    if keys is None:
        targets = lora.get("target_modules") or ["q_proj", "v_proj"]
        if isinstance(targets, str):
            targets = [targets]
        linear_names = sorted({n for n, m in layers[0].named_modules()
                               if isinstance(m, (nn.Linear, nn.QuantizedLinear))})
        if "all-linear" in targets:
            keys = linear_names
        else:
            keys = [n for n in linear_names if n.split(".")[-1] in set(targets) or n in set(targets)]
        if not keys:
            raise InputError(f"LoRA target_modules {targets} match no linear layer of the model "
                             f"(its layers have {', '.join(linear_names)})", field="lora")
    return {"rank": rank, "scale": scale, "dropout": dropout, "keys": list(keys),
            "num_layers": num_layers}


def apply_lora(handle: MLXModelHandle, lora: dict[str, Any]) -> MLXModelHandle:
    """Attach LoRA adapters in place with mlx-lm's tuner
    (``mlx_lm.tuner.utils.linear_to_lora_layers``): the base is frozen, only the adapters
    train. ``lora``: PEFT or mlx-lm keys (:func:`lora_parameters`)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    params = lora_parameters(handle.model, lora)
    handle.model.freeze()
    linear_to_lora_layers(handle.model, params["num_layers"],
                          {k: params[k] for k in ("rank", "scale", "dropout", "keys")})
    handle.lora = params
    handle.base_source = handle.base_source or handle.source
    return handle


def merge(handle: MLXModelHandle) -> MLXModelHandle:
    """Fuse LoRA adapters into the weights (each adapter layer's ``fuse()``, as
    ``mlx_lm fuse`` does), in place; returns the handle, now a plain model."""
    model = handle.model
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    handle.lora = None
    handle.source = handle.base_source or handle.source
    handle.base_source = None
    return handle


def adapter_weights(model: Any) -> dict[str, Any]:
    """The adapter parameters of a LoRA model, by name."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}


def save_adapters(handle: MLXModelHandle, folder: Path) -> None:
    """mlx-lm's adapter layout: ``adapters.safetensors`` + ``adapter_config.json``
    (fine_tune_type, num_layers, lora_parameters; ``base_model``: the base's folder)."""
    assert handle.lora is not None
    mx.save_safetensors(str(folder / "adapters.safetensors"), adapter_weights(handle.model))
    lp = {k: handle.lora[k] for k in ("rank", "scale", "dropout", "keys")}
    cfg = {"fine_tune_type": "lora", "num_layers": handle.lora["num_layers"], "lora_parameters": lp,
           "base_model": str(handle.base_source or handle.source)}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    handle.tokenizer.save_pretrained(str(folder))


def save_full(handle: MLXModelHandle, folder: Path) -> None:
    """``mlx_lm.utils.save_model`` + ``save_config`` + the tokenizer, and the source's
    ``generation_config.json``. ``config.json``'s dtype names the saved weights' dtype."""
    from mlx_lm.utils import save_config, save_model

    save_model(folder, handle.model)
    cfg = dict(handle.config)
    dt = _param_dtype(handle.model)
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = dt
    save_config(cfg, folder / "config.json")
    handle.tokenizer.save_pretrained(str(folder))
    src = handle.model_dir
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", folder / "generation_config.json")


def weights_digest(model: Any, *, adapters: bool | None = None) -> str:
    """sha256 of a model's parameters (names, dtypes, shapes, bytes), in name order.
    ``adapters=False``: the base weights only (adapter parameters left out)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        if adapters is False and k.rsplit(".", 1)[-1] in ADAPTER_LEAVES:
            continue
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(memoryview(np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- KL of two saved models


def kl_between(policy: str | Path, probe: str | Path, reference: str | Path | None = None, *,
               completion: str = "chosen", max_examples: int = 64, batch_size: int = 8,
               max_length: int = DEFAULT_MAX_LENGTH, device: str | None = None, thresholds: Any = None,
               progress: Any = None) -> Any:
    """``realign kl --backend mlx``: the same measurement and gate as
    :func:`realign.backends.trl.kl_between`, on MLX. ``reference=None``: the policy must be
    an mlx-lm adapter folder; the reference is its base with the adapters disabled.
    Returns a :class:`realign.backends.base.KLBetween`."""
    from ..gates import Thresholds
    from ..rows import read_rows, to_trl_row
    from .base import KLBetween

    if completion not in ("chosen", "rejected"):
        raise InputError(f"completion must be chosen or rejected, got '{completion}'", field="completion")
    probe = Path(probe)
    rows = [to_trl_row(r) for r in read_rows(probe)][:max_examples]
    if not rows:
        raise InputError("no pairs to probe", file=probe)
    thresholds = thresholds or Thresholds()
    say = progress or (lambda d, t, m: None)
    backend = MLXBackend()
    steps = 3 if reference else 2
    say(0, steps, "loading the policy")
    pol = backend.load(policy, device=device)
    ref = None
    if reference:
        say(1, steps, "loading the reference")
        ref = backend.load(reference, device=device)
    elif pol.lora is None:
        raise InputError("without --reference the policy must be an adapter folder (its base with "
                         "the adapters disabled is the reference)", field="reference")
    say(steps - 1, steps, f"measuring KL on {len(rows)} pairs")
    kl = kl_on_probe(pol, ref, [r["prompt"] for r in rows], [r[completion] for r in rows],
                     batch_size=batch_size, max_length=max_length)
    say(steps, steps, "done")
    gate = thresholds.evaluate(
        "kl_divergence", kl.mean,
        detail=f"mean per-token KL(policy || {'reference' if reference else 'adapters disabled'}) "
               f"over {kl.tokens} {completion} tokens of {len(rows)} probe pairs from {probe.name} (MLX)")
    return KLBetween(gate=gate, mean_per_token=kl.mean, mean_per_sequence=kl.mean_sequence,
                     per_sequence=kl.per_sequence, tokens=kl.tokens, examples=len(rows))


__all__ = ["INSTALL", "MLXBackend", "MLXModelHandle", "ReferenceDistributions", "adapters_disabled",
           "apply_lora", "completion_batch", "completion_logits", "kl_between", "kl_on_probe",
           "lora_parameters", "make_policy", "merge", "pick_device", "reference_distributions",
           "sample_responses",
           "log_softmax", "logsumexp", "token_logps", "vocab_sum", "weights_digest"]
