"""`xgem-dist quickstart`: the whole system on generated data, on CPU or GPUs.

demo data -> shards -> the tiny preset's frontal stage under DeepSpeed ZeRO-3 on 2 Ray workers, with
validation, an EMA and samples -> a worker killed on purpose -> Ray restarts the group from the last complete
checkpoint -> the run continues on 1 worker (the checkpoint is converted for the new world size) -> export of
the EMA weights -> `sample` writes an image and a report -> a summary of what the files say happened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from .config import LaunchConfig, ShardConfig, TrainConfig
from .data.demo import make_demo
from .data.shard import shard
from .data.verify import verify


def _quiet_ray() -> None:
    """Ray's own output off for the demo (its actors' logs, its driver messages); the project's stays."""
    import ray

    from .train.ray_launch import start_private_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not ray.is_initialized():
        start_private_ray(quiet=True)
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _group_starts(run_dir: Path) -> int:
    """How many times a worker group started (one placement file per worker and start)."""
    return len(list((run_dir / "placement").glob("rank0-*.json")))


def quickstart(workdir: str | Path, steps: int = 8) -> int:
    workdir = Path(workdir).resolve()
    t0 = time.perf_counter()
    demo = make_demo(workdir / "mimic-demo")
    print(f"[1/7] demo dataset: {demo['studies']} studies, {demo['images']} images in {workdir / 'mimic-demo'}")
    shards = workdir / "shards"
    summary = shard(ShardConfig(images=demo["root"], reports=demo["root"], out=str(shards), max_side=256,
                                samples_per_shard=16, workers=2, progress=False))
    report = verify(str(shards))
    print(f"[2/7] shards: {sum(s['num_samples'] for s in summary['splits'].values())} samples in "
          f"{report.shards} shards, verify {'OK' if report.ok else 'FAILED'} -> {shards}")
    if not report.ok:
        return 1

    from .train.ray_launch import launch_ray

    _quiet_ray()
    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    # one schedule over steps + 4; the 2-worker part stops at `steps`, the 1-worker part finishes it
    train = TrainConfig(model="tiny", stage="frontal", shards=str(shards), run_dir=str(run_dir), steps=steps + 4,
                        stop_at=steps, global_batch=4, checkpoint_every=2, lr=3e-4, ema_decay=0.9,
                        sample_every=steps, sample_steps=4, sample_studies=2, sample_report_tokens=24)
    launch = LaunchConfig(num_workers=2, use_gpu=torch.cuda.is_available(), name="quickstart", max_failures=2)
    killed_at = steps // 2 + 1
    os.environ["XGEM_FAULTS"] = json.dumps({"exit_at_step": killed_at})  # the demonstration's kill (faults.py)
    try:
        launch_ray(train, launch)
    finally:
        del os.environ["XGEM_FAULTS"]
    runs = _runs(run_dir)
    restarted = _group_starts(run_dir) > 1 and runs[-1]["resumed_from"] is not None
    print("[3/7] 2 workers, validation + EMA + samples: "
          + (f"a worker was killed after step {killed_at} on purpose; Ray restarted the group, which resumed from "
             f"{Path(runs[-1]['resumed_from']).name} and finished step {runs[-1]['end_step']}" if restarted else
             f"finished step {runs[-1]['end_step']} (no restart was observed)"))
    second = launch_ray(dataclasses.replace(train, stop_at=0), dataclasses.replace(launch, num_workers=1))
    runs = _runs(run_dir)
    saved_by = json.loads((Path(runs[-1]["resumed_from"]) / "xgem_state.json").read_text())["world_size"]
    print(f"[4/7] 1 worker: resumed from {Path(runs[-1]['resumed_from']).name} (saved by {saved_by} workers) and "
          f"finished step {runs[-1]['end_step']} -> {second['checkpoint']}")

    from .train.weights import export

    shutil.rmtree(workdir / "model", ignore_errors=True)
    model = export(second["checkpoint"], workdir / "model", ema=True)
    print(f"[5/7] export of the EMA weights -> {model}")

    from .generate.sample import sample_to_files

    written = sample_to_files(str(model), "F->T+L", workdir / "sample", frontal=str(_a_frontal(shards)), steps=10,
                              guidance=7.5, seed=0, image_size=train.image_size, max_report_tokens=40)
    print(f"[6/7] sample F->T+L: {', '.join(str(p) for p in written)}")

    print("[7/7] what happened (summary.jsonl, steps.jsonl, checkpoints):")
    for r in runs:
        print(f"      world {r['world_size']}: steps {r['start_step']}->{r['end_step']}, train loss "
              f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}, {r['samples_per_s']:.2f} samples/s"
              + (f", resumed from {Path(r['resumed_from']).name}" if r["resumed_from"] else ""))
    validations = [v for r in runs for v in r["validations"]]
    if validations:
        print("      validation loss (weights / EMA): " + ", ".join(
            f"step {v['step']} {v['val/loss']:.4f}/{v['val_ema/loss']:.4f}" for v in validations))
    best = runs[-1]["best"]
    if best:
        print(f"      best checkpoint by {best['metric']}: {best['tag']} ({best['value']:.4f}); EMA "
              f"{runs[-1]['ema_bytes_per_rank'] / 2**20:.1f} MiB per rank")
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    total = {k: sum(r.get(f"profile/{k}_s", 0.0) for r in rows) for k in ("step", "validate", "sample", "checkpoint")}
    training = total["step"] - total["validate"] - total["sample"] - total["checkpoint"]
    print(f"      time over {len(rows)} logged steps: training {training:.0f} s, validation {total['validate']:.0f} s "
          f"({100 * total['validate'] / training:.0f}% of training), samples {total['sample']:.0f} s, checkpoints "
          f"{total['checkpoint']:.0f} s")
    samples = sorted((run_dir / "samples").glob("step-*"))
    print(f"      samples during training: {', '.join(p.name for p in samples)} in {run_dir / 'samples'}")
    print(f"      TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}   ({time.perf_counter() - t0:.0f} s)")
    return 0


def _runs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "summary.jsonl").read_text().splitlines()]


def _a_frontal(shards: Path) -> Path:
    """The first validate study's frontal view, as a file (what a user would pass)."""
    from .data.loader import ShardLoader

    loader = ShardLoader(str(shards), 1, 0, 1, 64, split="validate", prefetch=0, fixed_reads=True)
    ref = next(r for r in loader.samples if "frontal.jpg" in r.members)
    path = shards.parent / "example-frontal.jpg"
    path.write_bytes(bytes(loader.read_members([(ref, "frontal.jpg")])[0]))
    return path
