"""The launch-time worker-count check and the shipped cluster definitions (KubeRay RayJob, submit.sh):
they must describe a job that `xgem-dist train` accepts and that runs to a real length."""

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from xgem_dist.cli import _train_configs, build_parser
from xgem_dist.config import LaunchConfig, TrainConfig
from xgem_dist.train.engine import check_world_sizes, deepspeed_config
from xgem_dist.train.ray_launch import check_worker_range, launch_ray

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_every_worker_count_of_an_elastic_range_must_divide_the_global_batch():
    cfg = TrainConfig(global_batch=128)
    with pytest.raises(ValueError, match=r"over 9, 10, 11, 12, 13, 14, 15 worker\(s\).*only \[8, 16\] of them fit"):
        check_worker_range(cfg, LaunchConfig(num_workers=16, min_workers=8))
    check_worker_range(cfg, LaunchConfig(num_workers=16))
    check_worker_range(TrainConfig(global_batch=240), LaunchConfig(num_workers=16, min_workers=15))
    with pytest.raises(ValueError, match="grad_accum 3 .* over 16 worker"):
        check_worker_range(TrainConfig(global_batch=128, grad_accum=3), LaunchConfig(num_workers=16))
    with pytest.raises(ValueError, match="--min-workers 4 is more than --num-workers 2"):
        check_worker_range(cfg, LaunchConfig(num_workers=2, min_workers=4))
    with pytest.raises(ValueError, match="global_batch 8 with grad_accum 1 does not split .* over 3 worker"):
        deepspeed_config(TrainConfig(global_batch=8), world_size=3)
    check_world_sizes(TrainConfig(global_batch=12, grad_accum=2), [1, 2, 3, 6])


def test_launch_ray_refuses_a_bad_range_before_starting_ray():
    ray = pytest.importorskip("ray")
    with pytest.raises(ValueError, match="worker"):
        launch_ray(TrainConfig(global_batch=128), LaunchConfig(num_workers=16, min_workers=8))
    assert not ray.is_initialized()


def _accepted(command: list[str]) -> tuple[TrainConfig, LaunchConfig]:
    """The configs `xgem-dist train` builds from this command line, after the launcher's check."""
    assert command[:2] == ["xgem-dist", "train"], command
    train, launch = _train_configs(build_parser().parse_args(command[1:]))
    check_worker_range(train, launch)
    return train, launch


def test_the_rayjob_runs_a_real_length_job_that_passes_the_check():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    train, launch = _accepted(shlex.split(job["spec"]["entrypoint"]))
    assert train.steps >= 10_000 and launch.use_gpu
    gpus = sum(int(group["replicas"]) * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]
                                            ["nvidia.com/gpu"]) for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus == launch.num_workers


@pytest.mark.parametrize("env, gpu, elastic", [({}, True, 0), ({"USE_GPU": "0"}, False, 0),
                                               ({"MIN_WORKERS": "16"}, True, 16)])
def test_submit_sh_builds_an_accepted_command_and_gpu_use_is_switchable(tmp_path, env, gpu, elastic):
    fake_ray = tmp_path / "ray"  # prints the job's entrypoint instead of submitting it
    fake_ray.write_text('#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done; shift; printf "%s\\n" "$@"\n')
    fake_ray.chmod(0o755)
    run = subprocess.run(["bash", str(CLUSTER / "submit.sh")], capture_output=True, text=True, check=True,
                         env={"PATH": f"{tmp_path}:/usr/bin:/bin", "RAY_ADDRESS": "http://127.0.0.1:8265",
                              "SHARDS": "s3://b/shards", "STORAGE": "s3://b/runs", "TOKENIZERS": "/tok", **env})
    train, launch = _accepted(run.stdout.splitlines())
    assert launch.use_gpu is gpu and launch.min_workers == elastic and train.steps >= 10_000


def test_the_recipe_presets_cover_every_stage_with_a_real_schedule():
    from xgem_dist.config import TrainConfig, build_config
    from xgem_dist.model.stages import STAGES
    from xgem_dist.presets import FOLDER, preset_path

    recipe = {}
    for path in sorted(FOLDER.glob("xgem-*.yaml")):
        cfg = build_config(TrainConfig, preset_path(path.stem))
        assert cfg.stage in STAGES and cfg.model == "xgem", path.name
        assert cfg.steps >= 10_000 and cfg.global_batch % 8 == 0, path.name  # a real horizon, fits 8/16/32 GPUs
        recipe[cfg.stage] = path.stem
    assert set(recipe) == set(STAGES), sorted(set(STAGES) - set(recipe))
