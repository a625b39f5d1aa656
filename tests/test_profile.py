"""Profiling on CPU with the tiny preset: step breakdown, FLOPs, telemetry, TensorBoard, the profile command."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from xgem_dist.config import ShardConfig
from xgem_dist.data.shard import shard
from xgem_dist.profile.metrics import PHASES, StepProfiler, aggregate, count_flops, peak_tflops
from xgem_dist.profile.telemetry import TelemetrySampler
from xgem_dist.storage import write_json


@pytest.fixture(scope="module")
def profiled(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    shards = folder / "shards"
    shard(ShardConfig(images=demo["root"], reports=demo["root"], out=str(shards), max_side=128,
                      samples_per_shard=16, progress=False))
    # a subprocess: the loop initialises torch.distributed, which should not outlive this fixture
    done = subprocess.run([sys.executable, "-m", "xgem_dist.cli", "profile", "--shards", str(shards), "--out",
                           str(folder / "out"), "--steps", "4", "--set", "global_batch=4", "--set", "trace_steps=3-3"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step time" in done.stdout and "forward" in done.stdout
    return folder / "out"


def test_flop_count_of_a_known_module_is_analytic():
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    assert count_flops(linear, x) == 2 * 8 * 64 * 32
    assert count_flops(lambda: linear(x).sum().backward()) == 3 * 2 * 8 * 64 * 32  # + dX and dW
    with torch.device("meta"):
        big = torch.nn.Linear(4096, 4096)
        assert count_flops(big, torch.empty(16, 4096)) == 2 * 16 * 4096 * 4096
    frozen = torch.nn.Linear(64, 32).requires_grad_(False)
    assert count_flops(lambda: frozen(x).sum().backward()) == 2 * 2 * 8 * 64 * 32  # no weight gradient


def test_breakdown_sums_to_the_step_time():
    profiler = StepProfiler(flops_per_step=10**12, peak=2.0)
    profiler.begin_step()
    with profiler.phase("data"):
        time.sleep(0.05)
    with profiler.phase("forward"):
        time.sleep(0.1)
    time.sleep(0.03)  # unaccounted work is "other"
    with profiler.excluded():
        time.sleep(0.05)
    record = profiler.end_step(1, samples=4, images=8)
    assert sum(record.phases.values()) == pytest.approx(record.seconds, rel=0.05)
    assert record.phases["other"] == pytest.approx(0.03, abs=0.02) and record.seconds < 0.25
    figures = record.as_dict()
    assert figures["tflops"] == pytest.approx(1 / record.seconds) and figures["mfu"] == pytest.approx(figures["tflops"] / 2)
    assert set(PHASES) <= {k[:-2] for k in figures if k.endswith("_s")}


def test_peak_table_and_aggregation():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("some CPU") is None and peak_tflops("NVIDIA H100 PCIe", override=700.0) == 700.0
    assert aggregate({"x": 2.0}) == {"x": {"min": 2.0, "median": 2.0, "max": 2.0}}
    # only rank 0 has an MFU figure: the others' rows lack it, and it is summarised over the ranks that have it
    ranks = [{"x": 2.0, "mfu": 0.4}, {"x": 4.0}, {"x": 9.0}]
    assert aggregate(ranks[0], gather=lambda _: ranks) == {"x": {"min": 2.0, "median": 4.0, "max": 9.0},
                                                           "mfu": {"min": 0.4, "median": 0.4, "max": 0.4}}


def test_telemetry_without_nvml_says_so_and_keeps_sampling():
    sampler = TelemetrySampler(interval_s=0.05).start()
    time.sleep(0.2)
    samples = sampler.stop()
    assert len(samples) >= 2 and all("host_ram_used_gb" in s for s in samples)
    assert "host_cpu_percent" in samples[-1] and 0 <= samples[-1]["host_cpu_percent"] <= 100
    if sampler.nvml_error:
        assert samples[0]["gpu"].startswith("NVML unavailable")
    else:
        assert "gpu_util_percent" in samples[0]


def test_training_steps_breakdown_flops_and_tensorboard(profiled):
    steps = [json.loads(line) for line in (profiled / "run" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:
        parts = sum(s[f"profile/{p}_s"] for p in (*PHASES, "other"))
        assert parts == pytest.approx(s["profile/step_s"], rel=0.05)
        assert s["profile/forward_s"] > 0 and s["profile/backward_s"] > 0 and s["profile/tflops"] > 0
        assert s["profile/step_s/min"] <= s["profile/step_s"] <= s["profile/step_s/max"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(profiled / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "profile/step_s", "profile/forward_s", "profile/tflops", "profile/images_per_s"} <= tags
    assert [e.step for e in events.Scalars("profile/step_s")] == [1, 2, 3, 4]


def test_profile_command_writes_its_report(profiled):
    result = json.loads((profiled / "profile.json").read_text())
    assert result["meta"]["stage"] == "frontal" and len(result["steps"]) == 4
    assert result["summary"]["profile/step_s"] > 0
    html = (profiled / "profile.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "step time" in html
    trace = json.loads((profiled / "run" / "trace-rank0.json").read_text())
    assert trace["traceEvents"]
    telemetry = (profiled / "run" / "telemetry.jsonl").read_text().splitlines()
    assert telemetry and "host_ram_used_gb" in json.loads(telemetry[0])


def test_results_json_replaces_whole_files_only(tmp_path):
    path = tmp_path / "results" / "bench.json"
    write_json(str(path), {"img_per_s": 1250.0})
    with pytest.raises(TypeError):  # fails part-way through serialising: a file written in place would be cut
        write_json(str(path), {"img_per_s": 1300.0, "decoder": object()})
    assert json.loads(path.read_text()) == {"img_per_s": 1250.0}
    assert os.listdir(path.parent) == ["bench.json"]  # no staging left behind
