"""A node drained as a preemption (what a cloud autoscaler does before a spot reclaim) under Ray Train:
the run saves a checkpoint before the node goes and resumes from exactly that checkpoint."""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from xgem_dist.config import LaunchConfig, TrainConfig

from .conftest import loopback_ray_cluster


STEPS, CHECKPOINT_EVERY, DEADLINE_S = 12, 1000, 12.0


def _wait_for(condition, what: str, over: threading.Event, timeout_s: float = 240) -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up or over.is_set():
            raise TimeoutError(what)
        time.sleep(0.1)


def _preempt_rank1_node(cluster, nodes: dict, run_dir: Path, storage: Path, over: threading.Event,
                        outcome: dict) -> None:
    """After the first (slow) steps, drain the node of rank 1 as a preemption with a deadline, as a cloud
    autoscaler does on a spot reclaim notice, and take the node away at the deadline."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    try:
        steps_file, snapshot = run_dir / "steps.jsonl", storage / "checkpoint_manager_snapshot.json"
        _wait_for(lambda: steps_file.exists() and len(steps_file.read_text().splitlines()) >= 3,
                  "training made no progress", over)
        outcome["drained_after_step"] = len(steps_file.read_text().splitlines())
        rank1 = json.loads(next((run_dir / "placement").glob("rank1-*.json")).read_text())
        node, deadline = nodes[rank1["node_ip"]], time.time() + DEADLINE_S
        accepted, message = GcsClient(address=cluster.address).drain_node(
            node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "spot instance reclaimed", int(deadline * 1000))
        assert accepted, message
        # the snapshot is Ray's record of the checkpoints it registered
        _wait_for(lambda: snapshot.exists() and "checkpoint-" in snapshot.read_text(), "no checkpoint registered",
                  over, timeout_s=DEADLINE_S)
        # the doomed node's worker stops here, so that however fast this machine trains, the run is still going
        # when the deadline passes and Ray restarts it
        os.kill(rank1["pid"], signal.SIGSTOP)
        try:
            time.sleep(max(0.0, deadline - time.time()) + 1)
            cluster.remove_node(node, allow_graceful=False)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank1["pid"], signal.SIGCONT)  # never leave a stopped process behind
    except BaseException as error:  # noqa: BLE001  (asserted on by the test)
        outcome["error"] = error


@pytest.mark.slow
def test_ray_preempted_node_saves_a_checkpoint_and_the_run_resumes_from_it(shards, tmp_path):
    pytest.importorskip("ray")
    from xgem_dist.train.ray_launch import launch_ray

    run_dir, nodes, over, outcome = tmp_path / "run", {}, threading.Event(), {}
    storage = run_dir / "ray" / "preempted"
    # two nodes for the two workers and a spare: Ray places nothing new on a draining node
    with loopback_ray_cluster(("127.0.0.3", "127.0.0.4", "127.0.0.5"), nodes) as cluster:
        reclaim = threading.Thread(target=_preempt_rank1_node, args=(cluster, nodes, run_dir, storage, over, outcome))
        reclaim.start()
        try:
            train = TrainConfig(shards=shards, run_dir=str(run_dir), steps=STEPS, global_batch=4,
                                checkpoint_every=CHECKPOINT_EVERY)
            # max_failures=0: only a restart counted as a preemption lets the run go on
            result = launch_ray(train, LaunchConfig(num_workers=2, max_failures=0, name="preempted", timeout_s=60))
        finally:
            over.set()
            reclaim.join(60)
    assert "error" not in outcome, repr(outcome.get("error"))
    names = sorted(p.name for p in storage.glob("checkpoint-*"))
    assert len(names) == 2 and names[-1] == f"checkpoint-{STEPS:07d}", names
    saved_at = int(names[0].split("-")[1])
    assert saved_at % CHECKPOINT_EVERY != 0 and outcome["drained_after_step"] <= saved_at < STEPS
    summaries = [json.loads(line) for line in (run_dir / "summary.jsonl").read_text().splitlines()]
    assert len(summaries) == 1  # the first attempt never returned: Ray restarted it
    assert summaries[0]["resumed_from"].endswith(names[0]) and summaries[0]["start_step"] == saved_at
    assert summaries[0]["end_step"] == STEPS and result["checkpoint"].endswith(names[-1])
