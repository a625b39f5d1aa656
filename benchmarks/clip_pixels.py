"""CLIP image preprocessing cost per micro-batch: the released-compatible clip_pixels (uint8, Pillow's
antialiased bicubic in float64 matmuls, centre crop) vs the plain torch bicubic it replaced.

    python benchmarks/clip_pixels.py [--device cpu|cuda] [--json benchmarks/results/clip_pixels.json]

Grayscale [B, 1, side, side] images in [0, 1] -> [B, 3, 224, 224]; median of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from xgem_dist.model.clip_preprocess import clip_pixels
from xgem_dist.storage import write_json


def plain_bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    """The previous clip_pixels: torch bicubic straight to size x size, no antialiasing or uint8 step."""
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def median_ms(fn, images: torch.Tensor, repeats: int) -> float:
    fn(images, 224)
    times = []
    for _ in range(repeats):
        if images.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(images, 224)
        if images.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results/clip_pixels.json")
    args = parser.parse_args()
    rows = []
    for side in (256, 512):
        for batch in (8, 32, 128):
            images = torch.rand(batch, 1, side, side, device=args.device)
            new = median_ms(clip_pixels, images, args.repeats)
            old = median_ms(plain_bicubic, images, args.repeats)
            rows.append({"side": side, "batch": batch, "released_compatible_ms": round(new, 2),
                         "plain_bicubic_ms": round(old, 2), "ratio": round(new / old, 2)})
    print(f"{'input':>8} {'batch':>6} {'released-compatible ms':>23} {'plain bicubic ms':>17} {'ratio':>6}")
    for r in rows:
        print(f"{r['side']:>6}^2 {r['batch']:>6} {r['released_compatible_ms']:>23.2f} {r['plain_bicubic_ms']:>17.2f} "
              f"{r['ratio']:>6.2f}")
    write_json(args.json, {"benchmark": "clip_pixels", "device": args.device, "threads": torch.get_num_threads(),
                           "cpus": os.cpu_count(), "machine": platform.machine(), "results": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
