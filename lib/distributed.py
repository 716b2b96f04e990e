"""Which process this is under a multi-process launch (accelerate, torchrun).

Single process: rank 0 of 1, and :func:`barrier` does nothing. Under a launch every rank
runs the stages (DDP needs them all); rank 0 alone writes records.
"""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a multi-process launch."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Number of processes in the launch (``WORLD_SIZE``, at least 1)."""
    return max(int(os.environ.get("WORLD_SIZE", "1")), 1)


def barrier() -> None:
    """Wait for every rank (no-op in a single process).

    A bare ``PartialState()`` on a machine without CUDA comes up as a single process
    (``DistributedType.NO``) even under ``accelerate launch --cpu``, and its
    ``wait_for_everyone`` then returns at once: ranks raced past rank 0's writes. So the
    group is joined for the device there is (``cpu=True`` without CUDA: gloo), or the
    already initialized group is used directly.
    """
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()
