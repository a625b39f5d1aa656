"""XGeM components: parameter parity with the released model, and forward/backward on `tiny`."""

import dataclasses
import gzip
import json
import math
import re

import pytest
import torch

from xgem_dist.model.xgem import build_xgem, parameter_counts

from .conftest import SHARED

REFERENCE = SHARED / "reference" / "xgem_official_state_dict.json.gz"
RELEASED_PREFIX = {
    "unet_frontal": "model.diffusion_model.unet_frontal.", "unet_lateral": "model.diffusion_model.unet_lateral.",
    "unet_text": "model.diffusion_model.unet_text.", "vae": "autokl.", "optimus": "optimus.", "clip": "clip.",
}
# the temporal ("video") blocks of the released model: identity on 4-D image tensors
TEMPORAL = re.compile(r"frameshift|temporal|\.ff\.proj_(in|out)\.")
# buffers, and GPT-2's LM head (tied to its token embedding)
NOT_PARAMETERS = re.compile(r"\.attn\.bias$|\.attn\.masked_bias$|position_ids$|^optimus\.decoder\.lm_head\.weight$")

# per-component counts of the released model (../shared/notes/xgem_model.md), temporal blocks excluded
LEAN = {"unet_frontal": 1_155_820_964, "unet_lateral": 1_155_820_964, "unet_text": 2_048_385_408,
        "vae": 83_653_863, "optimus": 241_599_744, "clip": 427_616_513, "total": 5_112_897_456}
RELEASED = {"unet_frontal": 1_772_784_247, "unet_lateral": 1_772_784_247, "unet_text": 2_048_385_408,
            "vae": 101_951_463, "optimus": 241_599_744, "clip": 737_647_217, "total": 6_675_152_326}


@pytest.fixture(scope="module")
def lean_counts():
    return parameter_counts(build_xgem("xgem-lean", device="meta"))


@pytest.fixture(scope="module")
def released_counts():
    return parameter_counts(build_xgem("xgem", device="meta"))


def test_presets_match_the_notes(lean_counts, released_counts):
    assert lean_counts == LEAN
    assert released_counts == RELEASED


@pytest.mark.parametrize("preset", ["xgem", "xgem-lean"])
def test_presets_match_the_released_state_dict(preset, lean_counts, released_counts):
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} not found (ships only beside the project's CI checkout)")
    released = json.load(gzip.open(REFERENCE, "rt"))
    counts = dict.fromkeys(RELEASED_PREFIX, 0)
    for name, shape, _ in released["state_dict"]:
        if NOT_PARAMETERS.search(name) or (preset == "xgem-lean" and TEMPORAL.search(name)):
            continue
        for component, prefix in RELEASED_PREFIX.items():
            if name.startswith(prefix):
                counts[component] += math.prod(shape)
    counts["total"] = sum(counts.values())
    assert counts == (released_counts if preset == "xgem" else lean_counts)
    assert released["total_unique_parameters"] == released_counts["total"]


def test_meta_construction_allocates_nothing(lean_counts):
    model = build_xgem("xgem-lean", device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_tiny_preset_is_small_with_the_same_structure():
    tiny = parameter_counts(build_xgem("tiny", device="meta"))
    assert tiny["total"] < 5_000_000
    assert set(tiny) == set(LEAN)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_xgem("tiny")


def test_image_unet_without_environment_is_the_diffusers_unet(tiny):
    unet = tiny.unet_frontal
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 1, 32)
    assert torch.allclose(unet(x, t, ctx), unet.unet(x, t, ctx).sample, atol=1e-5)


@pytest.mark.parametrize("stream", ["unet_frontal", "unet_text"])
def test_connectors_use_the_environment_and_get_gradients(tiny, stream):
    unet = getattr(tiny, stream)
    x = torch.randn(2, 4, 16, 16) if stream == "unet_frontal" else torch.randn(2, 32)
    t, ctx = torch.tensor([10, 500]), torch.randn(2, 1, 32)
    env = unet.environment(x, t)
    assert env.shape == (2, 1, 48) and torch.allclose(env.norm(dim=-1), torch.ones(2, 1), atol=1e-5)
    other_env = torch.nn.functional.normalize(torch.randn(2, 1, 48), dim=-1)
    out = unet(x, t, ctx, env=other_env)
    assert out.shape == x.shape and not torch.allclose(out, unet(x, t, ctx))
    unet.zero_grad()
    out.square().mean().backward()
    connectors = list(unet.down_connectors.parameters()) + list(unet.up_connectors.parameters())
    assert all(p.grad is not None for p in connectors)
    assert all(p.grad is None for p in unet.env_encoder.parameters())  # env came from outside


def test_optimus_latent_reaches_the_decoder_through_the_memory(tiny):
    optimus = tiny.optimus
    ids = torch.randint(0, 512, (2, 9))
    mean, logvar = optimus.encode(ids)
    assert mean.shape == logvar.shape == (2, 32)
    with torch.no_grad():
        optimus.latent_to_embedding.weight.zero_()  # leave only the past key/value path
        tokens = torch.randint(0, 515, (2, 6))
        a, b = optimus.decode_logits(mean, tokens), optimus.decode_logits(mean + 1, tokens)
    assert a.shape == (2, 6, 515) and not torch.allclose(a, b)


def test_vae_and_clip_shapes(tiny):
    from xgem_dist.model.encoders import clip_image_token, clip_text_token

    latent = tiny.vae.encode(torch.randn(2, 3, 64, 64)).latent_dist.sample()
    assert latent.shape == (2, 4, 16, 16) and tiny.vae.decode(latent).sample.shape == (2, 3, 64, 64)
    text = clip_text_token(tiny.clip, torch.randint(0, 510, (2, 77)))
    image = clip_image_token(tiny.clip, torch.randn(2, 1, 64, 64))
    for token in (text, image):
        assert token.shape == (2, 1, 32) and torch.allclose(token.norm(dim=-1), torch.ones(2, 1), atol=1e-5)


def test_temporal_blocks_are_identity_on_images_and_act_on_video():
    from xgem_dist.model.temporal import CLIPTemporalBlock, SpatioTemporalBlock

    torch.manual_seed(0)
    block = SpatioTemporalBlock(32, heads=4, groups=8)
    for p in block.parameters():  # released blocks are not at their zero init
        torch.nn.init.normal_(p, std=0.05)
    image = torch.randn(2, 32, 8, 8, requires_grad=True)
    assert block(image) is image
    video = torch.randn(2, 32, 5, 8, 8, requires_grad=True)
    out = block(video)
    assert out.shape == video.shape and not torch.allclose(out, video)
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    # frames only see the past and present through the shifts, and attention mixes all frames
    assert not torch.allclose(block(video)[:, :, 0], block(video.roll(1, dims=2))[:, :, 1])

    clip_block = CLIPTemporalBlock(32, heads=4)
    for p in clip_block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    tokens = torch.randn(6, 5, 32)
    assert clip_block(tokens) is tokens
    mixed = clip_block(tokens, num_frames=3)
    assert mixed.shape == tokens.shape and not torch.allclose(mixed, tokens)


def test_released_layout_image_unet_equals_lean_on_images():
    from xgem_dist.model.image_unet import ImageUNet

    cfg = build_xgem("tiny", device="meta").config.image_unet
    torch.manual_seed(0)
    lean = ImageUNet(cfg)
    full = ImageUNet(dataclasses.replace(cfg, temporal=True))
    missing, unexpected = full.load_state_dict(lean.state_dict(), strict=False)
    assert not unexpected and missing and all("temporal" in k for k in missing)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 1, 32)
    env = lean.environment(x, t)
    assert torch.allclose(full(x, t, ctx, env=env), lean(x, t, ctx, env=env), atol=1e-5)
    assert torch.allclose(full.environment(x, t), env, atol=1e-6)


