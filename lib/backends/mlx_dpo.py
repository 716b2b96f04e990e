"""DPO on MLX: ``mlx.core`` / ``mlx.nn`` / ``mlx.optimizers`` with ``nn.value_and_grad``.

Written here rather than reused: mlx-lm has no DPO trainer, and mlx-lm-lora's
``train_dpo`` reads ``mx.device_info()["max_recommended_working_set_size"]`` (absent on
CPUs) and computes ``accuracies`` by comparing batch means, not pairs — TRL's metric is
per pair. What is reused: mlx-lm's models, loader and LoRA layers
(:mod:`realign.backends.mlx`), MLX's AdamW and gradient clipping.

Same definitions as TRL's ``DPOTrainer`` (TRL 1.x, ``trl/trainer/dpo_trainer.py``), so a
run reads the same on either backend:

* tokenization and truncation: :func:`realign.backends.encoding.encode_preference`;
* per sequence, ``logp = Σ_t log π(y_t | x, y_<t)`` over the (truncated) completion
  tokens; ``Δ = (logp_θ(c) − logp_ref(c)) − (logp_θ(r) − logp_ref(r))``;
* losses (mean over the pairs of a micro-batch, summed with ``loss_weights``):
  ``sigmoid`` −log σ(βΔ); ``hinge`` max(0, 1 − βΔ); ``ipo`` (Δ_c/|c| − Δ_r/|r| − 1/(2β))²
  with the log-ratios averaged per completion token; ``sft`` (the RPO term)
  −mean over the batch's chosen tokens of log π_θ;
* metrics: ``rewards/chosen`` = mean β(logp_θ(c) − logp_ref(c)), ``rewards/rejected``
  likewise, ``rewards/accuracies`` = share of pairs whose chosen reward > rejected
  reward, ``rewards/margins`` = mean of their difference, ``logps/chosen`` /
  ``logps/rejected`` = mean logp_θ; each averaged over the micro-batches of an optimizer
  step, as TRL logs them (``logging_steps=1``); ``loss`` likewise; ``grad_norm`` is the
  global norm before clipping;
* optimizer and schedule: the ``transformers.Trainer`` defaults TRL uses — AdamW (β
  0.9/0.999, ε 1e-8, bias-corrected, weight decay 0), gradient clipping at norm 1.0, a
  linear schedule with warm-up then decay to 0; gradients of the ``gradient_accumulation_steps``
  micro-batches averaged.

Not the same: the order in which pairs are drawn (a NumPy permutation per epoch from the
seed, not torch's sampler), so step-by-step losses match TRL only on identical batches.

Reference log-probs are precomputed once before training (:meth:`MLXDPOTrainer.precompute_reference`)
and cached by content under ``$REALIGN_HOME/cache/ref_logps/mlx-<key>.npz``.

Several Macs: the trainer is data-parallel under ``mlx.launch`` (``mx.distributed``):
each process takes its share of every batch, gradients and metrics are averaged with
``mlx.nn.average_gradients`` / ``mx.distributed.all_sum``; rank 0 writes checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..fileio import atomic_path, write_json_atomic
from .base import DPOSettings
from .encoding import PreferenceEncoded, encode_preference, pad_token_id
from .mlx import (
    MLXModelHandle,
    _plain_head,
    adapter_weights,
    adapters_disabled,
    completion_batch,
    completion_logits,
    mx,
    nn,
    save_adapters,
    save_full,
    token_logps,
    tree_flatten,
    tree_unflatten,
    weights_digest,
)

#: The DPO losses this backend implements (TRL names; combine them as a list with
#: ``loss_weights`` in ``DPOSettings.extra``).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sft")
#: ``DPOSettings.extra`` keys this trainer understands (TRL / transformers field names
#: with TRL's defaults); any other key is refused rather than silently ignored.
EXTRA_DEFAULTS: dict[str, Any] = {
    "loss_weights": None, "truncation_mode": "keep_start", "max_grad_norm": 1.0,
    "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
    "lr_scheduler_type": "linear", "warmup_steps": 0,
}
#: Keys that change nothing in this trainer's numbers (logging, TRL bookkeeping).
EXTRA_IGNORED = {"logging_steps", "report_to", "disable_tqdm", "dataloader_num_workers",
                 "remove_unused_columns", "use_cpu", "bf16", "fp16", "save_strategy",
                 "logging_strategy", "precompute_ref_log_probs", "precompute_ref_batch_size",
                 "gradient_checkpointing", "dataset_num_proc"}
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


# ---------------------------------------------------------------- the loss (pure)


def dpo_loss(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any, *,
             beta: float, loss_types: Sequence[str], loss_weights: Sequence[float] | None = None,
             chosen_counts: Any = None, rejected_counts: Any = None,
             chosen_token_logps_sum: Any = None, chosen_tokens: Any = None) -> tuple[Any, dict[str, Any]]:
    """TRL's DPO loss and metrics for one micro-batch of pairs (MLX arrays, shape [pairs]).

    ``chosen_counts`` / ``rejected_counts``: completion tokens per sequence (TRL's
    ``completion_mask.sum``, for ``ipo``); ``chosen_token_logps_sum`` / ``chosen_tokens``:
    Σ log π_θ over the batch's chosen tokens and their number (for ``sft``). Returns
    (loss, metrics) with the metrics as scalar arrays named as TRL logs them.
    """
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types)
    if len(weights) != len(loss_types):
        raise InputError(f"loss_weights has {len(weights)} entries for {len(loss_types)} loss types",
                         field="loss_weights")
    chosen_lr = policy_chosen - ref_chosen
    rejected_lr = policy_rejected - ref_rejected
    delta = chosen_lr - rejected_lr
    loss = mx.array(0.0, dtype=mx.float32)
    for lt, w in zip(loss_types, weights):
        if lt == "sigmoid":
            per = -nn.log_sigmoid(beta * delta)
        elif lt == "hinge":
            per = mx.maximum(1 - beta * delta, 0.0)
        elif lt == "ipo":
            c = mx.maximum(chosen_counts.astype(mx.float32), 1.0)
            r = mx.maximum(rejected_counts.astype(mx.float32), 1.0)
            per = (chosen_lr / c - rejected_lr / r - 1 / (2 * beta)) ** 2
        elif lt == "sft":
            per = -(chosen_token_logps_sum / chosen_tokens) * mx.ones_like(delta)
        else:
            raise InputError(f"loss type {lt!r} is not implemented by the MLX backend "
                             f"(it has {', '.join(LOSS_TYPES)})", field="loss_type")
        loss = loss + per.mean() * w
    cr = beta * mx.stop_gradient(chosen_lr)
    rr = beta * mx.stop_gradient(rejected_lr)
    metrics = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).astype(mx.float32).mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": mx.stop_gradient(policy_chosen).mean(),
        "logps/rejected": mx.stop_gradient(policy_rejected).mean(),
    }
    return loss, metrics


# ---------------------------------------------------------------- data


@dataclass
class PairBatch:
    """A micro-batch in TRL's layout: rows 0..P−1 are prompt+chosen, P..2P−1 prompt+rejected."""

    batch: Any  # CompletionBatch of the 2P sequences
    seg: Any  # 2P × N one-hot: sums token log-probs per sequence
    counts: Any  # 2P completion-token counts (TRL's completion_mask.sum)
    chosen_tok: Any  # N mask of the tokens belonging to chosen sequences
    n_chosen_tokens: int
    ref_chosen: Any
    ref_rejected: Any
    pairs: int


