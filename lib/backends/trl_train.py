"""Training through TRL: SFT (``SFTTrainer``) and DPO (``DPOTrainer``) with a
content-addressed reference log-prob cache.

The cache: TRL's ``precompute_ref_log_probs`` computes log π_ref(chosen) and
log π_ref(rejected) for every training pair once, before training, instead of a
reference forward pass every step. :class:`CachedRefDPOTrainer` stores that result under
``$REALIGN_HOME/cache/ref_logps/<key>.npz`` where

    key = sha256(reference weights hash, tokenized dataset (prompt/chosen/rejected ids),
                 max_length, truncation_mode, ld_alpha, mixed precision, trl version)

so a rerun, a resumed run or a later iteration against the same reference and data
skips the precompute entirely. The weights hash is TRL's own ``hash_module`` of the
reference (computed by TRL whenever precompute is on); the token ids cover the chat
template; ``max_length`` and ``truncation_mode`` are applied later, by TRL's collator,
so they are part of the key.

On a cache miss in a single process the log-probs are computed by
:func:`reference_logps` instead of TRL's loop, with the same result and less work:

    log π_ref(y | x) = Σ_{t ∈ completion} log softmax(W h_{t-1})[y_t]

over the completion tokens of the collated (truncated) sequence, where h is the frozen
reference's last hidden state and W its LM head. Pairs are batched in order of length
(less padding), and the LM head runs only at completion positions: TRL's fused head
scores every position (prompt and padding included) on devices without Triton, and when
no ``ref_model`` is passed it precomputes with the policy, whose head also computes the
entropy/top-1 metrics. Models whose head transforms the logits (soft-capping, logit
scaling) and length-desensitized DPO (``ld_alpha``) keep TRL's own computation, as does
distributed training (TRL shards the precompute across ranks).

The training steps use TRL's own loss, with its fused LM head restricted to the
completion positions on CPU as TRL already does on CUDA (:func:`completion_only_lm_head`).

Checkpoints are written so that a partial one is never resumed from: the trainer writes
``checkpoint-N`` as transformers does, then the stage's checkpoint hooks (the KL
monitor's state), then every file is flushed to disk and :data:`CHECKPOINT_COMPLETE` is
written last; only then are older checkpoints rotated out. :func:`resume_checkpoint`
picks the newest checkpoint that has the marker and removes the incomplete ones (a kill
or a full disk during a save).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..fileio import atomic_path, write_json_atomic
from ..models import realign_home

#: Written into ``checkpoint-N`` after everything else of that checkpoint, flushed to disk:
#: a checkpoint folder without it is incomplete and is never resumed from.
CHECKPOINT_COMPLETE = "realign_complete.json"


def quiet_hf() -> None:
    """Silence library chatter (progress bars of datasets, deprecation warnings of
    transformers) during stages; realign shows its own progress bar."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=UserWarning, module="trl")


def ref_cache_dir() -> Path:
    d = realign_home() / "cache" / "ref_logps"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _dataset_digest(dataset: Any, columns: list[str]) -> str:
    """sha256 of the named columns' Arrow IPC bytes (content, not object identity)."""
    import pyarrow as pa

    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    table = dataset.data.table.select([c for c in columns if c in dataset.column_names])
    sink = pa.BufferOutputStream()
    table = table.combine_chunks()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


#: Config fields that make a model's LM head transform its logits: such models keep TRL's
#: fused head (which applies them) for the reference log-probs.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")


def fast_reference_supported(model: Any) -> bool:
    """True when :func:`reference_logps` computes exactly what TRL would for ``model``:
    a plain (non-PEFT) causal LM whose logits are ``W h (+ b)`` with no transform."""
    if hasattr(model, "peft_config") or not hasattr(model, "get_output_embeddings"):
        return False
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(cfg, k, None) is not None for k in _LOGIT_TRANSFORMS):
        return False
    backbone = getattr(model, "base_model", None)
    return backbone is not None and backbone is not model and model.get_output_embeddings() is not None


