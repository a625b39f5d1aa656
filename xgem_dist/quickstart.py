"""`xgem-dist quickstart`: the end-to-end demo on generated data.

Today: make the demo dataset -> shard it (2 workers) -> verify the shards -> print a summary.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import ShardConfig
from .data.demo import make_demo
from .data.shard import shard
from .data.verify import verify


def quickstart(workdir: str | Path) -> int:
    workdir = Path(workdir)
    t0 = time.perf_counter()
    demo = make_demo(workdir / "mimic-demo")
    print(f"[1/3] demo dataset: {demo['studies']} studies, {demo['images']} images in {workdir / 'mimic-demo'}")
    out = workdir / "shards"
    summary = shard(ShardConfig(images=demo["root"], reports=demo["root"], out=str(out),
                                samples_per_shard=16, workers=2))
    for split, s in summary["splits"].items():
        print(f"[2/3] {split:8s} {s['num_samples']:3d} samples in {s['shards']} shard(s), "
              f"{s['skipped']} skipped, {s['degraded']} degraded -> {out / s['manifest']}")
    report = verify(str(out), decode=True)
    print(f"[3/3] verify: {'OK' if report.ok else 'FAILED'}: {report.shards} shards, {report.samples} samples, "
          f"{len(report.problems)} problem(s)")
    for problem in report.problems:
        print("  ", problem)
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0 if report.ok else 1
