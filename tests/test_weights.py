"""Weights in (init_from, strict, partitioned under ZeRO-3) and out (`xgem-dist export`), and frozen
parameters that stay what the stage was given: through bf16-free training, export, a chain of stages and a
world-size-changing resume."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xgem_dist.model.export import config_from_dict, config_to_dict, load_components, save_components
from xgem_dist.model.xgem import PRESETS, build_xgem, released_function
from xgem_dist.train.weights import (COMPONENTS, export, load_init_weights, parse_init_from, released_state,
                                     releasable)
from xgem_dist.train.zero_checkpoint import newest_checkpoint

from .conftest import free_port
from .test_train import ENV

FAST = ["--set", "global_batch=4", "--set", "profile_flops=false", "--set", "checkpoint_every=2"]


def _run(args: list[str], nproc: int = 0, module: str = "xgem_dist.cli") -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                 "127.0.0.1", "--master-port", str(free_port())] if nproc else [sys.executable])
    result = subprocess.run([*launcher, "-m", module, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _train(shards: str, run_dir: Path, steps: int, nproc: int = 0, *sets: str) -> None:
    args = ["train", "--launcher", "local", "--shards", shards, "--run-dir", str(run_dir), "--steps", str(steps),
            *FAST]
    _run([*args, *(x for s in sets for x in ("--set", s))], nproc)


def _params(folder: Path) -> dict[str, torch.Tensor]:
    return dict(load_components(folder).named_parameters())


def _compare(exported: Path, given: Path, trained: str) -> None:
    """Every tensor outside `trained` bit-identical to the stage's source, and the trained ones changed."""
    out, src = _params(exported), _params(given)
    assert out.keys() == src.keys()
    frozen = [n for n in out if not n.startswith(trained)]
    assert frozen and all(torch.equal(out[n], src[n]) for n in frozen), [n for n in frozen if not
                                                                          torch.equal(out[n], src[n])][:5]
    assert any(not torch.equal(out[n], src[n]) for n in out if n.startswith(trained)), f"{trained} did not train"


# ---- init_from: parsing, strictness, function checks (in process, plain parameters)

def test_parse_init_from(source, tmp_path):
    assert parse_init_from(str(source)) == {c: source / c for c in COMPONENTS}
    mixed = parse_init_from(f"{source}, vae={tmp_path / 'sd-vae'}, clip={source}")
    assert mixed["vae"] == tmp_path / "sd-vae" and mixed["clip"] == source / "clip"
    assert mixed["optimus"] == source / "optimus"
    assert parse_init_from(f"unet_text={source / 'unet_text'}") == {"unet_text": source / "unet_text"}
    with pytest.raises(ValueError, match="unknown component 'vea'.*unet_frontal, unet_lateral, unet_text, vae"):
        parse_init_from(f"vea={source}")
    with pytest.raises(ValueError, match="bare folder may only come first"):
        parse_init_from(f"vae={source},{source}")


def _edit_vae(source: Path, folder: Path, edit) -> Path:
    shutil.copytree(source / "vae", folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path))
    return folder


