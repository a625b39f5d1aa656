"""Distributed training: DeepSpeed config, the loop under one process, torchrun
and Ray Train, elastic resume across world sizes, kills mid-run and mid-save, ray job submit."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from xgem_dist.config import TrainConfig
from xgem_dist.train.engine import deepspeed_config, lr_lambda

from .conftest import free_port, loopback_ray_cluster

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "RAY_DISABLE_USAGE_STATS": "1", "RAY_AUTH_MODE": "disabled"}


def test_deepspeed_config_and_lr_schedule():
    cfg = TrainConfig(global_batch=12, grad_accum=2, grad_clip=0.5, precision="auto")
    ds = deepspeed_config(cfg, world_size=3, load_universal=True)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is torch.cuda.is_available() and ds["checkpoint"]["load_universal"] is True
    offload = deepspeed_config(TrainConfig(deepspeed_config="zero3_offload", lr=3e-5), world_size=1)
    assert offload["optimizer"]["params"]["lr"] == 3e-5
    factor = lr_lambda(100, 0.2)
    assert factor(0) == pytest.approx(1 / 20) and factor(19) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5) and factor(99) < 0.01


def _train(args: list[str], nproc: int = 0, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                 "127.0.0.1", "--master-port", str(free_port())] if nproc else [sys.executable])
    result = subprocess.run([*launcher, "-m", "xgem_dist.cli", "train", "--launcher", "local", *args],
                            capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-4000:])
    return result


def _summaries(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "summary.jsonl").read_text().splitlines()]


def _losses(run_dir: Path, name: str = "train/loss") -> dict[int, float]:
    """step -> figure, the last record of each step that has it (a resumed part appends its own)."""
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    return {row["step"]: row[name] for row in rows if name in row}


def _faults(**spec) -> dict:
    return {"XGEM_FAULTS": json.dumps(spec)}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _assert_close_states(a_path: Path, b_path: Path, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Every parameter (trainable and frozen) and the Adam moments of the trainable ones agree."""
    a, b = torch.load(a_path), torch.load(b_path)
    assert a["__global_steps__"] == b["__global_steps__"] and a["__lr__"] == pytest.approx(b["__lr__"])
    names = sorted(k for k in a if not k.startswith("__"))
    assert names == sorted(k for k in b if not k.startswith("__"))
    moments = 0
    for name in names:
        for key, tensor in a[name].items():
            if tensor is None:
                assert b[name][key] is None, (name, key)
                continue
            moments += key != "param"
            assert torch.allclose(tensor, b[name][key], rtol=rtol, atol=atol), (name, key)
    assert moments > 0


