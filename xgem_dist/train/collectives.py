"""Every collective the training loop itself makes, in one place.

Tensors handed to a collective live on the engine's device: NCCL has no CPU path, so a CPU tensor
in an all_reduce stops a GPU run at its first step. The loop passes Python numbers and tensors it
computed; this class puts them on `device` and checks it, so a test can watch one object.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd


class Collectives:
    def __init__(self, device: torch.device | str, world_size: int | None = None):
        self.device = torch.device(device)
        self.world_size = world_size if world_size is not None else (
            dist.get_world_size() if dist.is_initialized() else 1)

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device != self.device:
            raise RuntimeError(f"a collective got a tensor on {tensor.device}; the engine's device is {self.device}")
        return tensor

    def sum(self, value: float | torch.Tensor) -> torch.Tensor:
        """The sum over ranks (float64 for Python numbers, so counts and losses add exactly)."""
        tensor = (value.detach().clone() if torch.is_tensor(value)
                  else torch.tensor(float(value), dtype=torch.float64, device=self.device))
        if self.world_size > 1:
            dist.all_reduce(self._on_device(tensor), op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (so all ranks take the same branch)."""
        tensor = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(self._on_device(tensor), op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, in rank order, with gradients flowing back to each rank's own rows (every rank
        must pass the same number of rows)."""
        if self.world_size == 1:
            return tensor
        return torch.cat(dist_autograd.all_gather(self._on_device(tensor.contiguous())))

    def gather_objects(self, obj) -> list:
        """Every rank's picklable object, in rank order (the NCCL path stages through the current CUDA device)."""
        if self.world_size == 1:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered
