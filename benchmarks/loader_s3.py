"""Loader reads from s3:// at several network latencies: a batch's members in one fsspec cat_ranges call
(concurrent requests, what ShardLoader does) against one request at a time.

    python benchmarks/loader_s3.py [--latency-ms 0 --latency-ms 10 --latency-ms 25] [--json ...]

A real S3-compatible server (moto, from the test extras) runs on 127.0.0.1 behind a TCP proxy on
127.0.0.1 that holds every chunk for the given one-way latency; both are stopped at the end. Samples/s
counts decoded samples (PIL, 64 px) from demo shards made with --max-side 256. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

from xgem_dist.config import ShardConfig
from xgem_dist.data.demo import make_demo
from xgem_dist.data.loader import ShardLoader
from xgem_dist.data.shard import shard
from xgem_dist.storage import write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LatencyProxy:
    """127.0.0.1:port -> 127.0.0.1:target, each chunk held `delay_s` in each direction."""

    def __init__(self, target: int, delay_s: float):
        self.target, self.delay_s, self.port = target, delay_s, _free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait()

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(1 << 16):
                await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer):
        target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pipe(reader, target_writer), self._pipe(target_reader, writer))

    def _run(self, started: threading.Event):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        started.set()
        self.loop.run_forever()

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def samples_per_s(url: str, steps: int, batch: int, one_at_a_time: bool) -> float:
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()  # a new client for the new endpoint
    loader = ShardLoader(url, batch, 0, 1, 64, prefetch=0)
    if one_at_a_time:
        fs = loader.store.fs
        fs.cat_ranges = lambda paths, starts, ends, **_: [fs.cat_file(p, start=s, end=e)
                                                          for p, s, e in zip(paths, starts, ends)]
    loader.next_step()
    t0 = time.perf_counter()
    samples = sum(len(b["key"]) for _ in range(steps) for b in loader.next_step())
    return samples / (time.perf_counter() - t0)


def main() -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, action="append", help="one-way; default 0, 10 and 25")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default="benchmarks/results/loader_s3.json")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    rows = []
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="bench")
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            demo = make_demo(Path(tmp) / "mimic")
            shard(ShardConfig(images=demo["root"], reports=demo["root"], out="s3://bench/shards", max_side=256,
                              samples_per_shard=16, progress=False))
        for latency in args.latency_ms or [0.0, 10.0, 25.0]:
            proxy = LatencyProxy(port, latency / 1000)
            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
            try:
                row = {"latency_ms": latency}
                for label, one in (("batched", False), ("one_at_a_time", True)):
                    row[f"{label}_samples_per_s"] = round(samples_per_s("s3://bench/shards", args.steps, args.batch, one), 1)
                row["speedup"] = round(row["batched_samples_per_s"] / row["one_at_a_time_samples_per_s"], 2)
                rows.append(row)
                print(row, flush=True)
            finally:
                proxy.stop()
    finally:
        server.stop()
    print(f"{'latency ms':>10} {'batched':>9} {'one-by-one':>10} {'speedup':>8}  (samples/s)")
    for r in rows:
        print(f"{r['latency_ms']:>10} {r['batched_samples_per_s']:>9} {r['one_at_a_time_samples_per_s']:>10} "
              f"{r['speedup']:>8}")
    write_json(args.json, {"benchmark": "loader_s3", "batch": args.batch, "cpus": os.cpu_count(), "results": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