@pytest.mark.slow
def test_a_split_run_over_world_sizes_continues_the_uninterrupted_trajectory(shards, source, tmp_path):
    """From given weights, W=2 for 8 steps vs W=2 to step 4 -> W=1 to step 6 -> W=3 to step 8, one schedule
    over 8 steps: the same per-step losses, every parameter (frozen ones too) and the Adam moments (the demo's
    missing views are masked out of a mean over the whole global batch, every draw comes from per-sample seeds,
    frozen weights come back from the checkpoint on any world size); the same validation losses every 2 steps
    (at W=1, 2 and 3, before and after each resume), and the same EMA at the end (re-partitioned 2->1->3)."""
    from xgem_dist.train.weights import export

    # from weights that are not the runs' own seeded init (`source`): a frozen reset would show
    common = ["--shards", shards, "--steps", "8", "--set", "global_batch=6", "--set", "checkpoint_every=100",
              "--set", f"init_from={source}", "--set", "val_every=2", "--set", "ema_decay=0.8"]
    fingerprints = _faults(fingerprints=True)
    whole = tmp_path / "whole"
    _train([*common, "--run-dir", str(whole)], nproc=2, env=fingerprints)
    split = tmp_path / "split"
    _train([*common, "--run-dir", str(split), "--set", "stop_at=4"], nproc=2, env=fingerprints)
    assert (split / "checkpoints" / "checkpoint-0000004").is_dir() and _summaries(split)[-1]["end_step"] == 4
    scratch = tmp_path / "scratch"
    _train([*common, "--run-dir", str(split), "--set", "stop_at=6"], env={"XGEM_SCRATCH": str(scratch), **fingerprints})
    # the universal conversion went to $XGEM_SCRATCH and was deleted once loaded
    assert scratch.is_dir() and not list(scratch.iterdir())
    _train([*common, "--run-dir", str(split)], nproc=3, env={"XGEM_SCRATCH": str(scratch), **fingerprints})
    assert not list(scratch.iterdir())
    assert [(s["world_size"], s["start_step"], s["end_step"]) for s in _summaries(split)] == [(2, 0, 4), (1, 4, 6),
                                                                                            (3, 6, 8)]
    expected, got = _losses(whole), _losses(split)
    assert sorted(expected) == sorted(got) == list(range(1, 9))
    worst = max(_relative(expected[step], got[step]) for step in expected)
    print(f"worst relative per-step loss difference over W=2 | 2->1->3: {worst:.2e}")
    assert worst < 1e-4, (expected, got)
    _assert_close_states(whole / "fingerprint-save-step8-w2.pt", split / "fingerprint-save-step8-w3.pt")
    for name in ("val/loss", "val_ema/loss"):
        expected, got = _losses(whole, name), _losses(split, name)
        assert sorted(expected) == sorted(got) == [2, 4, 6, 8]
        worst = max(_relative(expected[step], got[step]) for step in expected)
        print(f"worst relative {name} difference over W=2 | 2->1->3: {worst:.2e}")
        assert worst < 1e-5, (name, expected, got)
    assert _losses(whole, "val_ema/loss")[8] != _losses(whole, "val/loss")[8]  # the EMA is not the weights
    averages = {}
    for run in (whole, split):
        averages[run.name] = export(run, tmp_path / f"{run.name}-ema", ema=True)
    compared = 0
    for path in (averages["whole"] / "unet_frontal").glob("*.safetensors"):
        from safetensors.torch import load_file

        a, b = load_file(path), load_file(averages["split"] / "unet_frontal" / path.name)
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name
            compared += 1
    assert compared > 0