@dataclass
class StepAction:
    """What a step callback asks of the trainer after an optimizer step.

    ``restore``: trainable weights to put back (from :meth:`MLXDPOTrainer.snapshot`);
    the optimizer moments are reset with them (the KL monitor's ``rollback``).
    ``lr_factor``: multiply the learning rate from the next step on (0.5 halves it).
    ``reset_optimizer``: clear the moments without restoring. ``stop``: end training
    after this step (a final checkpoint is written when ``output_dir`` is set).
    """

    stop: bool = False
    restore: dict[str, Any] | None = None
    lr_factor: float = 1.0
    reset_optimizer: bool = False


#: ``callback(step, metrics) -> StepAction | None``, called after every optimizer step.
StepCallback = Callable[[int, dict[str, float]], "StepAction | None"]


@dataclass
class TrainResult:
    global_step: int
    log_history: list[dict[str, float]]
    stopped_early: bool
    train_seconds: float
    step_seconds: list[float]
    ref_cache: dict[str, Any] = field(default_factory=dict)


def _cache_dir() -> Path:
    from ..models import realign_home

    d = realign_home() / "cache" / "ref_logps"
    d.mkdir(parents=True, exist_ok=True)
    return d


class MLXDPOTrainer:
    """DPO training of an MLX policy against a frozen reference.

    ``policy``: a trainable :class:`MLXModelHandle` (:func:`realign.backends.mlx.make_policy`,
    full or LoRA); ``reference``: the frozen reference handle, or None for a LoRA policy
    (its base with adapters disabled), or None with ``ref_logps`` given. ``rows``: TRL
    conversational rows (``prompt``/``chosen``/``rejected``: message lists or strings).
    ``settings``: :class:`DPOSettings` (``loss_type`` a name or list, ``extra`` as
    :data:`EXTRA_DEFAULTS`). ``callback(step, metrics)`` runs after each optimizer step and
    may return a :class:`StepAction`. With ``output_dir``, a checkpoint
    ``checkpoint-<step>`` is written every ``save_every`` steps and at the end (the last
    ``save_total_limit`` are kept); ``train(resume_from=...)`` continues from one;
    ``on_save(folder, step)`` runs after each checkpoint is written (rank 0), e.g. for
    the KL monitor to store its state beside it. ``group``: the ``mx.distributed`` group
    (default ``mx.distributed.init()``: one process unless started by ``mlx.launch``).
    """

    def __init__(self, policy: MLXModelHandle, reference: MLXModelHandle | None,
                 rows: Sequence[dict[str, Any]], settings: DPOSettings, *,
                 output_dir: str | Path | None = None, save_every: int | None = None,
                 save_total_limit: int = 2, callback: StepCallback | None = None,
                 ref_logps: tuple[Sequence[float], Sequence[float]] | None = None,
                 use_cache: bool = True, progress: Callable[[int, int, str], None] | None = None,
                 group: Any = None, on_save: Callable[[Path, int], None] | None = None) -> None:
        import mlx.optimizers as optim

        self.policy, self.reference, self.settings = policy, reference, settings
        self.model = policy.model
        self.tokenizer = policy.tokenizer
        self.pad = pad_token_id(self.tokenizer)
        # transformers builds the input embedding with padding_idx=config.pad_token_id,
        # whose row gets no gradient from the lookup: the same here (see completion_logits)
        pid = (policy.config or {}).get("pad_token_id")
        self.frozen_token = int(pid) if isinstance(pid, int) else None
        self.output_dir = Path(output_dir) if output_dir else None
        self.save_every, self.save_total_limit = save_every, save_total_limit
        self.callback, self.progress, self.on_save = callback, progress, on_save
        self.use_cache = use_cache
        self.group = group if group is not None else mx.distributed.init()
        self.world, self.rank = self.group.size(), self.group.rank()
        lt = settings.loss_type
        self.loss_types = [lt] if isinstance(lt, str) else list(lt)
        for t in self.loss_types:
            if t not in LOSS_TYPES:
                raise InputError(f"loss type {t!r} is not implemented by the MLX backend "
                                 f"(it has {', '.join(LOSS_TYPES)})", field="loss_type")
        extra = dict(settings.extra or {})
        unknown = set(extra) - set(EXTRA_DEFAULTS) - EXTRA_IGNORED
        if unknown:
            raise InputError(f"dpo.extra keys the MLX backend does not implement: "
                             f"{', '.join(sorted(unknown))} (it has {', '.join(EXTRA_DEFAULTS)})",
                             field="extra")
        self.opts = {k: extra.get(k, v) for k, v in EXTRA_DEFAULTS.items()}
        if self.opts["lr_scheduler_type"] not in ("linear", "constant", "cosine"):
            raise InputError("lr_scheduler_type must be linear, constant or cosine on MLX",
                             field="lr_scheduler_type")
        if settings.lora and policy.lora is None:
            raise InputError("settings.lora is set but the policy has no adapters: build it with "
                             "make_policy(reference, lora)", field="lora")
        if reference is None and ref_logps is None and policy.lora is None:
            raise InputError("full fine-tuning needs the reference handle (or ref_logps)")

        # tokenize as TRL does, and drop pairs whose prompt fills max_length (TRL's filter)
        enc = [encode_preference(self.tokenizer, r["prompt"], r["chosen"], r["rejected"]) for r in rows]
        self.kept = [i for i, e in enumerate(enc) if not (
            self.opts["truncation_mode"] == "keep_start" and len(e.prompt_ids) >= settings.max_length)]
        self.encoded: list[PreferenceEncoded] = [enc[i] for i in self.kept]
        if not self.encoded:
            raise InputError("no training pair fits max_length (every prompt fills it)", field="max_length")
        self.ref_chosen: np.ndarray | None = None
        self.ref_rejected: np.ndarray | None = None
        if ref_logps is not None:
            c, r = (np.asarray(x, dtype=np.float32) for x in ref_logps)
            if len(c) == len(rows) and len(self.kept) != len(rows):
                c, r = c[self.kept], r[self.kept]
            if len(c) != len(self.encoded) or len(r) != len(self.encoded):
                raise ValueError("ref_logps do not match the training pairs")
            self.ref_chosen, self.ref_rejected = c, r
        self.ref_cache: dict[str, Any] = {}

        b, g = settings.per_device_batch_size, settings.gradient_accumulation_steps
        self.global_batch = b * self.world
        self.batches_per_epoch = math.ceil(len(self.encoded) / self.global_batch)
        self.updates_per_epoch = max(self.batches_per_epoch // g, 1)
        self.max_steps = (settings.max_steps if settings.max_steps > 0
                          else math.ceil(settings.num_epochs * self.updates_per_epoch))
        w = self.opts["warmup_steps"]
        self.warmup = int(math.ceil(w * self.max_steps)) if 0 < w < 1 else int(w)
        self.optimizer = optim.AdamW(learning_rate=settings.learning_rate,
                                     betas=[self.opts["adam_beta1"], self.opts["adam_beta2"]],
                                     eps=self.opts["adam_epsilon"], weight_decay=self.opts["weight_decay"],
                                     bias_correction=True)
        self.lr_factor = 1.0
        self.step = 0
        self.cursor = 0  # micro-batches consumed
        self.log_history: list[dict[str, float]] = []
        self.step_seconds: list[float] = []
        self._loss_and_grad = nn.value_and_grad(self.model, self._loss_fn)
        _plain_head(self.model)  # decide the LM-head path now, outside any gradient transform

    # ---- reference log-probs

    def _ref_model(self) -> Any:
        return self.reference.model if self.reference is not None else self.model

    def cache_key(self) -> str:
        """sha256(reference weights, token ids of every kept pair, max_length,
        truncation_mode, "mlx"): the reference log-prob cache's file name."""
        h = hashlib.sha256()
        if self.reference is not None:
            h.update(weights_digest(self.reference.model).encode())
        else:
            h.update(weights_digest(self.model, adapters=False).encode())
        for e in self.encoded:
            h.update(json.dumps([e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
        h.update(f"{self.settings.max_length}|{self.opts['truncation_mode']}|mlx".encode())
        return h.hexdigest()

    def precompute_reference(self, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """log π_ref(chosen) and log π_ref(rejected) of every pair, computed once (or read
        from the cache). Returns (chosen, rejected) float32 arrays."""
        if self.ref_chosen is not None and self.ref_rejected is not None:
            return self.ref_chosen, self.ref_rejected
        t0 = time.perf_counter()
        key = self.cache_key() if self.use_cache else None
        path = _cache_dir() / f"mlx-{key}.npz" if key else None
        if path is not None and path.exists():
            with np.load(path) as z:
                c, r = z["ref_chosen_logps"], z["ref_rejected_logps"]
            if len(c) == len(self.encoded):
                self.ref_chosen, self.ref_rejected = c.astype(np.float32), r.astype(np.float32)
                self.ref_cache = {"hit": True, "path": str(path), "seconds": time.perf_counter() - t0}
                return self.ref_chosen, self.ref_rejected
        bs = batch_size or max(self.settings.per_device_batch_size, 1)
        n = len(self.encoded)
        chosen = np.zeros(n, dtype=np.float32)
        rejected = np.zeros(n, dtype=np.float32)
        model = self._ref_model()
        order = sorted(range(n), key=lambda i: len(self.encoded[i].prompt_ids) + max(
            len(self.encoded[i].chosen_ids), len(self.encoded[i].rejected_ids)))
        was = model.training
        model.eval()
        try:
            for k in range(0, n, bs):
                idx = order[k:k + bs]
                pb = self._pair_batch(idx, with_ref=False)
                if self.reference is None:
                    with adapters_disabled(model):
                        sums = self._sequence_logps(model, pb)[0]
                        mx.eval(sums)
                else:
                    sums = self._sequence_logps(model, pb)[0]
                s = np.array(sums)
                chosen[idx], rejected[idx] = s[: len(idx)], s[len(idx):]
                if self.progress:
                    self.progress(min(k + bs, n), n, "reference log-probs")
        finally:
            model.train(was)
        self.ref_chosen, self.ref_rejected = chosen, rejected
        if path is not None and self.rank == 0:
            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, ref_chosen_logps=chosen, ref_rejected_logps=rejected)
        self.ref_cache = {"hit": False, "path": str(path) if path else None,
                          "seconds": time.perf_counter() - t0}
        return chosen, rejected

    # ---- batches and the loss

    def _pair_batch(self, idx: Sequence[int], with_ref: bool = True) -> PairBatch:
        mode = self.opts["truncation_mode"]
        seqs = [self.encoded[i].sequences(self.settings.max_length, mode) for i in idx]
        items = [c for c, _ in seqs] + [r for _, r in seqs]
        b = completion_batch(items, self.pad)
        n_tok = int(b.flat.size)
        seg = np.zeros((len(items), n_tok), dtype=np.float32)
        seg[b.rows, np.arange(n_tok)] = 1.0
        counts = np.array([sum(m) for _, m in items], dtype=np.float32)
        chosen_tok = (b.rows < len(idx)).astype(np.float32)
        rc = rr = None
        if with_ref:
            assert self.ref_chosen is not None and self.ref_rejected is not None
            rc = mx.array(self.ref_chosen[list(idx)])
            rr = mx.array(self.ref_rejected[list(idx)])
        return PairBatch(batch=b, seg=mx.array(seg), counts=mx.array(counts),
                         chosen_tok=mx.array(chosen_tok), n_chosen_tokens=int(chosen_tok.sum()),
                         ref_chosen=rc, ref_rejected=rr, pairs=len(idx))

    def _sequence_logps(self, model: Any, pb: PairBatch) -> tuple[Any, Any]:
        """(per-sequence Σ log π over completion tokens [2P], per-token log π [N])."""
        b = pb.batch
        lp = token_logps(completion_logits(model, b.ids, b.flat, frozen_token=self.frozen_token), b.targets)
        return pb.seg @ lp, lp

    def _loss_fn(self, model: Any, pb: PairBatch) -> tuple[Any, dict[str, Any]]:
        sums, lp = self._sequence_logps(model, pb)
        p = pb.pairs
        return dpo_loss(sums[:p], sums[p:], pb.ref_chosen, pb.ref_rejected,
                        beta=self.settings.beta, loss_types=self.loss_types,
                        loss_weights=self.opts["loss_weights"], chosen_counts=pb.counts[:p],
                        rejected_counts=pb.counts[p:],
                        chosen_token_logps_sum=(lp * pb.chosen_tok).sum(),
                        chosen_tokens=max(pb.n_chosen_tokens, 1))

    def loss_and_metrics(self, indices: Sequence[int]) -> tuple[float, dict[str, float]]:
        """The loss and metrics of one micro-batch (pairs ``indices`` of the kept rows),
        without a gradient or an update: what a training step would log for it."""
        if self.ref_chosen is None:
            self.precompute_reference()
        loss, metrics = self._loss_fn(self.model, self._pair_batch(indices))
        mx.eval(loss, metrics)
        return float(loss.item()), {k: float(v.item()) for k, v in metrics.items()}

    def compute_gradients(self, indices: Sequence[int]) -> tuple[float, dict[str, float], dict[str, Any], float]:
        """(loss, metrics, gradients by parameter name, their global norm) of one
        micro-batch, without an update."""
        if self.ref_chosen is None:
            self.precompute_reference()
        (loss, metrics), grads = self._loss_and_grad(self.model, self._pair_batch(indices))
        flat = dict(tree_flatten(grads))
        norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for g in flat.values()))
        mx.eval(loss, metrics, norm, flat)
        return (float(loss.item()), {k: float(v.item()) for k, v in metrics.items()}, flat,
                float(norm.item()))

    # ---- schedule, order

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based), before ``lr_factor``:
        transformers' linear schedule (warm-up from 0, then linear decay to 0 at
        ``max_steps``), constant, or cosine with warm-up."""
        base = self.settings.learning_rate
        if step < self.warmup:
            return base * step / max(1, self.warmup)
        kind = self.opts["lr_scheduler_type"]
        if kind == "constant":
            return base
        frac = (step - self.warmup) / max(1, self.max_steps - self.warmup)
        if kind == "cosine":
            return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * frac)))
        return base * max(0.0, 1.0 - frac)

    def _micro_batch(self, k: int) -> list[int]:
        """Pair indices of micro-batch ``k`` (counted from the start of training) for
        this process: epoch e = k // batches_per_epoch draws a permutation seeded by
        (seed, e); process r takes its slice of each global batch (of an epoch's short
        last batch, a process whose slice is empty takes the batch's first pair, as
        accelerate's even batches repeat samples)."""
        e, j = divmod(k, self.batches_per_epoch)
        perm = np.random.default_rng([self.settings.seed, e]).permutation(len(self.encoded))
        glob = perm[j * self.global_batch:(j + 1) * self.global_batch]
        per = self.settings.per_device_batch_size
        mine = glob[self.rank * per:(self.rank + 1) * per]
        return [int(i) for i in (mine if len(mine) else glob[:1])]

    # ---- weights, optimizer, LR (for a step callback such as the KL monitor)

    def snapshot(self) -> dict[str, Any]:
        """The trainable weights, by name. MLX arrays are immutable: nothing is copied."""
        return dict(tree_flatten(self.model.trainable_parameters()))

    def restore(self, weights: dict[str, Any], *, reset_optimizer: bool = True) -> None:
        """Put back weights from :meth:`snapshot` (and clear the optimizer moments)."""
        self.model.update(tree_unflatten(list(weights.items())))
        if reset_optimizer:
            self.reset_optimizer()
        mx.eval(self.model.parameters())

    def reset_optimizer(self) -> None:
        """Clear AdamW's moments and its step count (what clearing a torch optimizer's
        state does: bias correction starts again); the learning rate is kept."""
        lr = self.optimizer.learning_rate
        self.optimizer.state = {"step": mx.array(0, mx.uint64), "learning_rate": lr}

    def scale_lr(self, factor: float) -> None:
        self.lr_factor *= factor

    # ---- training

    def train(self, resume_from: str | Path | None = None) -> TrainResult:
        """Run ``max_steps`` optimizer steps (from a checkpoint when ``resume_from``)."""
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self.precompute_reference()
        g = self.settings.gradient_accumulation_steps
        self.model.train()
        t_start = time.perf_counter()
        stopped = False
        while self.step < self.max_steps:
            t0 = time.perf_counter()
            lr = self.learning_rate(self.step) * self.lr_factor
            self.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)
            grads = None
            losses: list[Any] = []
            mets: list[dict[str, Any]] = []
            for _ in range(g):
                pb = self._pair_batch(self._micro_batch(self.cursor))
                self.cursor += 1
                (loss, metrics), gr = self._loss_and_grad(self.model, pb)
                grads = gr if grads is None else _tree_add(grads, gr)
                mx.eval(grads, loss, metrics)
                losses.append(loss)
                mets.append(metrics)
            assert grads is not None
            if g > 1:
                grads = _tree_scale(grads, 1.0 / g)
            if self.world > 1:
                grads = nn.average_gradients(grads, group=self.group)
            grads, norm = _clip(grads, self.opts["max_grad_norm"])
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.parameters(), self.optimizer.state, norm)
            self.step += 1
            record = {"step": self.step, "loss": _mean([x.item() for x in losses]),
                      "grad_norm": float(norm.item()), "learning_rate": lr,
                      "epoch": self.cursor / self.batches_per_epoch}
            for key in mets[0]:
                record[key] = _mean([m[key].item() for m in mets])
            if self.world > 1:
                record = _all_mean(record, self.group)
            self.step_seconds.append(time.perf_counter() - t0)
            self.log_history.append(record)
            if self.progress:
                self.progress(self.step, self.max_steps, "DPO training")
            action = self.callback(self.step, dict(record)) if self.callback else None
            if action is not None:
                if action.restore is not None:
                    self.restore(action.restore, reset_optimizer=True)
                elif action.reset_optimizer:
                    self.reset_optimizer()
                if action.lr_factor != 1.0:
                    self.scale_lr(action.lr_factor)
                stopped = bool(action.stop)
            last = stopped or self.step >= self.max_steps
            if self.output_dir is not None and (
                    last or (self.save_every and self.step % self.save_every == 0)):
                folder = self.save_checkpoint(self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}")
                if self.rank == 0:
                    if self.on_save is not None:
                        self.on_save(folder, self.step)
                    self.mark_complete(folder)
            if stopped:
                break
        return TrainResult(global_step=self.step, log_history=self.log_history, stopped_early=stopped,
                           train_seconds=time.perf_counter() - t_start, step_seconds=self.step_seconds,
                           ref_cache=self.ref_cache)

    # ---- checkpoints

    def save_checkpoint(self, path: str | Path) -> Path:
        """A loadable model folder (full: the saved model; LoRA: its adapters; see
        :meth:`realign.backends.mlx.MLXBackend.save`) plus ``optimizer.safetensors`` and
        ``trainer_state.json`` (step, data position, LR factor, log history, reference
        log-probs). Written by rank 0 only. It is not complete until :meth:`mark_complete`
        (which :meth:`train` calls after ``on_save``) writes the marker."""
        path = Path(path)
        if self.rank != 0:
            return path
        with atomic_path(path, directory=True) as tmp:
            if self.policy.lora is not None:
                save_adapters(self.policy, tmp)
            else:
                save_full(self.policy, tmp)
            opt = dict(tree_flatten(self.optimizer.state))
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE),
                                {k: v for k, v in opt.items() if isinstance(v, mx.array)})
            state = {"step": self.step, "cursor": self.cursor, "lr_factor": self.lr_factor,
                     "max_steps": self.max_steps, "settings": _jsonable(asdict(self.settings)),
                     "log_history": self.log_history,
                     "ref_chosen_logps": None if self.ref_chosen is None else self.ref_chosen.tolist(),
                     "ref_rejected_logps": None if self.ref_rejected is None else self.ref_rejected.tolist()}
            (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        return path

    def mark_complete(self, folder: str | Path) -> None:
        """The TRL path's rule (:data:`realign.backends.trl_train.CHECKPOINT_COMPLETE`):
        every file of the checkpoint (the ``on_save`` hooks' included) is flushed to disk,
        then the marker is written last; only then are complete checkpoints beyond
        ``save_total_limit`` rotated out. A folder without the marker (a save cut short)
        is never resumed from (:func:`latest_checkpoint`)."""
        from .trl_train import CHECKPOINT_COMPLETE, _fsync_tree, complete_checkpoints

        folder = Path(folder)
        if self.rank != 0:
            return
        _fsync_tree(folder)
        write_json_atomic(folder / CHECKPOINT_COMPLETE, {
            "step": self.step, "backend": "mlx",
            "files": sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())})
        if self.save_total_limit:
            for old in complete_checkpoints(folder.parent)[:-self.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer moments, step, data position and LR factor."""
        path = Path(path)
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if self.policy.lora is not None:
            w = mx.load(str(path / "adapters.safetensors"))
            current = adapter_weights(self.model)
        else:
            w = {}
            for f in sorted(path.glob("model*.safetensors")):
                w.update(mx.load(str(f)))
            current = dict(tree_flatten(self.model.parameters()))
        missing = set(current) - set(w)
        if missing:
            raise InputError(f"checkpoint {path} lacks {len(missing)} weights of the policy "
                             f"(e.g. {sorted(missing)[0]})", file=path)
        self.model.update(tree_unflatten([(k, w[k]) for k in current]))
        opt = mx.load(str(path / OPTIMIZER_FILE))
        self.optimizer.state = tree_unflatten(list(opt.items()))
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.step, self.cursor = int(state["step"]), int(state["cursor"])
        self.lr_factor = float(state["lr_factor"])
        self.log_history = list(state.get("log_history", []))
        if state.get("ref_chosen_logps") is not None and self.ref_chosen is None:
            self.ref_chosen = np.asarray(state["ref_chosen_logps"], dtype=np.float32)
            self.ref_rejected = np.asarray(state["ref_rejected_logps"], dtype=np.float32)


def latest_checkpoint(output_dir: str | Path, *, remove_incomplete: bool = False) -> Path | None:
    """The newest *complete* ``checkpoint-<step>`` folder under ``output_dir`` (holding the
    completion marker, :meth:`MLXDPOTrainer.mark_complete`; None when there is none), by
    the TRL path's rule (:func:`realign.backends.trl_train.complete_checkpoints`: folders
    without the marker count only in a folder where none has it and their
    ``trainer_state.json`` names their step). ``remove_incomplete``: delete the others
    (a save cut short)."""
    from .trl_train import resume_checkpoint

    d = Path(output_dir)
    if not d.is_dir():
        return None
    got, _ = resume_checkpoint(d, remove_incomplete=remove_incomplete)
    return got


# ---------------------------------------------------------------- helpers


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs))


def _tree_add(a: Any, b: Any) -> Any:
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a: Any, s: float) -> Any:
    from mlx.utils import tree_map

    return tree_map(lambda x: x * s, a)


def _clip(grads: Any, max_norm: float | None) -> tuple[Any, Any]:
    """(gradients clipped to global norm ``max_norm``, the norm before clipping)."""
    import mlx.optimizers as optim

    if max_norm is None or max_norm <= 0:
        norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
        return grads, norm
    return optim.clip_grad_norm(grads, max_norm)


def _all_mean(record: dict[str, float], group: Any) -> dict[str, float]:
    keys = [k for k in record if k not in ("step", "learning_rate", "epoch")]
    vals = mx.distributed.all_sum(mx.array([record[k] for k in keys], dtype=mx.float32), group=group)
    out = dict(record)
    for k, v in zip(keys, np.array(vals).tolist()):
        out[k] = v / group.size()
    return out


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# ---------------------------------------------------------------- a standalone run (mlx.launch)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m realign.backends.mlx_dpo``: DPO of a model on a preference file with
    the MLX trainer, one process or several under ``mlx.launch`` (data-parallel over
    ``mx.distributed``). Rank 0 prints one JSON line per optimizer step, writes
    ``OUTPUT/checkpoints/checkpoint-<step>`` and the final model to ``OUTPUT/model``.
    Resumes from the latest checkpoint in ``OUTPUT/checkpoints`` when there is one."""
    import argparse

    from ..rows import read_rows, to_trl_row
    from .mlx import MLXBackend, make_policy

    ap = argparse.ArgumentParser(prog="python -m realign.backends.mlx_dpo", description=main.__doc__)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", required=True, help="preference pairs (any format realign reads)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss-type", default="sigmoid", help="sigmoid, hinge, ipo, or a comma list with sft")
    ap.add_argument("--loss-weights", default=None, help="comma list, one per loss type")
    ap.add_argument("--learning-rate", type=float, default=5e-6)
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per process per micro-batch")
    ap.add_argument("--gradient-accumulation-steps", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--device", default=None, help="gpu or cpu (default: MLX's default)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    group = mx.distributed.init()
    loss = [x for x in a.loss_type.split(",") if x]
    extra: dict[str, Any] = {}
    if a.loss_weights:
        extra["loss_weights"] = [float(x) for x in a.loss_weights.split(",")]
    lora = {"r": a.lora_r, "lora_alpha": a.lora_alpha} if a.lora_r > 0 else None
    settings = DPOSettings(beta=a.beta, loss_type=loss if len(loss) > 1 else loss[0],
                           learning_rate=a.learning_rate, per_device_batch_size=a.batch_size,
                           gradient_accumulation_steps=a.gradient_accumulation_steps,
                           max_steps=a.max_steps, max_length=a.max_length, seed=a.seed, lora=lora,
                           extra=extra)
    rows = [to_trl_row(r) for r in read_rows(a.data)]
    backend = MLXBackend()
    ref = backend.load(a.model, device=a.device)
    policy = make_policy(ref, lora)
    out = Path(a.output)
    rank0 = group.rank() == 0

    def log(step: int, metrics: dict[str, float]) -> None:
        if rank0:
            print(json.dumps(metrics), flush=True)

    tr = MLXDPOTrainer(policy, None if lora else ref, rows, settings, output_dir=out / "checkpoints",
                       save_every=a.save_every, callback=log, group=group)
    res = tr.train(resume_from=latest_checkpoint(out / "checkpoints"))
    if rank0:
        backend.save(policy, out / "model", merge_adapters=True)
        print(json.dumps({"event": "done", "global_step": res.global_step, "processes": group.size(),
                          "train_seconds": res.train_seconds, "model": str(out / "model")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
