"""Released-checkpoint interop, checked against the released model's own tensor manifest."""

import dataclasses
import gzip
import json

import pytest
import torch

from xgem_dist.model.convert import from_released, schedule_buffers, to_released
from xgem_dist.model.xgem import PRESETS, build_xgem, computes_differently, released_function

from .conftest import SHARED

REFERENCE = SHARED / "reference" / "xgem_official_state_dict.json.gz"


@pytest.fixture(scope="module")
def manifest() -> dict[str, list[int]]:
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} not found (ships only beside the project's CI checkout)")
    entries = json.load(gzip.open(REFERENCE, "rt"))["state_dict"]
    assert len(entries) == 5931
    return {name: shape for name, shape, _ in entries}


@pytest.fixture(scope="module")
def xgem_meta():
    return build_xgem("xgem", device="meta")


def test_every_released_tensor_maps_to_exactly_one_of_ours(manifest, xgem_meta):
    released = {name: torch.empty(shape, device="meta") for name, shape in manifest.items()}
    released["betas"] = schedule_buffers()["betas"]
    targets = {k: v.shape for k, v in xgem_meta.state_dict().items()}
    converted = from_released(released, xgem_meta.config, targets)  # raises on any unused, missing or doubled tensor
    assert converted.keys() == targets.keys()
    assert all(converted[k].shape == targets[k] for k in targets)


def test_export_reproduces_the_released_names_and_shapes(manifest, xgem_meta):
    exported = to_released(xgem_meta.state_dict(), xgem_meta.config)
    assert sorted(exported) == sorted(manifest)
    wrong = [(k, list(v.shape), manifest[k]) for k, v in exported.items() if list(v.shape) != manifest[k]]
    assert not wrong, wrong[:5]


def test_conversion_is_strict(manifest, xgem_meta):
    released = {name: torch.empty(shape, device="meta") for name, shape in manifest.items()}
    targets = {k: v.shape for k, v in xgem_meta.state_dict().items()}
    released["betas"] = schedule_buffers()["betas"] * 2
    with pytest.raises(ValueError, match="schedule"):
        from_released(released, xgem_meta.config, targets)
    released["betas"] = schedule_buffers()["betas"]
    with pytest.raises(KeyError, match="no conversion rule"):
        from_released(released | {"model.something_else.weight": torch.empty(1)}, xgem_meta.config, targets)
    del released["model.diffusion_model.unet_text.out.2.weight"]
    with pytest.raises(KeyError, match="no released counterpart"):
        from_released(released, xgem_meta.config, targets)


def tiny_released_layout():
    tiny = PRESETS["tiny"]
    return dataclasses.replace(tiny, image_unet=dataclasses.replace(tiny.image_unet, temporal=True),
                               vae=dataclasses.replace(tiny.vae, temporal=True),
                               clip=dataclasses.replace(tiny.clip, temporal=True))


def test_values_round_trip_on_a_small_model_with_the_released_layout():
    cfg = tiny_released_layout()
    torch.manual_seed(0)
    model = build_xgem(cfg)
    state = model.state_dict()
    released = to_released(state, cfg)
    text_conv = released["model.diffusion_model.unet_text.input_blocks.1.0.in_layers.2.weight"]
    assert text_conv.ndim == 4 and text_conv.shape[2:] == (1, 1)
    assert released["autokl.encoder.mid.attn_1.q.weight"].ndim == 4
    back = from_released(released, cfg, {k: v.shape for k, v in state.items()})
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    torch.manual_seed(1)
    other = build_xgem(cfg)
    other.load_state_dict(back, strict=True)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.randn(1, 1, 32)
    assert torch.equal(other.unet_frontal(x, t, ctx), model.unet_frontal(x, t, ctx))


def test_released_checkpoint_file_converts_to_loadable_safetensors_folders(tmp_path):
    from xgem_dist.model.export import convert_released_checkpoint, load_components

    cfg = tiny_released_layout()
    torch.manual_seed(0)
    model = build_xgem(cfg)
    torch.save({"state_dict": to_released(model.state_dict(), cfg)}, tmp_path / "released.pt")
    counts = convert_released_checkpoint(tmp_path / "released.pt", tmp_path / "converted", cfg)
    assert set(counts) == {"unet_frontal", "unet_lateral", "unet_text", "vae", "optimus", "clip"}
    loaded = load_components(tmp_path / "converted")
    assert computes_differently(loaded.config, released_function(cfg)) == []  # runs as the release computes
    state, again = model.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    torch.save({"state_dict": {"weights": [1, 2]}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="expected a state_dict of tensors"):
        convert_released_checkpoint(tmp_path / "bad.pt", tmp_path / "x", cfg)