@pytest.mark.slow
def test_a_resume_that_would_change_the_trajectory_is_refused(shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--shards", shards, "--run-dir", str(run_dir), "--set", "global_batch=4", "--steps", "4"]
    _train([*args, "--set", "stop_at=1"])
    refused = _train([*args, "--set", "lr=5e-4"], check=False)
    assert refused.returncode == 2 and "lr: 0.0001 -> 0.0005" in refused.stderr
    assert "allow_changes=lr" in refused.stderr
    longer = _train([*args[:-1], "6"], check=False)
    assert longer.returncode == 2 and "steps: 4 -> 6" in longer.stderr
    _train([*args, "--set", "lr=5e-4", "--set", "allow_changes=lr", "--set", "stop_at=2"])
    assert [(s["start_step"], s["end_step"]) for s in _summaries(run_dir)] == [(0, 1), (1, 2)]


@pytest.mark.slow
def test_the_clip_loss_is_over_the_global_batch_at_any_world_size(shards, tmp_path):
    losses = {}
    for world in (1, 2, 3):
        run_dir = tmp_path / f"w{world}"
        _train(["--shards", shards, "--run-dir", str(run_dir), "--steps", "3", "--set", "stage=clip",
                "--set", "global_batch=6"], nproc=world if world > 1 else 0)
        losses[world] = _losses(run_dir)
    assert sorted(losses[1]) == sorted(losses[2]) == sorted(losses[3]) == [1, 2, 3]
    worst = max(_relative(loss, losses[world][step]) for world in (2, 3) for step, loss in losses[1].items())
    print(f"worst relative per-step CLIP loss difference, W=2 and W=3 against W=1: {worst:.2e}")
    assert worst < 1e-4, losses
    accumulated = _train(["--shards", shards, "--run-dir", str(tmp_path / "ga"), "--steps", "1", "--set",
                          "stage=clip", "--set", "global_batch=6", "--set", "grad_accum=2"], check=False)
    assert accumulated.returncode == 2 and "needs grad_accum 1" in accumulated.stderr


@pytest.mark.slow
def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--shards", shards, "--run-dir", str(run_dir), "--steps", "6", "--set", "global_batch=4",
            "--set", "checkpoint_every=2"]
    crashed = _train(args, check=False, env=_faults(exit_in_save_at_step=4))
    assert crashed.returncode != 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest_checkpoint").read_text() == "checkpoint-0000002"
    assert (checkpoints / "checkpoint-0000004.partial").is_dir() and not (checkpoints / "checkpoint-0000004").exists()
    _train(args)
    summary = _summaries(run_dir)[-1]
    assert summary["resumed_from"].endswith("checkpoint-0000002") and summary["end_step"] == 6
    assert (checkpoints / "latest_checkpoint").read_text() == "checkpoint-0000006"
    assert not list(checkpoints.glob("*.partial"))


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_before_its_checkpoint_and_the_best_one_is_kept(shards, tmp_path):
    """Validation with every checkpoint, samples every 2 steps, health figures per step; a NaN at step 5 stops
    the run with a message and no checkpoint at or after step 5; pruning keeps the last one and the best."""
    run_dir = tmp_path / "run"
    crashed = _train(["--shards", shards, "--run-dir", str(run_dir), "--steps", "6", "--set", "global_batch=4",
                      "--set", "checkpoint_every=1", "--set", "keep_checkpoints=1", "--set", "sample_every=2",
                      "--set", "sample_steps=1", "--set", "sample_studies=1", "--set", "sample_combinations=T->F,F->T",
                      "--set", "lr=1e-3"], check=False, env=_faults(nan_loss_at_step=5))
    assert crashed.returncode != 0
    assert "step 5: the loss is nan (not finite)" in crashed.stderr and "newest checkpoint is checkpoint-0000004" in \
        crashed.stderr
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest_checkpoint").read_text() == "checkpoint-0000004"
    validated = _losses(run_dir, "val/loss")
    assert sorted(validated) == [1, 2, 3, 4]
    best = f"checkpoint-{min(validated, key=validated.get):07d}"
    assert (checkpoints / "best_checkpoint").read_text() == best
    assert {p.name for p in checkpoints.glob("checkpoint-*")} == {best, "checkpoint-0000004"}
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["train/grad_norm"] > 0 and row["train/eta_s"] >= 0 and row["train/frontal"] == \
            pytest.approx(row["train/loss"], rel=1e-5)
        assert any(k.startswith("train_by_t/t") for k in row) and "val_by_t/t050-149" not in row
    for step in (2, 4):
        folder = run_dir / "samples" / f"step-{step:07d}"
        assert (folder / "T-to-F.png").stat().st_size > 0
        real, generated = (folder / "F-to-T.txt").read_text().splitlines()[1:3]
        assert real.startswith("  real:") and generated.startswith("  generated:")
    # the run dir is a MODEL for `sample` (its newest checkpoint, with its tokenizers): same seed, same bytes
    written = []
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "xgem_dist.cli", "sample", str(run_dir), "--combination", "T->F",
                        "--report", "Small left pleural effusion.", "--steps", "2", "--seed", "3", "--out",
                        str(tmp_path / name)], check=True, capture_output=True, env=ENV, timeout=300)
        (png,) = (tmp_path / name).glob("*.png")
        written.append(png.read_bytes())
    assert written[0] == written[1]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "xgem_dist.cli", "train", "--launcher", "local", "--shards", shards,
                             "--run-dir", str(run_dir), "--steps", "200", "--set", "global_batch=4",
                             "--set", "checkpoint_every=1000"], stderr=subprocess.PIPE, text=True, env=ENV)
    progressed = threading.Event()

    def watch():
        for line in iter(proc.stderr.readline, ""):
            if "2/200" in line or "3/200" in line:
                progressed.set()

    threading.Thread(target=watch, daemon=True).start()
    assert progressed.wait(300), "training made no progress"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(300) == 0
    step = int((run_dir / "checkpoints" / "latest_checkpoint").read_text().split("-")[1])
    assert 2 <= step < 200 and _summaries(run_dir)[-1]["end_step"] == step


