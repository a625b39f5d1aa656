"""Damaged, incomplete and crafted checkpoints: the newest damaged one is named and skipped before the engine
is built, an explicit damaged one is refused by name, a file whose unpickling would run code is refused
(resume on the same and on another world size, export) without running it; and the shipped zero2 config."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xgem_dist.cli import main as cli_main
from xgem_dist.train.checkpoint import CheckpointManager
from xgem_dist.train.safe_load import load_data

from .conftest import free_port
from .test_train import ENV

STEPS = ["--steps", "3", "--set", "global_batch=4", "--set", "profile_flops=false", "--set", "checkpoint_every=1"]
NEWEST, PREVIOUS = "checkpoint-0000002", "checkpoint-0000001"


def _train(shards: str, run_dir: Path, nproc: int = 0, *sets: str) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                 "127.0.0.1", "--master-port", str(free_port())] if nproc else [sys.executable])
    args = ["-m", "xgem_dist.cli", "train", "--launcher", "local", "--shards", shards, "--run-dir", str(run_dir),
            *STEPS, *(x for s in sets for x in ("--set", s))]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, env=ENV, timeout=600)


def _stopped_at_2(shards: str, run_dir: Path, nproc: int = 0, *sets: str) -> Path:
    result = _train(shards, run_dir, nproc, "stop_at=2", *sets)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def zero3_run(shards, tmp_path_factory) -> Path:
    """One rank, ZeRO-3, checkpoints after steps 1 and 2 of 3 (tests change copies)."""
    return _stopped_at_2(shards, tmp_path_factory.mktemp("zero3") / "run")


@pytest.fixture(scope="module")
def zero2_run(shards, tmp_path_factory) -> Path:
    """Two ranks, the shipped zero2 config (a fresh run of it crashed in DeepSpeed's initial broadcast on
    CLIP's 0-dim logit scale), checkpoints after steps 1 and 2 of 3."""
    return _stopped_at_2(shards, tmp_path_factory.mktemp("zero2") / "run", 2, "deepspeed_config=zero2")


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _tag_dir(run: Path, tag: str = NEWEST) -> Path:
    return run / "checkpoints" / tag / tag


def _summaries(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "summary.jsonl").read_text().splitlines()]


class _RunsCommand:
    """Unpickles into os.system(command): what a crafted checkpoint file would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant_payload(path: Path, marker: Path) -> None:
    torch.save({"module": _RunsCommand(f"touch {marker}")}, path)


def _damage(run: Path, how: str) -> str:
    """Damages the newest checkpoint (or the pointer to it); returns the file a message must name."""
    checkpoints = run / "checkpoints"
    state = checkpoints / NEWEST / "xgem_state.json"
    if how == "truncated state":
        state.write_text(state.read_text()[:100])
        return str(state)
    if how == "deleted state":
        state.unlink()
        return str(state)
    if how == "dangling pointer":
        (checkpoints / "latest_checkpoint").write_text("checkpoint-0000009")
        return str(checkpoints / "checkpoint-0000009")
    optim = next(_tag_dir(run).glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    if how == "missing rank file":
        optim.unlink()
    else:
        optim.write_bytes(b"")
    return optim.name


@pytest.mark.parametrize("run_name, how, resumes_from", [
    ("zero3_run", "truncated state", PREVIOUS), ("zero3_run", "deleted state", PREVIOUS),
    ("zero3_run", "dangling pointer", NEWEST), ("zero2_run", "missing rank file", PREVIOUS),
    ("zero2_run", "empty rank file", PREVIOUS)])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_complete_one_used(request, tmp_path, caplog, run_name,
                                                                                  how, resumes_from):
    run = _copy(request.getfixturevalue(run_name), tmp_path)
    named = _damage(run, how)
    world = 2 if run_name == "zero2_run" else 1
    manager = CheckpointManager(run / "checkpoints", rank=0, world_size=world, keep=3, use_ray=False)
    with caplog.at_level(logging.WARNING), manager.latest() as folder:
        assert folder == run / "checkpoints" / resumes_from
    assert named in caplog.text and "skipping damaged or incomplete checkpoint" in caplog.text


def test_a_damaged_checkpoint_given_explicitly_or_left_alone_is_refused_by_name(zero3_run, tmp_path):
    run = _copy(zero3_run, tmp_path)
    named = _damage(run, "truncated state")
    manager = CheckpointManager(run / "checkpoints", rank=0, world_size=1, keep=3, use_ray=False)
    with pytest.raises(ValueError, match=f"resume=.*damaged.*{named}"):
        with manager.latest(str(run / "checkpoints" / NEWEST)):
            pass
    (run / "checkpoints" / PREVIOUS / "xgem_state.json").unlink()
    with pytest.raises(ValueError, match="no complete checkpoint") as refused:
        with manager.latest():
            pass
    assert named in str(refused.value) and f"{PREVIOUS}/xgem_state.json is missing" in str(refused.value)


def test_checkpoint_files_load_as_data_and_a_crafted_or_damaged_one_is_named(zero3_run, zero2_run, tmp_path):
    files = sorted(zero3_run.rglob("*.pt")) + sorted(zero2_run.rglob("*.pt"))
    assert len(files) == 10 and all(isinstance(load_data(f, map_location="cpu"), dict) for f in files)
    marker, crafted, truncated = tmp_path / "marker", tmp_path / "crafted.pt", tmp_path / "truncated.pt"
    _plant_payload(crafted, marker)
    with pytest.raises(ValueError, match=f"{crafted}: refused to load .*posix.system"):
        load_data(crafted)
    truncated.write_bytes(files[0].read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{truncated}: damaged checkpoint file"):
        load_data(truncated)
    assert not marker.exists()


def test_export_refuses_a_crafted_checkpoint_file(zero3_run, tmp_path, capsys):
    run = _copy(zero3_run, tmp_path)
    marker, payload = tmp_path / "marker", _tag_dir(run) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    _plant_payload(payload, marker)
    assert cli_main(["export", str(run), str(tmp_path / "out")]) == 2
    assert f"{payload}: refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [0, 2], ids=["same world size", "universal"])
def test_a_resume_refuses_a_crafted_checkpoint_file(zero3_run, shards, tmp_path, nproc):
    """On the same world size DeepSpeed's load_checkpoint reads the file, on another its universal conversion."""
    run = _copy(zero3_run, tmp_path)
    marker, payload = tmp_path / "marker", _tag_dir(run) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    _plant_payload(payload, marker)
    result = _train(shards, run, nproc)
    assert result.returncode != 0 and f"{payload}: refused to load" in result.stderr, result.stderr[-4000:]
    assert not marker.exists()
    if nproc:  # the conversion's own stderr is shown
        assert "universal conversion" in result.stderr and "failed with exit code 2" in result.stderr