def reference_logps(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Summed completion log-probs of a collated DPO batch (TRL's layout: the first half
    of the rows are prompt+chosen, the second half prompt+rejected, right-padded), as
    ``(chosen, rejected)`` tensors of shape ``[pairs]``.

    ``logp_i = Σ_t m_{i,t} · log softmax(W h_{i,t-1} + b)[x_{i,t}]`` with ``m`` the
    collator's completion mask; the LM head is applied only where ``m = 1``.
    """
    import torch

    ids, attn, cmask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        target = cmask[:, 1:].bool()
        h = hidden[:, :-1][target]
        head = model.get_output_embeddings()
        logits = head(h.to(head.weight.dtype)).float()
        tok = ids[:, 1:][target]
        logp = logits.log_softmax(-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        rows = torch.arange(ids.size(0), device=ids.device).unsqueeze(1).expand_as(target)[target]
        sums = torch.zeros(ids.size(0), dtype=torch.float32, device=ids.device).index_add_(0, rows, logp)
    return sums.chunk(2, dim=0)


@contextmanager
def completion_only_lm_head(device: Any) -> Iterator[bool]:
    """Within the block, TRL's fused LM head scores only the completion positions on a
    CPU ``device`` (the positions whose label is not -100), as it does on CUDA.

    TRL (``trl.trainer.utils.add_fused_lm_head``) projects only those positions when
    ``_use_triton(device)`` is true and scores every position (prompt and padding too)
    elsewhere, to keep tile shapes fixed for compiled backends such as Neuron. Eager CPU
    has no such constraint, and the masked positions are discarded anyway (the loss and
    every metric are computed over completion tokens only), so the result is the same:
    the logits of the other positions are never used. On a DPO step of the default model
    (batch 8, length 128) this cuts the step by a third to a half (``benchmarks/bench_dpo.py``).

    This switches TRL's private ``_use_triton`` predicate for the head's *shape* decision
    only (the kernel choice lives in ``trl.kernels.chunked_logprob`` and is untouched),
    and restores it on exit. Yields True when the switch is in effect; False (a no-op)
    for other devices or a TRL without that predicate.
    """
    import trl.trainer.utils as tu

    original = getattr(tu, "_use_triton", None)
    if original is None or getattr(device, "type", None) != "cpu":
        yield False
        return
    tu._use_triton = lambda d: d.type == "cpu" or original(d)
    try:
        yield True
    finally:
        tu._use_triton = original


def checkpoint_step(folder: Path) -> int | None:
    """N of a ``checkpoint-N`` folder name (None for any other name)."""
    head, _, tail = folder.name.rpartition("-")
    return int(tail) if head == "checkpoint" and tail.isdigit() else None


def _legacy_complete(folder: Path) -> bool:
    """A checkpoint written before the marker existed: transformers' ``trainer_state.json``
    (written after the weights, optimizer, scheduler and RNG states) parses and names step N."""
    import json

    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    return isinstance(state, dict) and state.get("global_step") == checkpoint_step(folder) and has_weights


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders under ``root``, oldest first: those holding
    :data:`CHECKPOINT_COMPLETE`. Only when no folder has the marker (a run written before
    it existed), folders whose ``trainer_state.json`` parses and names their step count."""
    folders = sorted((d for d in Path(root).glob("checkpoint-*")
                      if d.is_dir() and checkpoint_step(d) is not None), key=checkpoint_step)
    marked = [d for d in folders if (d / CHECKPOINT_COMPLETE).is_file()]
    if marked or not folders:
        return marked
    return [d for d in folders if _legacy_complete(d)]


def resume_checkpoint(root: Path, *, remove_incomplete: bool = True) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` (None: start from scratch), and the
    names of the incomplete ``checkpoint-N`` folders, which are removed
    (``remove_incomplete``): a save cut short by a kill or a full disk; they hold no state
    to resume from and would otherwise be picked up by transformers' rotation."""
    import shutil

    root = Path(root)
    complete = complete_checkpoints(root)
    incomplete = [d for d in root.glob("checkpoint-*")
                  if d.is_dir() and checkpoint_step(d) is not None and d not in complete]
    if remove_incomplete:
        for d in incomplete:
            shutil.rmtree(d, ignore_errors=True)
    return (complete[-1] if complete else None), sorted(d.name for d in incomplete)


def _fsync_tree(folder: Path) -> None:
    import os

    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def make_dpo_trainer_class() -> type:
    """Build the DPOTrainer subclass lazily (TRL is imported only when training)."""
    import numpy as np
    import trl
    from datasets import Dataset, concatenate_datasets
    from trl import DPOTrainer

    class CachedRefDPOTrainer(DPOTrainer):  # type: ignore[misc, valid-type]
        """DPOTrainer whose precomputed reference log-probs are cached by content hash."""

        ref_cache_hit: bool | None = None  # this trainer: True hit, False computed
        ref_cache_hits = 0
        ref_cache_misses = 0
        ref_cache_seconds = 0.0
        ref_precompute_method: str | None = None  # "realign" (reference_logps) or "trl"
        lm_head_positions: str | None = None  # "completion" or "trl-default" (see compute_loss)

        def __init__(self, *args: Any, ref_progress: Callable[[int, int], None] | None = None,
                     checkpoint_hooks: list[Callable[[Path, int], None]] | None = None,
                     **kwargs: Any) -> None:
            self.ref_progress = ref_progress  # (done, total) pairs during a precompute
            # called as hook(folder, step) inside each checkpoint save, before the marker
            self.checkpoint_hooks = list(checkpoint_hooks or [])
            super().__init__(*args, **kwargs)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            """transformers' checkpoint, then the hooks, then (flushed) the completion
            marker; older checkpoints are rotated out only after that, and only complete
            ones count towards ``save_total_limit``."""
            import shutil

            limit = self.args.save_total_limit
            self.args.save_total_limit = None  # rotate below, once this one is complete
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            if not self.args.should_save:
                return
            step = self.state.global_step
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{step}"
            for hook in self.checkpoint_hooks:
                hook(folder, step)
            _fsync_tree(folder)
            write_json_atomic(folder / CHECKPOINT_COMPLETE, {
                "step": step, "files": sorted(str(f.relative_to(folder)) for f in folder.rglob("*")
                                              if f.is_file())})
            if limit is not None and limit > 0:
                for old in complete_checkpoints(folder.parent)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            """TRL's loss, with the LM head applied only at completion positions on CPU
            (:func:`completion_only_lm_head`); same loss, metrics and gradients."""
            with completion_only_lm_head(self.accelerator.device) as compact:
                self.lm_head_positions = "completion" if compact else "trl-default"
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def ref_cache_key(self, dataset: Any) -> str:
            parts = [
                str(self._precompute_model_hash),
                _dataset_digest(dataset, ["prompt_ids", "chosen_ids", "rejected_ids"]),
                str(self.args.max_length), str(self.args.truncation_mode),
                str(getattr(self.args, "ld_alpha", None)),
                # the precompute runs under the trainer's autocast: bf16 log-probs are not
                # the float32 ones (a float32 model trained under TRL's default bf16 before)
                f"mixed_precision={self.accelerator.mixed_precision}",
                trl.__version__,
            ]
            return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            import time

            if len(dataset) == 0:  # TRL dropped every pair whose prompt fills max_length
                from ..errors import InputError

                raise InputError(
                    f"no training pair is left: every prompt (with the chat template) fills "
                    f"max_length={self.args.max_length} tokens, so TRL drops it; raise "
                    "dpo.max_length", field="dpo.max_length")
            key = self.ref_cache_key(dataset)
            path = ref_cache_dir() / f"{key}.npz"
            if path.exists():
                with np.load(path) as z:
                    cols = {"ref_chosen_logps": z["ref_chosen_logps"].tolist(),
                            "ref_rejected_logps": z["ref_rejected_logps"].tolist()}
                if len(cols["ref_chosen_logps"]) == len(dataset):
                    type(self).ref_cache_hits += 1
                    self.ref_cache_hit = True
                    self.ref_cache_path = path
                    return concatenate_datasets([dataset, Dataset.from_dict(cols)], axis=1)
            t0 = time.perf_counter()
            model = self.ref_model or self.model
            if (self.accelerator.num_processes == 1 and not self.is_deepspeed_enabled
                    and not self.is_fsdp_enabled and self.ld_alpha is None
                    and fast_reference_supported(model)):
                out = self._sorted_ref_logps(model, dataset, batch_size)
                self.ref_precompute_method = "realign"
            else:
                import os

                # TRL's loop draws its own tqdm bar on stderr (realign shows its progress)
                was = os.environ.get("TQDM_DISABLE")
                os.environ["TQDM_DISABLE"] = "1"
                try:
                    with completion_only_lm_head(self.accelerator.device):
                        out = super()._precompute_ref_logps(dataset, name, batch_size)
                finally:
                    if was is None:
                        os.environ.pop("TQDM_DISABLE", None)
                    else:
                        os.environ["TQDM_DISABLE"] = was
                self.ref_precompute_method = "trl"
            self.ref_cache_seconds = time.perf_counter() - t0
            type(self).ref_cache_misses += 1
            self.ref_cache_hit = False
            if self.accelerator.is_main_process:
                with atomic_path(path, suffix=".npz") as tmp:
                    np.savez(tmp, ref_chosen_logps=np.asarray(out["ref_chosen_logps"]),
                             ref_rejected_logps=np.asarray(out["ref_rejected_logps"]))
            self.ref_cache_path = path
            return out

        def _sorted_ref_logps(self, model: Any, dataset: Any, batch_size: int) -> Any:
            """Reference log-probs of every pair by :func:`reference_logps`, in batches of
            similar length, through TRL's own collator (same truncation and layout)."""
            import torch

            cols = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
            lengths = [len(p) + max(len(c), len(r)) for p, c, r in
                       zip(cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"])]
            order = sorted(range(len(lengths)), key=lengths.__getitem__)
            chosen = torch.empty(len(order), dtype=torch.float32)
            rejected = torch.empty(len(order), dtype=torch.float32)
            device = next(model.parameters()).device
            was_training = model.training
            model.eval()
            try:
                for k in range(0, len(order), batch_size):
                    idx = order[k:k + batch_size]
                    batch = self.data_collator([cols[i] for i in idx])
                    batch = {key: v.to(device) for key, v in batch.items()}
                    with self.accelerator.autocast():  # as TRL's own reference forward
                        c, r = reference_logps(model, batch)
                    chosen[idx], rejected[idx] = c.cpu(), r.cpu()
                    if self.ref_progress:
                        self.ref_progress(min(k + batch_size, len(order)), len(order))
            finally:
                model.train(was_training)
            return concatenate_datasets([dataset, Dataset.from_dict(
                {"ref_chosen_logps": chosen.tolist(), "ref_rejected_logps": rejected.tolist()})], axis=1)

    return CachedRefDPOTrainer


def dpo_config(output_dir: Path, *, beta: float, loss_type: str | list[str], learning_rate: float,
               batch_size: int, gradient_accumulation_steps: int, max_steps: int,
               num_epochs: float, max_length: int, seed: int, save_every: int,
               warmup_steps: float = 0, report_to: list[str] | None = None,
               precompute_ref: bool = True, use_cpu: bool | None = None,
               bf16: bool | None = None, extra: dict[str, Any] | None = None) -> Any:
    """A ``trl.DPOConfig`` from realign's settings (``extra`` passes any other field).

    ``bf16``: bf16 mixed precision (autocast); pass :func:`mixed_precision_bf16` of the
    policy. None keeps TRL's default, which is on, on every device: with a float32 model
    (realign loads float32 on CPUs and MPS) accelerate then runs the policy's forward under
    bf16 autocast, so the policy the trainer starts from is not the float32 reference
    (step-0 KL 6.5e-4 nats/token on SmolLM2-135M with LoRA, 7.7e-4 fully fine-tuned)."""
    from trl import DPOConfig

    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir), beta=beta,
        loss_type=loss_type if isinstance(loss_type, list) else [loss_type],
        learning_rate=learning_rate, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, max_steps=max_steps,
        num_train_epochs=num_epochs, max_length=max_length, seed=seed,
        logging_steps=1, save_strategy="steps", save_steps=save_every, save_total_limit=2,
        warmup_steps=warmup_steps, report_to=report_to or "none",
        precompute_ref_log_probs=precompute_ref, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    if use_cpu is not None:
        kwargs["use_cpu"] = use_cpu
    if bf16 is not None:
        kwargs["bf16"] = bf16
    kwargs.update(extra or {})
    return DPOConfig(**kwargs)


def mixed_precision_bf16(model: Any) -> bool:
    """Whether a trainer should run ``model`` under bf16 autocast: only when its weights
    are bf16 already (realign loads bf16 on CUDA GPUs that support it,
    :func:`realign.backends.trl.pick_dtype`). A float32 model trains in float32, the
    precision its reference log-probs and the stage-3 reference distributions have."""
    import torch

    try:
        return next(model.parameters()).dtype == torch.bfloat16
    except StopIteration:  # pragma: no cover
        return False


def train_sft(handle: Any, rows: list[dict[str, Any]], *, output_dir: Path, learning_rate: float,
              max_steps: int, batch_size: int, max_length: int, seed: int,
              progress: Callable[[float, float | None, str], None] | None = None) -> Any:
    """Supervised fine-tuning with TRL's SFTTrainer on prompt/completion message rows.

    The loss is on completion tokens only (TRL's ``completion_only_loss``). Returns the
    same handle, its model trained in place.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class _Progress(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if progress:
                progress(state.global_step, state.max_steps, "SFT training")

    args = SFTConfig(output_dir=str(output_dir), learning_rate=learning_rate, max_steps=max_steps,
                     per_device_train_batch_size=batch_size, max_length=max_length, seed=seed,
                     logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                     completion_only_loss=True,
                     **({"use_cpu": True, "bf16": False} if handle.device.type == "cpu" else {}))
    trainer = SFTTrainer(model=handle.model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=handle.tokenizer, callbacks=[_Progress()])
    trainer.train()
    handle.model = trainer.model
    handle.model.eval()
    return handle
