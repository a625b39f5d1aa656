"""`xgem-dist profile`: a short training job with the profiler's outputs gathered into a table and a report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import LaunchConfig, TrainConfig
from ..storage import write_json
from .report import html_report, summarise, table


def profile(train: TrainConfig, launch: LaunchConfig, out: str | Path) -> dict:
    """Runs `train` for its steps into <out>/run with any launcher, then writes <out>/profile.json and
    <out>/profile.html and returns the summary."""
    out = Path(out).resolve()
    train = dataclasses.replace(train, run_dir=str(out / "run"), resume="none", checkpoint_every=10**9,
                                log_every=1)
    if launch.launcher == "local":
        from ..train.trainer import run

        run(train, use_ray=False, timeout_s=launch.timeout_s)
    else:
        from ..train.ray_launch import launch_ray

        launch_ray(train, launch)
    run_dir = Path(train.run_dir)
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    telemetry = [json.loads(line) for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]
    summary = summarise(steps)
    meta = {"model": train.model, "stage": train.stage, "steps": len(steps), "global batch": train.global_batch,
            "image size": train.image_size, "deepspeed": train.deepspeed_config, "launcher": launch.launcher}
    result = {"meta": meta, "summary": summary, "steps": steps}
    write_json(str(out / "profile.json"), result)
    html_report(out / "profile.html", steps, telemetry, summary, meta)
    print(table(summary))
    print(f"wrote {out / 'profile.json'}, {out / 'profile.html'}, TensorBoard in {run_dir / 'tensorboard'}")
    return result
