"""One GPU, no Ray: the released-size XGeM image stage under DeepSpeed ZeRO-3 for a few steps.

    python benchmarks/train_step_gpu.py [--model xgem] [--stage frontal] [--image-size 256] \
        [--batch 8] [--steps 10] [--json benchmarks/results/train_step_gpu.json]

Synthetic images and reports (no shards needed); prints the step time after warm-up and writes JSON.
Runs the same engine and loss as `xgem-dist train` (xgem_dist.train.engine / task), launcher-free.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from xgem_dist.config import TrainConfig
from xgem_dist.data.demo import FINDINGS, IMPRESSIONS
from xgem_dist.model.tokenizers import train_small_tokenizers
from xgem_dist.storage import write_json
from xgem_dist.train.engine import build_engine, init_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="xgem")
    parser.add_argument("--stage", default="frontal")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--deepspeed-config", default="zero3")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/train_step_gpu.json")
    args = parser.parse_args()

    init_distributed()
    cfg = TrainConfig(model=args.model, stage=args.stage, image_size=args.image_size, global_batch=args.batch,
                      steps=args.steps + args.warmup, deepspeed_config=args.deepspeed_config,
                      activation_checkpointing=args.activation_checkpointing)
    # token ids of small tokenizers are valid ids of the full-size vocabularies too
    tokenizers = train_small_tokenizers(FINDINGS + IMPRESSIONS)
    t_build = time.perf_counter()
    engine = build_engine(cfg, tokenizers, world_size=1)
    build_s = time.perf_counter() - t_build
    device = engine.device
    generator = torch.Generator().manual_seed(0)
    batch = {
        "frontal": torch.rand(args.batch, 1, args.image_size, args.image_size, generator=generator),
        "lateral": torch.rand(args.batch, 1, args.image_size, args.image_size, generator=generator),
        "frontal_present": torch.ones(args.batch, dtype=torch.bool),
        "lateral_present": torch.ones(args.batch, dtype=torch.bool),
        "report": [FINDINGS[i % len(FINDINGS)] for i in range(args.batch)],
        "seed": list(range(args.batch)),
    }
    times = []
    for step in range(args.warmup + args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    result = {"benchmark": "train_step_gpu", "model": args.model, "stage": args.stage,
              "image_size": args.image_size, "batch": args.batch, "deepspeed_config": args.deepspeed_config,
              "activation_checkpointing": args.activation_checkpointing, "device": str(device),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "build_s": round(build_s, 1), "step_s_median": round(step_s, 4),
              "images_per_s": round(args.batch / step_s, 2), "loss": float(loss),
              "max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}
    print(json.dumps(result, indent=1))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
