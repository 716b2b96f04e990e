"""The KL probe: the fixed held-out pairs stage 5 (and stage 6) measure the policy on.

Stage 3 writes the probe (the first ``kl_monitor.probe_size`` held-out pairs) and what the
monitor needs from the frozen reference on it (:func:`save_reference_probe`); stage 5's
:class:`realign.kl_monitor.KLMonitor` reads both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .fileio import atomic_path, read_jsonl


def probe_rows(heldout: str | Path | None, probe_size: int) -> list[dict[str, Any]]:
    """The first ``probe_size`` rows of stage 2's ``heldout.jsonl``."""
    if not heldout:
        raise RuntimeError("stage 2 (preference_data) has no held-out split; run it first")
    return read_jsonl(Path(heldout))[:probe_size]


#: Cache the reference's full next-token distributions on the probe when they fit in this
#: many bytes (tokens × vocabulary × 4); otherwise stage 5 runs the reference at each check.
REF_DIST_MAX_BYTES = 512 << 20
#: The length-exploitation probe: greedy answers to this many probe prompts, capped.
LENGTH_PROBE_PROMPTS = 4
LENGTH_PROBE_TOKENS = 48


def save_reference_probe(backend, ref, probe: list[dict], path: Path, *, max_length: int,  # type: ignore[no-untyped-def]
                         batch_size: int) -> None:
    """Everything stage 5 needs from the frozen reference on the probe, computed once:
    log π_ref of each chosen and rejected response (for held-out margins), the full
    next-token log-distributions on the chosen responses (for exact KL without a
    reference forward pass per check, when they fit :data:`REF_DIST_MAX_BYTES`), and the
    reference's greedy answers to the first probe prompts (for the length detector).
    Written atomically with ``torch.save``.
    """
    import torch

    from .backends.trl import encode_pair, reference_distributions

    tok = ref.tokenizer
    chosen = [encode_pair(tok, r["prompt"], r["chosen"], max_length) for r in probe]
    rejected = [encode_pair(tok, r["prompt"], r["rejected"], max_length) for r in probe]
    data = {
        "max_length": max_length,
        "ref_chosen": backend.completion_logprobs(ref, [], [], encoded=chosen, batch_size=batch_size).sums,
        "ref_rejected": backend.completion_logprobs(ref, [], [], encoded=rejected, batch_size=batch_size).sums,
        "answers": backend.generate(ref, [r["prompt"] for r in probe[:LENGTH_PROBE_PROMPTS]],
                                    max_new_tokens=LENGTH_PROBE_TOKENS),
        "distributions": None,
    }
    vocab = int(getattr(ref.model.config, "vocab_size", 0) or 0)
    if 0 < sum(e.n_completion for e in chosen) * vocab * 4 <= REF_DIST_MAX_BYTES:
        data["distributions"] = reference_distributions(ref, chosen, batch_size=batch_size).logps
    with atomic_path(path) as tmp:
        torch.save(data, tmp)




def load_reference_probe(path: str | Path) -> dict[str, Any]:
    """Read what :func:`save_reference_probe` wrote."""
    import torch

    return torch.load(path, weights_only=False)  # type: ignore[no-any-return]
