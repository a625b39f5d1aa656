"""Studies of a shard split, read by key: report, views and CheXpert labels.

The fixed evaluation list (`study_list`) depends only on the split's keys, what each study holds, the
seed and the count, so every model is evaluated on the same studies.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..data.loader import ShardLoader, SampleRef

MEMBER = {"text": "report.txt", "frontal": "frontal.jpg", "lateral": "lateral.jpg"}


class Studies:
    def __init__(self, url: str, split: str, image_size: int):
        self.url, self.split = url, split
        self.loader = ShardLoader(url, global_batch=1, rank=0, world_size=1, image_size=image_size, split=split,
                                  threads=1, prefetch=0)
        self.by_key: dict[str, SampleRef] = {ref.key: ref for ref in self.loader.samples}

    def has(self, key: str, modality: str) -> bool:
        member = self.by_key[key].members.get(MEMBER[modality])
        return member is not None and member[1] > 0

    def study_list(self, modalities: tuple[str, ...], count: int, seed: int) -> list[str]:
        """Up to `count` keys holding every one of `modalities`, in a seeded order of the whole split."""
        keys = sorted(self.by_key)
        order = np.random.default_rng(seed).permutation(len(keys))
        chosen = [keys[i] for i in order if all(self.has(keys[i], m) for m in modalities)]
        return chosen[:count]

    def read(self, keys: list[str]) -> dict:
        """{"text": [str], "frontal"/"lateral": [B,1,S,S] in [0,1], "<view>_present": [B] bool,
        "labels": [dict label -> 1.0/0.0/-1.0/None]} for the keys, in their order."""
        missing = [k for k in keys if k not in self.by_key]
        if missing:
            raise ValueError(f"{self.url} ({self.split}): no sample(s) {missing[:5]}; keys look like "
                             f"{sorted(self.by_key)[:2]}")
        refs = [self.by_key[k] for k in keys]
        n = len(refs)
        data = self.loader.read_members([(r, MEMBER["text"]) for r in refs] + [(r, "json") for r in refs]
                                        + [(r, MEMBER[v]) for v in ("frontal", "lateral") for r in refs])
        out: dict = {"key": list(keys), "text": [bytes(d or b"").decode("utf-8") for d in data[:n]],
                     "labels": [json.loads(bytes(d)).get("labels", {}) if d else {} for d in data[n : 2 * n]]}
        images, present = self.loader.decoder(data[2 * n :])
        for i, view in enumerate(("frontal", "lateral")):
            out[view], out[f"{view}_present"] = images[i * n : (i + 1) * n], present[i * n : (i + 1) * n]
        return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,1,H,W] in [0,1] -> [B,H,W] uint8 (what is written to PNG and measured)."""
    return images[:, 0].float().mul(255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
