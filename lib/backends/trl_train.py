"""Training through TRL: SFT (``SFTTrainer``) and DPO (``DPOTrainer``) with a
content-addressed reference log-prob cache.

The cache: TRL's ``precompute_ref_log_probs`` computes log π_ref(chosen) and
log π_ref(rejected) for every training pair once, before training, instead of a
reference forward pass every step. :class:`CachedRefDPOTrainer` stores that result under
``$REALIGN_HOME/cache/ref_logps/<key>.npz`` where

    key = sha256(reference weights hash, tokenized dataset (prompt/chosen/rejected ids),
                 ld_alpha, trl version)

so a rerun, a resumed run or a later iteration against the same reference and data
skips the precompute entirely. The weights hash is TRL's own ``hash_module`` of the
reference (computed by TRL whenever precompute is on); the token ids cover the chat
template, truncation and max-length settings.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models import realign_home


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

        def ref_cache_key(self, dataset: Any) -> str:
            parts = [
                str(self._precompute_model_hash),
                _dataset_digest(dataset, ["prompt_ids", "chosen_ids", "rejected_ids"]),
                str(getattr(self.args, "ld_alpha", None)),
                trl.__version__,
            ]
            return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            import time

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
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.ref_cache_seconds = time.perf_counter() - t0
            type(self).ref_cache_misses += 1
            self.ref_cache_hit = False
            if self.accelerator.is_main_process:
                fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npz", dir=path.parent)
                os.close(fd)
                np.savez(tmp, ref_chosen_logps=np.asarray(out["ref_chosen_logps"]),
                         ref_rejected_logps=np.asarray(out["ref_rejected_logps"]))
                os.replace(tmp, path)
            self.ref_cache_path = path
            return out

    return CachedRefDPOTrainer


def dpo_config(output_dir: Path, *, beta: float, loss_type: str | list[str], learning_rate: float,
               batch_size: int, gradient_accumulation_steps: int, max_steps: int,
               num_epochs: float, max_length: int, seed: int, save_every: int,
               warmup_steps: float = 0, report_to: list[str] | None = None,
               precompute_ref: bool = True, use_cpu: bool | None = None,
               extra: dict[str, Any] | None = None) -> Any:
    """A ``trl.DPOConfig`` from realign's settings (``extra`` passes any other field)."""
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
    kwargs.update(extra or {})
    return DPOConfig(**kwargs)


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
