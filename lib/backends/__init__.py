"""Training-framework backends behind one protocol (:mod:`realign.backends.base`).

``get_backend("trl")`` imports the PyTorch backend lazily and ``get_backend("mlx")`` the
MLX one, so importing ``realign.backends`` needs neither torch nor mlx.
"""

from __future__ import annotations

import platform
import sys
from importlib.util import find_spec
from typing import Any

from .base import Backend, DPOSettings, KLResult, LogProbs

__all__ = ["BACKENDS", "BACKEND_STAGES", "Backend", "DPOSettings", "KLResult", "LogProbs", "backend_record",
           "default_backend_name", "get_backend", "mlx_installed", "resolve_backend_name"]

#: Backend names ``get_backend`` accepts ("auto": :func:`default_backend_name`).
BACKENDS = ("trl", "mlx", "auto")


def mlx_installed() -> bool:
    """True when both ``mlx`` and ``mlx_lm`` can be imported (nothing is imported here)."""
    try:
        return find_spec("mlx") is not None and find_spec("mlx_lm") is not None
    except (ImportError, ValueError):
        return False


def default_backend_name() -> str:
    """``"mlx"`` on Apple Silicon (macOS on arm64) when mlx and mlx-lm are installed,
    else ``"trl"``. (mlx also runs on Linux CPUs, where the PyTorch backend stays the
    default: MLX is chosen automatically only where it is the native framework.)"""
    if sys.platform == "darwin" and platform.machine() == "arm64" and mlx_installed():
        return "mlx"
    return "trl"


def resolve_backend_name(name: str | None) -> str:
    """``"trl"`` or ``"mlx"`` for a config's ``backend`` (``auto``/None:
    :func:`default_backend_name`; ``torch``/``pytorch``: ``trl``)."""
    if name in (None, "auto"):
        return default_backend_name()
    if name in ("trl", "torch", "pytorch"):
        return "trl"
    if name == "mlx":
        return "mlx"
    from ..errors import InputError

    raise InputError(f"unknown backend {name!r}: expected 'trl', 'mlx' or 'auto'", field="backend")


#: The stages that run on the config's ``backend`` (the others always run on PyTorch).
BACKEND_STAGES = ("sft_baseline", "reference_init", "dpo", "iterative")

#: The packages whose versions a verdict records for each backend (``findings["backend"]``).
BACKEND_PACKAGES = {"trl": ("torch", "transformers", "trl", "peft"),
                    "mlx": ("mlx", "mlx-lm", "transformers")}


def backend_record(name: str) -> dict[str, Any]:
    """``{"name": name, "versions": {package: version}}`` for a verdict's findings: the
    installed versions of the backend's packages (None for one not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for pkg in BACKEND_PACKAGES.get(name, ()):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"name": name, "versions": versions}


def get_backend(name: str = "trl") -> Any:
    """An instance of the named backend: ``"trl"`` (PyTorch: transformers + TRL + PEFT),
    ``"mlx"`` (mlx + mlx-lm) or ``"auto"`` (:func:`default_backend_name`). A backend
    whose packages are missing raises ``MissingDependencyError`` with the install command."""
    name = resolve_backend_name(name)
    if name == "trl":
        from .trl import TRLBackend

        return TRLBackend()
    from .mlx import MLXBackend  # raises MissingDependencyError without mlx / mlx-lm

    return MLXBackend()
