"""Ray Train as launcher and supervisor around the launcher-agnostic loop: worker placement, restarts
after failures (from the last complete checkpoint), checkpoint persistence to any storage URL."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from ..config import LaunchConfig, TrainConfig
from .engine import check_world_sizes


def _worker(config: dict) -> None:
    import json

    import ray

    from .faults import ENV
    from .trainer import run

    if config.get("faults"):  # tests and the quickstart's demonstration (see faults.py)
        os.environ[ENV] = config["faults"]
    cfg = TrainConfig(**config["train"])
    context = ray.train.get_context()
    placement = {"rank": context.get_world_rank(), "world_size": context.get_world_size(),
                 "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
    folder = Path(cfg.run_dir) / "placement"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{placement['rank']}-pid{placement['pid']}.json").write_text(json.dumps(placement))
    run(cfg, use_ray=True, timeout_s=config["timeout_s"])


def check_worker_range(cfg: TrainConfig, launch: LaunchConfig) -> None:
    """Before any worker starts: every group size Ray Train may pick must split the global batch."""
    if launch.min_workers > launch.num_workers:
        raise ValueError(f"--min-workers {launch.min_workers} is more than --num-workers {launch.num_workers}")
    low = launch.min_workers if launch.min_workers > 0 else launch.num_workers
    check_world_sizes(cfg, range(low, launch.num_workers + 1))


def start_private_ray(quiet: bool = False) -> None:
    """A single-node Ray instance of our own, never another one running on this machine (address "local"),
    with its servers on loopback. Ray binds them to loopback only when the node's IP is 127.0.0.1, and turns
    that IP into the machine's address unless it runs as a one-machine instance (its mode on macOS and
    Windows, which the driver decides here; the processes it starts get the IP from it). quiet: the output of
    Ray's processes (workers, Ray Train's actors) is not forwarded to this process, and Ray logs errors only."""
    from unittest import mock

    import ray
    from ray._private import ray_constants

    with mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False):
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=not quiet,
                 logging_level=logging.ERROR if quiet else logging.INFO)


def _retention(cfg: TrainConfig):
    """Ray keeps the latest checkpoint and, with validation, the keep_checkpoints best by validation loss
    (a checkpoint saved without one scores +inf); without validation, the last keep_checkpoints."""
    from ray.train import CheckpointConfig

    if cfg.val_every == 0:
        return CheckpointConfig(num_to_keep=cfg.keep_checkpoints)
    return CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_score",
                            checkpoint_score_order="min")


def launch_ray(cfg: TrainConfig, launch: LaunchConfig) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_worker_range(cfg, launch)
    # workers hand results to the controller on its poll; the 2 s default makes each checkpoint wait
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # how often Ray Train looks for drained (preempted) nodes; its 5 s default eats into a short notice
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    if not ray.is_initialized():
        address = launch.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            start_private_ray()
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))
    storage = launch.storage_path or str(Path(cfg.run_dir) / "ray")
    workers = (launch.min_workers, launch.num_workers) if launch.min_workers > 0 else launch.num_workers
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"train": dataclasses.asdict(cfg), "timeout_s": launch.timeout_s,
                           "faults": os.environ.get("XGEM_FAULTS", "")},
        torch_config=TorchConfig(backend="nccl" if launch.use_gpu else "gloo", timeout_s=launch.timeout_s),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=launch.use_gpu,
                                     resources_per_worker={"CPU": launch.cpus_per_worker}),
        run_config=RunConfig(name=launch.name, storage_path=storage,
                             failure_config=FailureConfig(
                                 max_failures=launch.max_failures,
                                 # a preempted run resumes from its just-in-time checkpoint, however often
                                 max_preemption_failures=-1,
                                 # a ZeRO-3 checkpoint needs every rank's shards: never commit one without
                                 # the preempted ranks (what relaxing Ray's report barrier would allow)
                                 relax_collectives_on_preemption=False),
                             checkpoint_config=_retention(cfg)),
    )
    result = trainer.fit()
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "storage": storage}