@pytest.mark.slow
def test_ray_two_nodes_a_worker_killed_training_resumes(shards, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from xgem_dist.config import LaunchConfig
    from xgem_dist.train.ray_launch import launch_ray

    run_dir = tmp_path / "run"
    with loopback_ray_cluster(("127.0.0.3", "127.0.0.4")):
        monkeypatch.setenv("XGEM_FAULTS", json.dumps({"exit_at_step": 3}))
        train = TrainConfig(shards=shards, run_dir=str(run_dir), steps=6, global_batch=4, checkpoint_every=2)
        result = launch_ray(train, LaunchConfig(num_workers=2, max_failures=2, name="two-nodes", timeout_s=60))
    assert result["metrics"]["step"] == 6 and result["checkpoint"].endswith("checkpoint-0000006")
    placements = [json.loads(p.read_text()) for p in (run_dir / "placement").glob("*.json")]
    assert {p["node_ip"] for p in placements} == {"127.0.0.3", "127.0.0.4"}
    assert len({p["pid"] for p in placements}) >= 4  # the group was started twice
    summary = _summaries(run_dir)[-1]
    assert summary["world_size"] == 2 and summary["resumed_from"].endswith("checkpoint-0000002")


def _processes_of(temp_dir: str, gcs: str) -> set[int]:
    """PIDs of the processes whose command line names this Ray instance's temp dir or GCS address."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if temp_dir in cmdline or gcs in cmdline:
            found.add(proc.pid)
    return found


def _process_or_none(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@contextlib.contextmanager
def _ray_head(bin_dir: Path, env: dict, port: int, dashboard: int):
    """A Ray head on 127.0.0.1 of our own (its own temp dir), stopped by its PID with everything it started;
    yields a set that receives the PIDs of its processes still running 30 s after it stopped (then killed).
    Ray keeps node IP 127.0.0.1 (and binds its servers to loopback) only as a one-machine instance."""
    import psutil

    from .test_network_exposure import _is_loopback, _listeners

    temp_dir = tempfile.mkdtemp(prefix="xr-")  # short: Ray's socket paths under it must stay < 108 bytes
    gcs = f"127.0.0.1:{port}"
    log = Path(temp_dir) / "head.log"
    env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with log.open("w") as out:  # ports with fixed defaults get free ones: another Ray may run on this machine
        head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                 "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                                 "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port",
                                 str(free_port()), "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", temp_dir],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    survivors: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while "block forever" not in log.read_text():  # printed once all is up
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        listeners = _listeners(_processes_of(temp_dir, gcs))
        exposed = [entry for entry in listeners if not _is_loopback(entry[1])]
        assert listeners and not exposed, f"the Ray head listens beyond loopback: {exposed}"
        yield survivors
    finally:
        root = _process_or_none(head.pid)
        started = {head.pid, *(p.pid for p in (root.children(recursive=True) if root else []))}
        started |= _processes_of(temp_dir, gcs)
        head.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        alive = [p for p in map(_process_or_none, started) if p is not None]
        _, still_running = psutil.wait_procs(alive, timeout=30)
        for proc in still_running:
            proc.kill()
        survivors.update(p.pid for p in still_running)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_training_to_completion(shards, tmp_path):
    pytest.importorskip("ray.dashboard")
    bin_dir = Path(sys.executable).parent
    port, dashboard = free_port(), free_port()
    env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}"}
    with _ray_head(bin_dir, env, port, dashboard) as left_running:
        run_dir = tmp_path / "run"
        job = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
             "xgem-dist", "train", "--address", "auto", "--num-workers", "1", "--shards", shards,
             "--run-dir", str(run_dir), "--steps", "2", "--set", "global_batch=4", "--set", "checkpoint_every=2"],
            capture_output=True, text=True, env=env, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
    assert not left_running, f"processes of the test's Ray head still ran after it stopped: {left_running}"
    assert _summaries(run_dir)[-1]["end_step"] == 2
