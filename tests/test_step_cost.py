"""The step without waste: fewer FLOPs per sample with precomputed conditioning (xgem, meta device), far fewer
ZeRO-3 all-gathers with leaf blocks and replicated frozen encoders (tiny, W=2, DeepSpeed's comms logger), the same
losses."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"


def _step_cost():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_precomputed_conditioning_cuts_the_frontal_stage_flops_by_40_percent():
    step_cost = _step_cost()
    online = step_cost.flops_per_sample("xgem", "frontal", "online", 256)
    pre = step_cost.flops_per_sample("xgem", "frontal", "precomputed", 256)
    print(f"xgem frontal, FLOPs per sample: online {online / 1e12:.3f} TFLOP, precomputed {pre / 1e12:.3f} TFLOP")
    assert 0.5e12 < pre < 0.6 * online  # the UNet's forward and backward is left, ~0.52 TFLOP at 256 px


def test_the_comms_counter_is_empty_without_the_logger():
    from xgem_dist.profile.comms import CommsCounter, enable_comms_logger

    assert enable_comms_logger({"a": 1})["comms_logger"]["enabled"] is True
    counter = CommsCounter()
    if not counter.active:
        counter.begin_step()
        assert counter.end_step() == {}


@pytest.mark.slow
def test_leaf_blocks_and_replicated_frozen_encoders_cut_all_gathers_5x_with_identical_losses(tmp_path):
    out = tmp_path / "step_cost.json"
    subprocess.run([sys.executable, str(SCRIPT), "--flops-model", "tiny", "--stages", "frontal", "--variants",
                    "zero3,zero3-leaf", "--steps", "2", "--out", str(out)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=900)
    result = json.loads(out.read_text())
    flops = result["flops_per_sample"][0]
    assert flops["stage"] == "frontal" and flops["precomputed_tflop"] < flops["online_tflop"]
    stock, tuned = result["comms_tiny_w2"]
    assert (stock["variant"], tuned["variant"]) == ("zero3", "zero3-leaf")
    print(f"all-gathers per step: stock {stock['all_gathers']:.0f}, tuned {tuned['all_gathers']:.0f}; "
          f"bytes {stock['bytes']:.0f} -> {tuned['bytes']:.0f}")
    assert stock["all_gathers"] >= 5 * tuned["all_gathers"] > 0
    assert tuned["bytes"] < stock["bytes"]
    assert stock["by_type"]["comms/reduce_scatter_tensor/calls"] >= 1  # gradients are counted too
    assert stock["losses"] == tuned["losses"] and len(stock["losses"]) == 2


def test_auto_picks_zero2_when_its_model_state_fits_and_tuned_zero3_when_not():
    from xgem_dist.config import TrainConfig
    from xgem_dist.train.engine import choose_zero, deepspeed_config

    cfg = TrainConfig(model="xgem", stage="frontal", precision="bf16", deepspeed_config="auto")
    name, why = choose_zero(cfg, 8, memory=80 * 1024**3)
    assert name == "zero2" and "859.5M trainable" in why and "fits" in why
    name, why = choose_zero(cfg, 8, memory=16 * 1024**3)
    assert name == "zero3_tuned" and "over half" in why
    tiny = deepspeed_config(TrainConfig(deepspeed_config="auto"), world_size=2)
    assert tiny["zero_optimization"]["stage"] == 2
