"""The KL probe and the held-out gate sets stage 5 measures the policy on.

Stage 3 writes the probe (the first ``kl_monitor.probe_size`` held-out pairs) and what the
monitor needs from the frozen reference on it (:func:`save_reference_probe`); stage 5's
:class:`realign.kl_monitor.KLMonitor` reads both (:func:`load_reference_probe`). The probe
serves the live monitor: breach handling and checkpoint selection.

Stage 5's gates read the selected model on held-out rows the selection never saw
(:func:`gate_rows`): the held-out pairs after the probe whose prompt is not a probe prompt.

The reference statistics are stored as JSON (numbers, strings) plus safetensors (the
reference distributions), never as a pickle, and are read only from inside the run
directory (:func:`inside_run_dir`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from .errors import InputError
from .fileio import atomic_path, read_jsonl, write_json_atomic


def probe_rows(heldout: str | Path | None, probe_size: int) -> list[dict[str, Any]]:
    """The first ``probe_size`` rows of stage 2's ``heldout.jsonl``."""
    if not heldout:
        raise RuntimeError("stage 2 (preference_data) has no held-out split; run it first")
    return read_jsonl(Path(heldout))[:probe_size]


def prompt_key(prompt: Any) -> str:
    """A prompt (text or a message list) as a comparable string."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def gate_rows(heldout: list[dict[str, Any]], probe: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The held-out rows stage 5's gates are measured on: those after the probe (the
    first ``len(probe)`` rows) whose prompt is not one of the probe's prompts, in file
    order. Disjoint from the probe by row and by prompt, so nothing the checkpoint was
    selected on is measured again."""
    seen = {prompt_key(r["prompt"]) for r in probe}
    return [r for r in heldout[len(probe):] if prompt_key(r["prompt"]) not in seen]


def gate_prompts(heldout_rest: list[dict[str, Any]], heldout_prompts: list[Any],
                 probe: list[dict[str, Any]], n: int) -> list[Any]:
    """Stage 5's KL-gate prompts: the first ``n`` distinct prompts of the held-out pairs
    outside the probe (:func:`gate_rows`), then, in generation mode, held-out prompts that
    gave no pair (``heldout_prompts``, stage 2's ``heldout_prompts.jsonl``), never a probe
    prompt. The sampled KL needs prompts only: a prompt whose samples all scored the same
    still measures how far the policy moved."""
    seen = {prompt_key(r["prompt"]) for r in probe}
    rows = list(heldout_rest) + [{"prompt": p} for p in heldout_prompts
                                 if prompt_key(p) not in seen]
    return distinct_prompts(rows, n)


def distinct_prompts(rows: list[dict[str, Any]], n: int) -> list[Any]:
    """The first ``n`` distinct prompts of ``rows``, in order."""
    out: list[Any] = []
    seen: set[str] = set()
    for r in rows:
        k = prompt_key(r["prompt"])
        if k not in seen:
            seen.add(k)
            out.append(r["prompt"])
            if len(out) == n:
                break
    return out


#: Cache the reference's full next-token distributions on the probe when they fit in this
#: many bytes (tokens × vocabulary × 4); otherwise stage 5 runs the reference at each check.
REF_DIST_MAX_BYTES = 512 << 20
#: The length-exploitation probe: greedy answers to this many probe prompts, capped.
LENGTH_PROBE_PROMPTS = 4
LENGTH_PROBE_TOKENS = 48
#: The format tag of ``reference_probe.json``.
REFERENCE_PROBE_FORMAT = "realign-reference-probe/1"


