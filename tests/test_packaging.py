"""A wheel built from the repo, installed outside the checkout, trains: the DeepSpeed configs and the
presets it reads ship inside the package."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xgem_dist.config import ShardConfig
from xgem_dist.data.shard import shard

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "runs", ".pytest_cache",
                                    "quickstart_out", "profile_out", ".gpu_wheels")


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_trains(demo, tmp_path):
    source = tmp_path / "source"  # built from a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("xgem_dist-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    assert {"xgem_dist/ds_configs/zero3.json", "xgem_dist/ds_configs/zero3_offload.json",
            "xgem_dist/presets/tiny-frontal.yaml"} <= packaged
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)

    shards = tmp_path / "shards"
    shard(ShardConfig(images=demo["root"], reports=demo["root"], out=str(shards), max_side=128, samples_per_shard=16,
                      progress=False))
    work = tmp_path / "elsewhere"
    work.mkdir()
    # only the installed copy on the path; the venv's editable finder comes after PYTHONPATH entries
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    where = subprocess.run([sys.executable, "-c", "import xgem_dist; print(xgem_dist.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where
    run_dir = work / "run"
    train = subprocess.run([sys.executable, "-m", "xgem_dist.cli", "train", "--launcher", "local", "--config",
                            "tiny-frontal", "--shards", str(shards), "--run-dir", str(run_dir), "--steps", "2",
                            "--set", "deepspeed_config=zero3", "--set", "global_batch=4"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-4000:]
    summary = json.loads((run_dir / "summary.jsonl").read_text().splitlines()[-1])
    assert summary["end_step"] == 2
