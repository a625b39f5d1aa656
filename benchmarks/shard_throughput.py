"""Sharder throughput on the demo set: studies/s and MB/s, original bytes vs --max-side 512, 1 vs 2 workers.

    python benchmarks/shard_throughput.py [--studies 64] [--json results/shard_throughput.json]

Input MB/s counts the JPEG bytes of the dataset read per second; output MB/s the shard bytes written.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from xgem_dist.config import ShardConfig
from xgem_dist.data.demo import make_demo
from xgem_dist.data.shard import shard
from xgem_dist.storage import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=64)
    parser.add_argument("--json", default="benchmarks/results/shard_throughput.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo(Path(tmp) / "mimic", num_studies=args.studies)
        input_bytes = sum(p.stat().st_size for p in Path(demo["root"]).rglob("*.jpg"))
        rows = []
        for max_side in (0, 512):
            for workers in (1, 2):
                out = Path(tmp) / f"out-{max_side}-{workers}"
                t0 = time.perf_counter()
                summary = shard(ShardConfig(images=demo["root"], reports=demo["root"], out=str(out),
                                            max_side=max_side, workers=workers, samples_per_shard=64,
                                            progress=False))
                seconds = time.perf_counter() - t0
                output_bytes = sum(s["num_bytes"] for s in summary["splits"].values())
                rows.append({"max_side": max_side, "workers": workers, "seconds": round(seconds, 3),
                             "studies_per_s": round(args.studies / seconds, 2),
                             "input_MB_per_s": round(input_bytes / 1e6 / seconds, 2),
                             "output_MB_per_s": round(output_bytes / 1e6 / seconds, 2),
                             "output_MB": round(output_bytes / 1e6, 2)})
    print(f"{'mode':>14} {'workers':>7} {'s':>7} {'studies/s':>10} {'in MB/s':>8} {'out MB/s':>9} {'out MB':>7}")
    for r in rows:
        mode = "original" if r["max_side"] == 0 else f"max-side {r['max_side']}"
        print(f"{mode:>14} {r['workers']:>7} {r['seconds']:>7.2f} {r['studies_per_s']:>10.1f} "
              f"{r['input_MB_per_s']:>8.1f} {r['output_MB_per_s']:>9.1f} {r['output_MB']:>7.1f}")
    result = {"benchmark": "shard_throughput", "studies": args.studies, "input_MB": round(input_bytes / 1e6, 2),
              "cpus": os.cpu_count(), "machine": platform.machine(), "results": rows}
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