@pytest.mark.parametrize("stream", ["unet_frontal", "unet_text"])
def test_released_skip_mode_feeds_the_middle_output_twice_to_the_first_decoder_block(stream):
    tiny = build_xgem("tiny", device="meta").config
    outputs, first_inputs = {}, {}
    for mode in ("standard", "released"):
        cfg = dataclasses.replace(tiny, image_unet=dataclasses.replace(tiny.image_unet, skip_mode=mode),
                                  text_unet=dataclasses.replace(tiny.text_unet, skip_mode=mode))
        torch.manual_seed(0)
        unet = getattr(build_xgem(cfg), stream)
        first = unet.unet.up_blocks[0].resnets[0] if stream == "unet_frontal" else unet.up_resnets[0]
        first.register_forward_pre_hook(lambda _, args, mode=mode: first_inputs.__setitem__(mode, args[0]))
        x = torch.randn(2, 4, 16, 16) if stream == "unet_frontal" else torch.randn(2, 32)
        with torch.no_grad():
            outputs[mode] = unet(x, torch.tensor([3, 700]), torch.randn(2, 1, 32))
    for mode, h in first_inputs.items():
        half = h.shape[1] // 2
        assert torch.equal(h[:, :half], h[:, half:]) == (mode == "released")
    assert not torch.allclose(outputs["standard"], outputs["released"])


def test_presets_state_how_they_compute_and_old_configs_load_as_they_computed():
    from xgem_dist.model.export import config_from_dict, config_to_dict
    from xgem_dist.model.image_unet import ImageUNet, ImageUNetConfig
    from xgem_dist.model.xgem import PRESETS, XGeMConfig, computes_differently

    released, lean = PRESETS["xgem"], PRESETS["xgem-lean"]
    assert (released.image_unet.skip_mode, released.text_unet.skip_mode, released.wiring) == ("released",) * 3
    for name in ("xgem-lean", "tiny"):
        cfg = PRESETS[name]
        assert (cfg.image_unet.skip_mode, cfg.text_unet.skip_mode, cfg.wiring) == ("standard", "standard", "paper")
    assert computes_differently(released, lean) == [
        "image_unet.skip_mode: 'released' vs 'standard'", "text_unet.skip_mode: 'released' vs 'standard'",
        "wiring: 'released' vs 'paper'"]
    data = config_to_dict(released)
    assert config_from_dict(data) == released
    del data["wiring"], data["image_unet"]["skip_mode"], data["text_unet"]["skip_mode"]  # a file from before
    old = config_from_dict(data)
    assert (old.image_unet.skip_mode, old.text_unet.skip_mode, old.wiring) == ("standard", "standard", "paper")
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict(config_to_dict(lean) | {"skips": "released"})
    with pytest.raises(ValueError, match="skip_mode"):
        ImageUNet(ImageUNetConfig(skip_mode="aliased"))
    with pytest.raises(ValueError, match="wiring"):
        XGeMConfig(wiring="swapped")