def reference_probe_stats(backend, ref, probe: list[dict], *, max_length: int,  # type: ignore[no-untyped-def]
                          batch_size: int) -> dict[str, Any]:
    """Everything stage 5 needs from the frozen reference on the probe, computed once:
    log π_ref of each chosen and rejected response (for held-out margins), the full
    next-token log-distributions on the chosen responses (for exact KL without a
    reference forward pass per check, when they fit :data:`REF_DIST_MAX_BYTES`), and the
    reference's greedy answers to the first probe prompts (for the length detector)."""
    from .backends.encoding import encode_pair

    if getattr(backend, "name", "trl") == "mlx":
        from .backends.mlx import reference_distributions
    else:
        from .backends.trl import reference_distributions
    tok = ref.tokenizer
    chosen = [encode_pair(tok, r["prompt"], r["chosen"], max_length) for r in probe]
    rejected = [encode_pair(tok, r["prompt"], r["rejected"], max_length) for r in probe]
    data: dict[str, Any] = {
        "max_length": max_length,
        "ref_chosen": backend.completion_logprobs(ref, [], [], encoded=chosen, batch_size=batch_size).sums,
        "ref_rejected": backend.completion_logprobs(ref, [], [], encoded=rejected, batch_size=batch_size).sums,
        "answers": backend.generate(ref, [r["prompt"] for r in probe[:LENGTH_PROBE_PROMPTS]],
                                    max_new_tokens=LENGTH_PROBE_TOKENS),
        "distributions": None,
    }
    cfg = getattr(ref.model, "config", None) or getattr(ref, "config", None) or {}
    vocab = int((cfg.get("vocab_size") if isinstance(cfg, dict) else getattr(cfg, "vocab_size", 0)) or 0)
    if 0 < sum(e.n_completion for e in chosen) * vocab * 4 <= REF_DIST_MAX_BYTES:
        data["distributions"] = reference_distributions(ref, chosen, batch_size=batch_size).logps
    return data


def save_reference_probe(backend, ref, probe: list[dict], path: Path, *, max_length: int,  # type: ignore[no-untyped-def]
                         batch_size: int) -> Path:
    """Compute :func:`reference_probe_stats` and write them: ``path`` (``.json``: the
    numbers and answers) and, when the distributions were kept, ``path`` with suffix
    ``.safetensors`` (one tensor ``d<i>`` per probe pair, T_i × V float32), the JSON
    naming that file and its sha256. Both written atomically, the tensors first.
    Returns ``path``."""
    return write_reference_probe(reference_probe_stats(backend, ref, probe, max_length=max_length,
                                                       batch_size=batch_size), path)


def write_reference_probe(data: dict[str, Any], path: Path) -> Path:
    """Write what :func:`reference_probe_stats` returns (see :func:`save_reference_probe`).
    The distributions may be torch tensors or MLX / NumPy arrays (the file is the same
    safetensors format either way)."""

    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"the reference probe is written as .json, not {path.name}")
    record: dict[str, Any] = {
        "format": REFERENCE_PROBE_FORMAT, "max_length": int(data["max_length"]),
        "ref_chosen": [float(x) for x in data["ref_chosen"]],
        "ref_rejected": [float(x) for x in data["ref_rejected"]],
        "answers": [str(a) for a in data["answers"]],
        "distributions": None,
    }
    dists = data.get("distributions")
    if dists is not None:
        tensors = path.with_suffix(".safetensors")
        with atomic_path(tensors, suffix=".safetensors") as tmp:
            if all(hasattr(t, "contiguous") for t in dists):  # torch
                from safetensors.torch import save_file

                save_file({f"d{i}": t.contiguous() for i, t in enumerate(dists)}, str(tmp))
            else:
                import numpy as np
                from safetensors.numpy import save_file as save_np

                save_np({f"d{i}": np.ascontiguousarray(np.asarray(t, dtype=np.float32))
                         for i, t in enumerate(dists)}, str(tmp))
        record["distributions"] = {"file": tensors.name, "count": len(dists),
                                   "sha256": _sha256(tensors)}
    write_json_atomic(path, record)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inside_run_dir(path: str | Path, run_dir: str | Path, *, what: str) -> Path:
    """``path`` resolved (relative paths against ``run_dir``, symlinks followed); an
    :class:`InputError` naming ``what`` unless it lies inside ``run_dir``."""
    root = Path(run_dir).resolve()
    p = Path(path)
    resolved = (p if p.is_absolute() else root / p).resolve()
    if not resolved.is_relative_to(root):
        raise InputError(f"{what}: {path} resolves to {resolved}, outside the run directory "
                         f"{root}; realign reads run files only from inside their run directory",
                         file=str(path))
    return resolved


