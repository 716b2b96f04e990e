"""Training-framework backends behind one protocol (:mod:`realign.backends.base`).

``get_backend("trl")`` imports the PyTorch backend lazily, so importing
``realign.backends`` never needs torch.
"""

from __future__ import annotations

from typing import Any

from .base import Backend, DPOSettings, KLResult, LogProbs

__all__ = ["Backend", "DPOSettings", "KLResult", "LogProbs", "get_backend"]


def get_backend(name: str = "trl") -> Any:
    """An instance of the named backend: ``"trl"`` (PyTorch). ``"mlx"`` is not built yet."""
    if name in ("trl", "torch", "pytorch"):
        from .trl import TRLBackend

        return TRLBackend()
    if name == "mlx":
        from ..errors import MissingDependencyError

        raise MissingDependencyError("the MLX backend is not built yet; use backend 'trl'")
    from ..errors import InputError

    raise InputError(f"unknown backend {name!r}: expected 'trl'", field="backend")
