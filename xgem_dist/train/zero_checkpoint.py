"""Read single parameters out of a DeepSpeed ZeRO checkpoint without loading it whole.

The rank files are opened with torch.load(mmap=True) as data only (safe_load): a parameter's bytes are
read only when its slice is taken, so host memory stays at the size of what one asks for. Layout (ZeRO-3, as DeepSpeed's
zero_to_fp32 reads it): a parameter of n elements is split over W ranks in partitions of
p = ceil(n / W) elements (the last one zero padded). Trainable parameters live in each rank's fp32
optimizer partitions (`fp32_flat_groups`, parameters in `param_shapes` order, each taking p elements
of every rank's flat stream); frozen ones in each rank's `frozen_param_fragments[name]` (p elements).
ZeRO-1/2 keep frozen parameters whole (one model file for all ranks) and split each group's fp32 master
weights into one contiguous partition per rank (`single_partition_of_fp32_groups`); `param_slice_mappings`
says where each parameter's fragment lies in a rank's partition.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .checkpoint import LATEST, STATE
from .safe_load import load_data


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    if match is None:
        raise ValueError(f"{path}: not a DeepSpeed ZeRO rank file")
    return int(match.group(1))


def _mapped(path: Path) -> dict:
    return load_data(path, map_location="cpu", mmap=True)


def newest_checkpoint(src: str | Path) -> Path:
    """A checkpoint folder (holds xgem_state.json and DeepSpeed's `latest`) from itself, a local run
    dir (checkpoints/latest_checkpoint), or any folder above complete checkpoints (a Ray storage
    folder: the one with the highest step)."""
    src = Path(src)
    if (src / STATE).exists() and (src / "latest").exists():
        return src
    pointer = src / "checkpoints" / LATEST
    if pointer.exists():
        return src / "checkpoints" / pointer.read_text().strip()
    found = [p.parent for p in src.rglob(STATE) if (p.parent / "latest").exists() and
             not p.parent.name.endswith(".partial")]
    if not found:
        raise ValueError(f"{src}: no complete checkpoint (a folder with {STATE} and DeepSpeed's 'latest') in it")
    return max(found, key=lambda p: (json.loads((p / STATE).read_text())["step"], str(p)))


class ZeroCheckpoint:
    """The parameters of one DeepSpeed checkpoint folder, by name (as engine.module names them)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        tag_dir = folder / (folder / "latest").read_text().strip()
        # ZeRO-3 writes a model file per rank, ZeRO-1/2 one for all; every stage an optimizer file per rank
        model_files = (sorted(tag_dir.glob("*zero_pp_rank_*_model_states.pt"), key=_rank_of)
                       or sorted(tag_dir.glob("mp_rank_00_model_states.pt")))
        optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=_rank_of)
        if not model_files or not optim_files or len(model_files) not in (1, len(optim_files)):
            raise ValueError(f"{tag_dir}: expected the model states (one file per rank, or one for all) and one "
                             f"*_optim_states.pt per rank, found {len(model_files)} and {len(optim_files)}")
        self.folder, self.world_size = tag_dir, len(optim_files)
        self._models = [_mapped(f) for f in model_files]
        optim = [_mapped(f)["optimizer_state_dict"] for f in optim_files]
        self.stage = optim[0]["zero_stage"]
        first = self._models[0]
        self.frozen_shapes: dict[str, torch.Size] = dict(first.get("frozen_param_shapes") or {})
        self.trainable_shapes: dict[str, torch.Size] = {
            k: v for group in first["param_shapes"] for k, v in group.items()}
        self._flat: list[list[torch.Tensor]] = []
        self._offsets: dict[str, int] = {}
        # ZeRO-1/2: each rank's fp32 partition of each group, and where each parameter's fragment lies in it
        self._fragments: list[tuple[list[torch.Tensor], list[dict]]] = (
            [(list(o["single_partition_of_fp32_groups"]), list(o["param_slice_mappings"])) for o in optim]
            if self.stage < 3 else [])
        if self.trainable_shapes and self.stage == 3:
            self._flat = [list(o["fp32_flat_groups"]) for o in optim]
            offset = 0
            for name, shape in self.trainable_shapes.items():
                self._offsets[name] = offset
                offset += math.ceil(shape.numel() / self.world_size)

    def __contains__(self, name: str) -> bool:
        return name in self.trainable_shapes or name in self.frozen_shapes

    def names(self) -> list[str]:
        return [*self.trainable_shapes, *self.frozen_shapes]

    def shape(self, name: str) -> torch.Size:
        return self.trainable_shapes[name] if name in self.trainable_shapes else self.frozen_shapes[name]

    def is_trainable(self, name: str) -> bool:
        return name in self.trainable_shapes

    def read(self, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Flat elements [start, end) of a parameter (fp32 master weights for trainable ones)."""
        numel = self.shape(name).numel()
        end = numel if end is None else min(end, numel)
        if name not in self:
            raise KeyError(f"{self.folder}: no parameter {name!r}")
        if name in self.frozen_shapes and self.stage < 3:
            return self._models[0]["frozen_param_fragments"][name].reshape(-1)[start:end]
        if self.stage < 3:
            return self._gathered(name)[start:end]
        part = math.ceil(numel / self.world_size)
        chunks = []
        for rank in range(start // part, (end - 1) // part + 1 if end > start else 0):
            lo, hi = max(start, rank * part) - rank * part, min(end, (rank + 1) * part) - rank * part
            chunks.append(self._partition(rank, name)[lo:hi])
        return (torch.cat(chunks) if chunks else torch.empty(0)).detach()

    def _gathered(self, name: str) -> torch.Tensor:
        """A ZeRO-1/2 trainable parameter: its fragments from every rank's fp32 partition, in rank order."""
        chunks = [groups[g][address.start : address.start + address.numel]
                  for groups, mappings in self._fragments for g, mapping in enumerate(mappings)
                  for address in [mapping.get(name)] if address is not None]
        return torch.cat(chunks).detach()

    def _partition(self, rank: int, name: str) -> torch.Tensor:
        """`rank`'s partition of a parameter (p elements, the last ones padding), read lazily."""
        if name in self.frozen_shapes:
            return self._fragment(rank, name)
        part = math.ceil(self.trainable_shapes[name].numel() / self.world_size)
        return self._flat_range(rank, self._offsets[name], part)

    def full(self, name: str) -> torch.Tensor:
        return self.read(name).reshape(self.shape(name))

    def _fragment(self, rank: int, name: str) -> torch.Tensor:
        fragments = self._models[rank].get("frozen_param_fragments")
        if not fragments or name not in fragments:
            raise ValueError(f"{self.folder}: rank {rank}'s model states lack the frozen parameter {name!r}")
        return fragments[name].reshape(-1)

    def _flat_range(self, rank: int, offset: int, length: int) -> torch.Tensor:
        """`length` elements at `offset` of this rank's optimizer groups read as one flat stream."""
        out = []
        for group in self._flat[rank]:
            if length <= 0:
                break
            if offset >= group.numel():
                offset -= group.numel()
                continue
            take = min(length, group.numel() - offset)
            out.append(group[offset : offset + take])
            offset, length = 0, length - take
        return torch.cat(out)
