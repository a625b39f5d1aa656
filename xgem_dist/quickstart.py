"""`xgem-dist quickstart`: the whole system on generated data, on CPU or GPUs.

demo data -> shards -> the tiny preset's frontal stage under DeepSpeed ZeRO-3 on 2 Ray workers
(checkpoint every 2 steps) -> a worker is killed -> Ray restarts the group, which resumes from the
last complete checkpoint -> the run continues on 1 worker (the checkpoint is converted for the new
world size) -> summary + TensorBoard logs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from .config import LaunchConfig, ShardConfig, TrainConfig
from .data.demo import make_demo
from .data.shard import shard
from .data.verify import verify


def quickstart(workdir: str | Path, steps: int = 8) -> int:
    workdir = Path(workdir).resolve()
    t0 = time.perf_counter()
    demo = make_demo(workdir / "mimic-demo")
    print(f"[1/5] demo dataset: {demo['studies']} studies, {demo['images']} images in {workdir / 'mimic-demo'}")
    shards = workdir / "shards"
    summary = shard(ShardConfig(images=demo["root"], reports=demo["root"], out=str(shards), max_side=256,
                                samples_per_shard=16, workers=2, progress=False))
    report = verify(str(shards))
    print(f"[2/5] shards: {sum(s['num_samples'] for s in summary['splits'].values())} samples in "
          f"{report.shards} shards, verify {'OK' if report.ok else 'FAILED'} -> {shards}")
    if not report.ok:
        return 1

    from .train.ray_launch import launch_ray

    gpu = torch.cuda.is_available()
    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    # one schedule over steps + 4; the 2-worker part stops at `steps`, the 1-worker part finishes it
    train = TrainConfig(model="tiny", stage="frontal", shards=str(shards), run_dir=str(run_dir), steps=steps + 4,
                        stop_at=steps, global_batch=4, checkpoint_every=2, fail_at_step=steps // 2 + 1, lr=3e-4)
    launch = LaunchConfig(num_workers=2, use_gpu=gpu, name="quickstart", max_failures=2, cpus_per_worker=1)
    first = launch_ray(train, launch)
    print(f"[3/5] 2 workers: a worker was killed at step {train.fail_at_step}; Ray restarted the group and it "
          f"finished step {first['metrics'].get('step')} -> {first['checkpoint']}")
    more = dataclasses.replace(train, stop_at=0, fail_at_step=-1)
    second = launch_ray(more, dataclasses.replace(launch, num_workers=1))
    print(f"[4/5] 1 worker: resumed from the 2-worker checkpoint and finished step {second['metrics'].get('step')} "
          f"-> {second['checkpoint']}")
    runs = [json.loads(line) for line in (run_dir / "summary.jsonl").read_text().splitlines()]
    for r in runs:
        print(f"      world {r['world_size']}: steps {r['start_step']}->{r['end_step']}, loss "
              f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}, {r['samples_per_s']:.2f} samples/s"
              + (f", resumed from {Path(r['resumed_from']).name}" if r["resumed_from"] else ""))
    print(f"[5/5] TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}   ({time.perf_counter() - t0:.0f} s)")
    return 0
