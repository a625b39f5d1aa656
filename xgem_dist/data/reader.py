"""A simple deterministic reader over a shard split (CPU decode with PIL), the interface the training loop uses.

The global order of an epoch is a permutation that depends only on (seed, epoch, manifest); every
optimizer step consumes the next `global_batch` samples of it and rank r of W takes its contiguous
slice of each micro-batch. The state is (seed, epoch, samples consumed, manifest hash), so a run can
resume on any world size and continue the same global sequence. The last partial global batch of an
epoch is dropped (never padded with duplicates).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..storage import Store
from .shard import MANIFEST

log = logging.getLogger(__name__)
VIEWS = ("frontal", "lateral")


@dataclass(frozen=True)
class SampleRef:
    key: str
    shard: str
    members: dict[str, tuple[int, int]]  # ext -> (offset, size) in the shard


def read_index(text: str, shard: str) -> list[SampleRef]:
    """Parse a DALI v1.2 webdataset index."""
    lines = text.strip().split("\n")
    header = lines[0].split()
    if header[0] != "v1.2" or int(header[1]) != len(lines) - 1:
        raise ValueError(f"{shard}: not a v1.2 index with {len(lines) - 1} samples")
    refs = []
    for line in lines[1:]:
        fields = line.split()
        members = {}
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i : i + 4]
            members[ext] = (int(offset), int(size))
        refs.append(SampleRef(name.split(".", 1)[0], shard, members))
    return refs


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A seed of its own for the sample at `position` of the epoch's global order."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class ShardReader:
    def __init__(self, url: str, global_batch: int, rank: int, world_size: int, image_size: int,
                 grad_accum: int = 1, seed: int = 0, split: str = "train"):
        if global_batch % (world_size * grad_accum):
            raise ValueError(f"global batch {global_batch} does not divide into {grad_accum} micro-batch(es) "
                             f"over {world_size} rank(s); pick a global batch that is a multiple of "
                             f"{world_size * grad_accum}")
        store = Store(url)
        if not store.exists(MANIFEST):
            store = store.child(split)
        manifest_bytes = store.read_bytes(MANIFEST)
        self.manifest = json.loads(manifest_bytes)
        self.manifest_hash = hashlib.sha256(manifest_bytes).hexdigest()[:16]
        self.store = store
        self.samples = [ref for shard in self.manifest["shards"]
                        for ref in read_index(store.read_bytes(shard["index"]).decode(), shard["url"])]
        if len(self.samples) < global_batch:
            raise ValueError(f"{store.url}: {len(self.samples)} samples, fewer than one global batch ({global_batch})")
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.grad_accum, self.image_size, self.seed = grad_accum, image_size, seed
        self.epoch, self.consumed = 0, 0
        self.skipped_views = 0
        self._order: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.samples) // self.global_batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed,
                "manifest_hash": self.manifest_hash}

    def load_state_dict(self, state: dict) -> None:
        if state["manifest_hash"] != self.manifest_hash or state["seed"] != self.seed:
            raise ValueError("the checkpoint's data state belongs to another manifest or seed; "
                             "resume with the same shards and seed")
        self.epoch, self.consumed, self._order = state["epoch"], state["consumed"], None

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.samples), generator=generator)

    def global_positions(self) -> list[list[int]]:
        """Positions (in the epoch's order) of the next global batch, one list per micro-batch, this rank's slice."""
        micro = self.global_batch // self.grad_accum
        per_rank = micro // self.world_size
        start = self.consumed
        return [list(range(start + m * micro + self.rank * per_rank, start + m * micro + (self.rank + 1) * per_rank))
                for m in range(self.grad_accum)]

    def next_step(self) -> list[dict]:
        """This rank's micro-batches for the next optimizer step."""
        if self.consumed + self.global_batch > len(self.samples):
            self.epoch, self.consumed, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.order(self.epoch)
        batches = [self._batch(positions) for positions in self.global_positions()]
        self.consumed += self.global_batch
        return batches

    def _read(self, ref: SampleRef, ext: str) -> bytes | None:
        if ext not in ref.members:
            return None
        offset, size = ref.members[ext]
        return self.store.fs.cat_file(f"{self.store.path}/{ref.shard}", start=offset, end=offset + size)

    def _image(self, data: bytes | None, key: str, view: str) -> torch.Tensor | None:
        if not data:
            return None
        try:
            image = Image.open(io.BytesIO(data))
            image.draft("L", (self.image_size, self.image_size))
            image = image.convert("L").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        except (OSError, ValueError) as e:
            self.skipped_views += 1
            log.warning("%s: %s does not decode (%s); treated as missing (%d so far)", key, view, e,
                        self.skipped_views)
            return None
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)

    def _batch(self, positions: list[int]) -> dict:
        batch: dict = {"key": [], "report": [], "seed": [], "position": positions}
        images = {v: [] for v in VIEWS}
        for position in positions:
            ref = self.samples[int(self._order[position])]
            batch["key"].append(ref.key)
            batch["seed"].append(sample_seed(self.seed, self.epoch, position))
            batch["report"].append((self._read(ref, "report.txt") or b"").decode("utf-8"))
            for view in VIEWS:
                images[view].append(self._image(self._read(ref, f"{view}.jpg"), ref.key, view))
        blank = torch.zeros(1, self.image_size, self.image_size)
        for view in VIEWS:
            batch[f"{view}_present"] = torch.tensor([x is not None for x in images[view]])
            batch[view] = torch.stack([blank if x is None else x for x in images[view]])
        return batch