def _bad(path: Path, why: str) -> InputError:
    return InputError(f"reference probe refused: {why}. Rerun stage 3 "
                      "(`realign stage reference_init --run RUN_DIR`) to rewrite it", file=str(path))


def load_reference_probe(path: str | Path, run_dir: str | Path, *,
                         missing_ok: bool = False, framework: str = "pt") -> dict[str, Any] | None:
    """Read what :func:`save_reference_probe` wrote, from inside ``run_dir`` only
    (``missing_ok``: None when the file does not exist, so the caller recomputes it).

    Only realign's own format is read: a ``.json`` record (``format`` =
    :data:`REFERENCE_PROBE_FORMAT`, every field type-checked) and the ``.safetensors``
    file it names beside it, whose sha256 must match. Anything else (a pickle such as an
    old ``reference_probe.pt``, a path or a symlink leading out of the run directory, a
    tensor file that is not the one recorded) is refused with an :class:`InputError`;
    nothing is unpickled. ``framework``: the distributions as torch tensors (``pt``) or
    NumPy arrays (``numpy``, for the MLX backend).
    """
    p = inside_run_dir(path, run_dir, what="stage 3's reference_probe")
    if missing_ok and not p.exists():
        return None
    if p.suffix != ".json":
        raise _bad(p, f"{p.name} is not realign's JSON + safetensors format (pickles are never loaded)")
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(p, f"not readable JSON ({exc})") from None
    if not isinstance(rec, dict) or rec.get("format") != REFERENCE_PROBE_FORMAT:
        raise _bad(p, f"not a {REFERENCE_PROBE_FORMAT} record")

    def numbers(key: str) -> list[float]:
        v = rec.get(key)
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               and math.isfinite(x) for x in v):
            raise _bad(p, f"'{key}' is not a list of finite numbers")
        return [float(x) for x in v]

    ref_c, ref_r = numbers("ref_chosen"), numbers("ref_rejected")
    answers = rec.get("answers")
    max_length = rec.get("max_length")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise _bad(p, "'answers' is not a list of strings")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or len(ref_c) != len(ref_r):
        raise _bad(p, "'max_length' or the log-prob lists are malformed")
    out: dict[str, Any] = {"max_length": max_length, "ref_chosen": ref_c, "ref_rejected": ref_r,
                           "answers": answers, "distributions": None}
    dist = rec.get("distributions")
    if dist is not None:
        if not isinstance(dist, dict) or not isinstance(dist.get("file"), str) \
                or not isinstance(dist.get("count"), int) or not isinstance(dist.get("sha256"), str):
            raise _bad(p, "'distributions' is malformed")
        name = dist["file"]
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise _bad(p, f"'distributions.file' must be a .safetensors file beside it, got {name!r}")
        t = inside_run_dir(p.parent / name, run_dir, what="stage 3's reference distributions")
        if not t.is_file() or _sha256(t) != dist["sha256"]:
            raise _bad(p, f"{name} is missing or is not the file the record names (sha256)")
        if framework == "numpy":  # the MLX backend (no torch needed)
            from safetensors.numpy import load_file
        else:
            from safetensors.torch import load_file  # type: ignore[no-redef]

        tensors = load_file(str(t))
        if sorted(tensors) != sorted(f"d{i}" for i in range(dist["count"])) or dist["count"] != len(ref_c):
            raise _bad(p, f"{name} does not hold one distribution per probe pair")
        out["distributions"] = [tensors[f"d{i}"] for i in range(dist["count"])]
    return out
