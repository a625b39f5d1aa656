"""Loader throughput: decoded images/s end to end from shards (index reads + decode + resize), per decoder.

    python benchmarks/loader_throughput.py                      # demo shards, original bytes and --max-side 512
    python benchmarks/loader_throughput.py --full-size --decoder dali-gpu --batch 64 --steps 20
    python benchmarks/loader_throughput.py --shards URL --decoder dali-gpu --image-size 256 --batch 64

Without --shards it makes the demo dataset (--full-size: MIMIC-CXR's native 2.4-3.1k px, ~3 MB a JPEG)
and shards it twice (original bytes, --max-side 512). On a GPU machine with DALI installed, --decoder
dali-gpu measures nvJPEG through DALI ("mixed" decode). --decoder read-only measures the loader without a
decoder (index, reads, reports, batching, prefetch): the most images/s it can feed any decoder here.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xgem_dist.config import ShardConfig
from xgem_dist.data.demo import DEMO_SIDES, FULL_SIZE_SIDES, make_demo
from xgem_dist.data.loader import ShardLoader
from xgem_dist.data.shard import shard
from xgem_dist.storage import write_json


class ReadOnlyDecoder:
    """Stands in for a decoder: reads every 4 KiB page of each view, as a decoder's host-to-device copy
    would, and returns blank images."""

    failures = 0

    def __init__(self, size: int):
        self.size = size

    def __call__(self, views: list) -> tuple[torch.Tensor, torch.Tensor]:
        pages = sum(int(np.frombuffer(v, dtype=np.uint8)[::4096].sum()) for v in views if v)  # noqa: F841
        return torch.zeros(len(views), 1, self.size, self.size), torch.tensor([bool(v) for v in views])


def measure(url: str, decoder: str, image_size: int, batch: int, steps: int, threads: int, prefetch: int) -> dict:
    loader = ShardLoader(url, batch, 0, 1, image_size, decoder="pil" if decoder == "read-only" else decoder,
                         threads=threads, prefetch=prefetch)
    if decoder == "read-only":
        loader.decoder = ReadOnlyDecoder(image_size)
    loader.next_step()  # warm-up: pipeline build, first reads
    images = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        for b in loader.next_step():
            images += int(b["frontal_present"].sum() + b["lateral_present"].sum())
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    loader.close()
    return {"decoder": decoder, "images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", action="append", help="shard set(s); default: demo shards made here")
    parser.add_argument("--decoder", action="append", help="pil | dali-cpu | dali-gpu | read-only (repeatable)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: the loader's default (CPUs available, 2-16)")
    parser.add_argument("--full-size", action="store_true", help="demo images at MIMIC-CXR's native size")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/loader_throughput.json")
    args = parser.parse_args()
    decoders = args.decoder or (["pil", "dali-gpu"] if torch.cuda.is_available() else ["pil", "dali-cpu"])
    with tempfile.TemporaryDirectory() as tmp:
        shard_sets = {u: u for u in args.shards or []}
        if not shard_sets:
            demo = make_demo(Path(tmp) / "mimic", sides=FULL_SIZE_SIDES if args.full_size else DEMO_SIDES)
            for label, max_side in (("original", 0), ("max-side-512", 512)):
                out = Path(tmp) / label
                shard(ShardConfig(images=demo["root"], reports=demo["root"], out=str(out), max_side=max_side,
                                  samples_per_shard=16, progress=False))
                shard_sets[label] = str(out)
        rows = []
        for label, url in shard_sets.items():
            for decoder in decoders:
                row = measure(url, decoder, args.image_size, args.batch, args.steps, args.threads, args.prefetch)
                rows.append({"shards": label, **row})
    print(f"{'shards':>14} {'decoder':>9} {'images':>7} {'s':>7} {'img/s':>8}")
    for r in rows:
        print(f"{r['shards']:>14} {r['decoder']:>9} {r['images']:>7} {r['seconds']:>7.2f} {r['images_per_s']:>8.1f}")
    result = {"benchmark": "loader_throughput", "full_size": args.full_size, "image_size": args.image_size,
              "batch": args.batch,
              "threads": args.threads, "cpus": os.cpu_count(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "results": rows}
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
