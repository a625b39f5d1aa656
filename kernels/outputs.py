"""Output buffers for the kernels' launches, shared so that tests can poison them all in one place."""

from __future__ import annotations

import torch

POISON = False  # tests: fill outputs with NaN before the kernels run, so unwritten elements show


def new_output(like: torch.Tensor, shape=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor on like's device, with like's shape and dtype unless given (NaN if POISON)."""
    shape = like.shape if shape is None else shape
    dtype = like.dtype if dtype is None else dtype
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)