@pytest.mark.slow
def test_a_run_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(zero3_run, shards, tmp_path):
    run = _copy(zero3_run, tmp_path)
    named = _damage(run, "truncated state")
    result = _train(shards, run)
    assert result.returncode == 0, result.stderr[-4000:]
    assert named in result.stderr and "resuming from" in result.stderr
    assert [(s["start_step"], s["end_step"]) for s in _summaries(run)] == [(0, 2), (1, 3)]


@pytest.mark.slow
def test_zero2_resumes_on_the_same_and_another_world_size_and_exports(zero2_run, shards, tmp_path):
    """The 2-rank ZeRO-2 checkpoint continues on 2 ranks and (universal conversion) on 1 with the same step-3
    loss, and both runs export the same weights."""
    from safetensors.torch import load_file

    from xgem_dist.train.weights import export

    runs = {}
    for world in (2, 1):
        run = Path(shutil.copytree(zero2_run, tmp_path / f"w{world}"))
        result = _train(shards, run, world if world > 1 else 0, "deepspeed_config=zero2")
        assert result.returncode == 0, result.stderr[-4000:]
        summaries = _summaries(run)
        assert [(s["world_size"], s["start_step"], s["end_step"]) for s in summaries] == [(2, 0, 2), (world, 2, 3)]
        runs[world] = (summaries[-1]["last_loss"], export(run, tmp_path / f"export-w{world}"))
    (loss2, export2), (loss1, export1) = runs[2], runs[1]
    assert math.isfinite(loss2) and abs(loss1 - loss2) <= 1e-5 * abs(loss2)
    (a,), (b,) = (sorted((e / "unet_frontal").glob("*.safetensors")) for e in (export2, export1))
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.slow
def test_under_ray_a_damaged_newest_checkpoint_falls_back_to_the_one_before(shards, tmp_path):
    pytest.importorskip("ray")
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "xgem_dist.cli", "train", "--num-workers", "1", "--name", "damaged",
            "--max-failures", "0", "--shards", shards, "--run-dir", str(run_dir), "--steps", "6",
            "--set", "global_batch=4", "--set", "checkpoint_every=2", "--set", "profile_flops=false"]
    first = subprocess.run([*args, "--set", "stop_at=4"], capture_output=True, text=True, env=ENV, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    newest = run_dir / "ray" / "damaged" / "checkpoint-0000004"
    (newest / "xgem_state.json").unlink()  # Ray still lists it as the run's latest checkpoint
    again = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)  # the same --name: resumes
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run_dir / "summary.jsonl").read_text().splitlines()[-1])
    assert summary["resumed_from"].endswith("checkpoint-0000002") and summary["end_step"] == 6
