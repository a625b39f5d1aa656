"""An exponential moving average of the trainable weights that stays sharded under ZeRO-3.

Each rank averages its own partition of the fp32 master weights (DeepSpeed's flat optimizer groups): no
gather, EMA memory per rank = 4 bytes x trainable parameters / world size. Each rank saves its partition
beside its DeepSpeed shards (`ema/rank-NNNNN.pt`, with the parameter layout); a resume on another world size
reads every saved partition (memory-mapped) and re-partitions each parameter exactly. `applied()` puts the
average into the weights the forward reads, for validation and samples, and the trained weights back after.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from .safe_load import load_data

FOLDER = "ema"


def ema_decay(decay: float, half_life_steps: float) -> float:
    """The per-step decay from either setting (a half-life in steps wins when given); 0: no EMA."""
    if half_life_steps > 0:
        return 0.5 ** (1.0 / half_life_steps)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {decay}")
    return decay


class ShardedEMA:
    def __init__(self, engine, decay: float, start_step: int = 0, warmup: bool = True):
        optimizer = engine.optimizer
        if not hasattr(optimizer, "fp32_partitioned_groups_flat"):
            raise ValueError("an EMA (ema_decay / ema_half_life_steps) needs ZeRO stage 3 (deepspeed_config zero3 or "
                             "zero3_offload), whose partitions each rank averages on its own")
        self.optimizer, self.decay, self.start_step, self.warmup = optimizer, decay, start_step, warmup
        names = {id(p): name for name, p in engine.module.named_parameters()}
        # per flat group: (name, numel, partition numel) in the group's order
        self.layout = [[(names[id(p)], p.ds_numel, p.ds_tensor.ds_numel) for p in group]
                       for group in optimizer.fp16_groups]
        self.shadow = [m.detach().float().clone() for m in self.masters]

    # looked up each time: loading a checkpoint may replace the optimizer's tensors
    @property
    def masters(self) -> list[torch.Tensor]:
        """What the optimizer updates."""
        return self.optimizer.fp32_partitioned_groups_flat

    @property
    def weights(self) -> list[torch.Tensor]:
        """What forwards gather (the masters themselves in fp32, unless a load made copies)."""
        return self.optimizer.fp16_partitioned_groups_flat

    @property
    def bytes_per_rank(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.shadow)

    def decay_at(self, step: int) -> float:
        """Decay for the update after `step` (1-based); up to 1 + ema_start it copies the weights."""
        updates = step - self.start_step
        if updates <= 0:
            return 0.0
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def reset(self) -> None:
        """The average restarts from the current weights."""
        for shadow, master in zip(self.shadow, self.masters):
            shadow.copy_(master)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After the optimizer step `step`."""
        torch._foreach_lerp_(self.shadow, [m.float() for m in self.masters], 1.0 - self.decay_at(step))

    @contextmanager
    def applied(self):
        """The average in the weights forwards read (a collective: every rank)."""
        kept = [w.detach().clone() for w in self.weights]
        self._write(self.shadow)
        try:
            yield
        finally:
            self._write(kept)

    @torch.no_grad()
    def _write(self, values: list[torch.Tensor]) -> None:
        for weight, value in zip(self.weights, values):
            weight.copy_(value)
        # ZeRO-3 keeps some parameters gathered between forwards (persistent ones, reuse): drop every gathered
        # copy, so that the next forward gathers what the partitions now hold
        self.optimizer.empty_partition_cache()

    def save(self, folder: Path, rank: int) -> None:
        target = Path(folder) / FOLDER
        target.mkdir(parents=True, exist_ok=True)
        torch.save({"layout": self.layout, "groups": [s.cpu() for s in self.shadow]}, target / f"rank-{rank:05d}.pt")

    @torch.no_grad()
    def load(self, folder: Path, rank: int, world_size: int) -> None:
        saved = EMAReader(folder)
        for shadow, group in zip(self.shadow, self.layout):
            offset = 0
            for name, numel, part in group:
                lo, hi = rank * part, min((rank + 1) * part, numel)
                if hi > lo:
                    shadow[offset : offset + hi - lo].copy_(saved.read(name, lo, hi))
                shadow[offset + max(hi - lo, 0) : offset + part].zero_()
                offset += part


class EMAReader:
    """The EMA saved in a checkpoint folder, read per parameter from every rank's partition (memory-mapped)."""

    def __init__(self, folder: str | Path):
        files = sorted((Path(folder) / FOLDER).glob("rank-*.pt"))
        if not files:
            raise ValueError(f"{folder}: no EMA in this checkpoint (the run had no ema_decay / ema_half_life_steps)")
        self.folder, self.world_size = Path(folder), len(files)
        self._ranks = [load_data(f, map_location="cpu", mmap=True) for f in files]
        self._where: dict[str, tuple[int, int, int, int]] = {}  # name -> (group, offset, numel, partition)
        for g, group in enumerate(self._ranks[0]["layout"]):
            offset = 0
            for name, numel, part in group:
                self._where[name] = (g, offset, numel, part)
                offset += part

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Flat elements [start, end) of a parameter's average."""
        if name not in self._where:
            raise KeyError(f"{self.folder}: no EMA of {name!r}")
        g, offset, numel, part = self._where[name]
        end = numel if end is None else min(end, numel)
        chunks = []
        for rank in range(start // part, math.ceil(end / part)):
            lo, hi = max(start, rank * part) - rank * part, min(end, (rank + 1) * part) - rank * part
            chunks.append(self._ranks[rank]["groups"][g][offset + lo : offset + hi])
        return torch.cat(chunks) if chunks else torch.empty(0)

    def numel(self, name: str) -> int:
        return self._where[name][2]