def test_init_from_loads_every_component_and_is_strict(source, tmp_path):
    torch.manual_seed(0)
    model = build_xgem("tiny")
    load_init_weights(model, str(source), rank=0, world_size=1)
    expected = _params(source)
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())
    assert model.optimus.decoder.lm_head.weight is model.optimus.decoder.transformer.wte.weight

    missing = _edit_vae(source, tmp_path / "missing", lambda t: t.pop("decoder.conv_out.bias"))
    with pytest.raises(ValueError, match=r"missing 1 \['decoder.conv_out.bias'\]; unexpected 0"):
        load_init_weights(model, f"vae={missing}", 0, 1)
    extra = _edit_vae(source, tmp_path / "extra", lambda t: t.update({"decoder.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected 1 \['decoder.extra'\]"):
        load_init_weights(model, f"vae={extra}", 0, 1)
    shaped = _edit_vae(source, tmp_path / "shape",
                       lambda t: t.update({"decoder.conv_out.bias": torch.zeros(5)}))
    with pytest.raises(ValueError, match=r"wrong shape 1 \['decoder.conv_out.bias: \(5,\) in the file, \(3,\)"):
        load_init_weights(model, f"vae={shaped}", 0, 1)


def test_init_from_refuses_weights_of_another_function(source, tmp_path):
    released = tmp_path / "released"
    shutil.copytree(source, released)
    cfg = released_function(config_from_dict(json.loads((source / "xgem_config.json").read_text())))
    (released / "xgem_config.json").write_text(json.dumps(config_to_dict(cfg)))
    model = build_xgem("tiny")
    with pytest.raises(ValueError, match="image_unet.skip_mode: 'released' vs 'standard'.*wiring"):
        load_init_weights(model, str(released), 0, 1)
    load_init_weights(model, f"vae={released},clip={released}", 0, 1)  # their function does not depend on it
    assert torch.equal(model.vae.decoder.conv_out.bias, _params(source)["vae.decoder.conv_out.bias"])


def test_init_from_a_diffusers_unet_fills_the_unet_core(source, tmp_path):
    donor = build_xgem("tiny").unet_frontal.unet
    donor.save_pretrained(tmp_path / "sd-unet")
    model = build_xgem("tiny")
    before = model.unet_frontal.env_encoder.state_dict()
    load_init_weights(model, f"unet_frontal={tmp_path / 'sd-unet'}", 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.unet_frontal.unet.parameters(), donor.parameters()))
    assert all(torch.equal(v, model.unet_frontal.env_encoder.state_dict()[k]) for k, v in before.items())


def test_released_layout_is_written_from_the_files(tmp_path):
    tiny = PRESETS["tiny"]
    cfg = released_function(dataclasses.replace(
        tiny, image_unet=dataclasses.replace(tiny.image_unet, temporal=True),
        vae=dataclasses.replace(tiny.vae, temporal=True), clip=dataclasses.replace(tiny.clip, temporal=True)))
    assert releasable(cfg) and not releasable(tiny)
    model = build_xgem(cfg)
    save_components(model, tmp_path / "m")
    from xgem_dist.model.convert import to_released

    expected = to_released(model.state_dict(), cfg)
    written = released_state(tmp_path / "m", cfg)
    torch.save({"state_dict": written}, tmp_path / "released.pt")
    loaded = torch.load(tmp_path / "released.pt", weights_only=True)["state_dict"]
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_newest_checkpoint_of_a_run_dir_a_ray_storage_or_a_folder(tmp_path):
    def make(folder: Path, step: int) -> Path:
        folder.mkdir(parents=True)
        (folder / "latest").write_text(folder.name)
        (folder / "xgem_state.json").write_text(json.dumps({"step": step}))
        return folder

    local = tmp_path / "run" / "checkpoints"
    make(local / "checkpoint-0000002", 2), make(local / "checkpoint-0000004", 4)
    (local / "latest_checkpoint").write_text("checkpoint-0000002")  # the pointer wins: 4 may be incomplete
    assert newest_checkpoint(tmp_path / "run") == local / "checkpoint-0000002"
    ray = tmp_path / "ray-run" / "ray" / "xgem"
    make(ray / "checkpoint-0000004", 4), make(ray / "checkpoint-0000010", 10), make(ray / "x.partial", 12)
    assert newest_checkpoint(tmp_path / "ray-run") == ray / "checkpoint-0000010"
    assert newest_checkpoint(ray / "checkpoint-0000004") == ray / "checkpoint-0000004"
    with pytest.raises(ValueError, match="no complete checkpoint"):
        newest_checkpoint(tmp_path / "run" / "checkpoints" / "nothing")


# ---- under ZeRO-3 with real DeepSpeed

def _probe(source: str, result: str) -> None:
    """torchrun target: build the engine with init_from and compare every gathered parameter (and the
    optimizer's fp32 master copy of the trainable ones) with the source, before any step."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from xgem_dist.config import TrainConfig
    from xgem_dist.model.tokenizers import train_small_tokenizers
    from xgem_dist.train.engine import build_engine, init_distributed

    rank, world, _ = init_distributed()
    cfg = TrainConfig(stage="frontal", init_from=source, global_batch=2 * world)
    engine = build_engine(cfg, train_small_tokenizers(["a chest x-ray"]), world)
    expected = _params(Path(source))
    mismatched, partitioned = [], 0
    for name, param in engine.module.model.named_parameters():
        partitioned += hasattr(param, "ds_tensor")
        with deepspeed.zero.GatheredParameters([param]):
            if not torch.equal(param.data.cpu(), expected[name]):
                mismatched.append(name)
        if param.requires_grad and not torch.equal(safe_get_full_fp32_param(param).cpu(), expected[name]):
            mismatched.append(f"{name} (fp32 master)")
    if rank == 0:
        Path(result).write_text(json.dumps({"world": world, "checked": len(expected), "partitioned": partitioned,
                                            "mismatched": mismatched}))


@pytest.mark.slow
def test_init_from_under_zero3_on_two_ranks(source, tmp_path):
    result = tmp_path / "probe.json"
    _run([str(source), str(result)], nproc=2, module="tests.test_weights")
    probe = json.loads(result.read_text())
    assert probe["world"] == 2 and probe["partitioned"] == probe["checked"] > 1000
    assert probe["mismatched"] == []


@pytest.fixture(scope="module")
def clip_run(shards, source, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("chain") / "clip"
    _train(shards, run_dir, 2, 0, "stage=clip", f"init_from={source}")
    return run_dir


@pytest.mark.slow
def test_export_loads_everywhere_and_casts(clip_run, source, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    out = tmp_path / "fp32"
    _run(["export", str(clip_run), str(out)])
    assert not (tmp_path / "fp32.partial").exists()
    _compare(out, source, "clip.")
    params = _params(out)
    vae, clip = AutoencoderKL.from_pretrained(out / "vae"), CLIPModel.from_pretrained(out / "clip")
    assert all(torch.equal(p, params[f"vae.{n}"]) for n, p in vae.named_parameters())
    assert all(torch.equal(p, params[f"clip.{n}"]) for n, p in clip.named_parameters())

    checkpoint = clip_run / "checkpoints" / "checkpoint-0000002"
    half = export(checkpoint, tmp_path / "bf16", dtype="bf16")
    tensors = load_file(half / "clip" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert torch.equal(tensors["visual_projection.weight"], params["clip.visual_projection.weight"].bfloat16())
    with pytest.raises(ValueError, match="released layout and function"):
        export(checkpoint, tmp_path / "released", released=True)


@pytest.mark.slow
def test_stage_chain_keeps_frozen_components_bit_identical(clip_run, source, shards, tmp_path):
    first = export(clip_run, tmp_path / "after-clip")
    _compare(first, source, "clip.")

    optimus_run = tmp_path / "optimus"
    _train(shards, optimus_run, 2, 2, "stage=optimus", f"init_from={first}")
    second = export(optimus_run, tmp_path / "after-optimus")
    _compare(second, first, "optimus.")

    frontal = tmp_path / "frontal"
    _train(shards, frontal, 4, 2, "stage=frontal", f"init_from={second}", "stop_at=2")
    # resumed on 1 rank: a resume reads no init_from, so only restore_frozen can bring the frozen weights back
    _train(shards, frontal, 4, 0, "stage=frontal", f"init_from={second}")
    state = json.loads((frontal / "checkpoints" / "checkpoint-0000004" / "xgem_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 1
    third = export(frontal, tmp_path / "after-frontal")
    _compare(third, second, "unet_frontal.unet.")


if __name__ == "__main__":
    _probe(*sys.argv[1:])
