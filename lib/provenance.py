"""What a record needs to be reproduced: package versions and the machine it ran on."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

#: Packages whose versions a run records (those absent are left out).
RUN_PACKAGES = ("realign", "torch", "transformers", "trl", "peft", "accelerate", "datasets",
                "pyarrow", "lm_eval", "mlx", "mlx_lm")


def package_versions(packages: tuple[str, ...] = RUN_PACKAGES, *,
                     python: bool = True) -> dict[str, str]:
    """``{package: version}`` of the installed ``packages`` (and ``python`` first)."""
    out = {"python": sys.version.split()[0]} if python else {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def hardware_summary() -> dict[str, Any]:
    """Platform, CPU count and, when torch is installed, CUDA/MPS devices and threads."""
    hw: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                          "cpu_count": os.cpu_count()}
    try:
        import torch
    except ImportError:
        return hw
    hw["cuda"] = torch.cuda.is_available()
    if hw["cuda"]:
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    hw["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    hw["torch_threads"] = torch.get_num_threads()
    return hw
