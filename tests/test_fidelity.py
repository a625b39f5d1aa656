"""Released-model fidelity: with the official weights, our modules compute what the official classes compute.

tests/fixtures/xgem_fidelity.npz holds the official code's outputs (danielemolino/XGeM at fc06dcc) for a
reduced configuration with seeded weights and inputs (tests/fidelity_recipe.py); the generator that wrote
it is tests/make_fidelity_reference.py. Here the same weights go through convert.from_released into our
`released_function` configuration of the same sizes, and every component must agree to 1e-4 relative
(max |ours - official| / max |official|); sampled tokens must be identical.

`python -m tests.test_fidelity` prints the agreement table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xgem_dist.model.clip_preprocess import clip_pixels
from xgem_dist.model.convert import conversion_rules, from_released, released_to_ours
from xgem_dist.model.encoders import CLIPTowersConfig, VAEConfig, clip_image_token, clip_text_token
from xgem_dist.model.image_unet import ImageUNetConfig
from xgem_dist.model.optimus import OptimusConfig
from xgem_dist.model.sample import Sampler, SamplerConfig
from xgem_dist.model.text_unet import TextUNetConfig
from xgem_dist.model.tokenizers import Tokenizers
from xgem_dist.model.xgem import XGeMConfig, build_xgem, released_function

from . import fidelity_recipe as recipe

FIXTURE = Path(__file__).parent / "fixtures" / "xgem_fidelity.npz"
TOLERANCE = 1e-4
_UNET = {"block_out_channels": (64, 128, 128, 128), "num_heads": 8, "context_dim": recipe.CONTEXT_DIM,
         "connector_dim": 48, "norm_num_groups": 32, "env_base_channels": 32}
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
CONFIG = released_function(XGeMConfig(
    image_unet=ImageUNetConfig(temporal=True, **_UNET),
    text_unet=TextUNetConfig(latent_dim=recipe.LATENT_DIM, **_UNET),
    vae=VAEConfig(block_out_channels=(32, 32, 64, 64), norm_num_groups=32, sample_size=recipe.IMAGE_SIZE,
                  temporal=True),
    optimus=OptimusConfig(latent_dim=recipe.LATENT_DIM,
                          bert=_SMALL | {"vocab_size": 28996, "max_position_embeddings": 64},
                          gpt2={"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}),
    clip=CLIPTowersConfig(text=_SMALL, vision=_SMALL | {"image_size": recipe.CLIP_IMAGE_SIZE, "patch_size": 8},
                          projection_dim=recipe.CONTEXT_DIM, temporal=True),
))
TEXTS = ["report-0", "report-1"]


class _ClipIds:
    """CLIP's tokenizer for the fixture's texts: the official run was given these token ids."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table

    def __call__(self, texts, **_):
        return {"input_ids": torch.stack([self.table[t] for t in texts])}


class _TokenIds:
    """Reports as their GPT-2 token ids (the official sampler returns ids)."""

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in ids]


def released_state(meta: dict) -> dict[str, torch.Tensor]:
    """The official state dict of the fixture's run: its parameters from the recipe, tied ones, the schedule."""
    layout = meta["layout"]
    state = recipe.seeded_parameters({k: tuple(v) for k, v in layout["parameters"].items()})
    state |= {alias: state[source] for alias, source in layout["aliases"].items()}
    state["betas"] = torch.tensor(meta["betas"], dtype=torch.float32)
    return state


def _tokens(official: np.ndarray) -> list[list[int]]:
    """Official <BOS> ... <EOS> rows (padded with -1) -> the tokens between."""
    return [[int(t) for t in row if t >= 0][1:-1] for row in official]


def _max_relative(ours: torch.Tensor, official: np.ndarray) -> float:
    reference = torch.from_numpy(official).float()
    return float((ours.detach().float() - reference).abs().max() / reference.abs().max())


@torch.no_grad()
def measure(model, fixture) -> tuple[dict[str, float], dict[str, tuple[list, list]]]:
    """{component: max relative difference}, {sampled output: (ours, official)} for tokens."""
    x = recipe.seeded_inputs()
    t, ctx = x["unet_t"], x["unet_context"]
    rel, tokens = {}, {}

    def compare(name: str, ours: torch.Tensor, key: str | None = None):
        rel[name] = max(rel.get(name, 0.0), _max_relative(ours, fixture[key or name]))

    image, text = x["unet_x_image"], x["unet_x_text"]
    compare("image UNet (single)", model.unet_frontal(image, t, ctx), "unet_frontal")
    compare("text UNet (single)", model.unet_text(text, t, ctx), "unet_text")
    pairs = {"frontal": (model.unet_frontal, image), "lateral": (model.unet_lateral, image.flip(0))}
    envs = {m: unet.environment(latent, t) for m, (unet, latent) in pairs.items()}
    for m, (unet, latent) in pairs.items():
        compare("environment vectors", envs[m], f"env_{m}")
        compare("image UNet (joint F+L)", unet(latent, t, ctx, env=envs[m]), f"joint_fl_{m}")
    env_text, env_lateral = model.unet_text.environment(text, t), model.unet_lateral.environment(image, t)
    compare("environment vectors", env_text, "env_text")
    compare("text UNet (joint T+L)", model.unet_text(text, t, ctx, env=env_text), "joint_tl_text")
    compare("image UNet (joint T+L)", model.unet_lateral(image, t, ctx, env=env_lateral), "joint_tl_lateral")

    posterior = model.vae.encode(x["vae_image"].expand(-1, 3, -1, -1)).latent_dist
    compare("VAE encode", posterior.mean, "vae_mean")
    compare("VAE encode", posterior.logvar, "vae_logvar")
    compare("VAE decode", model.vae.decode(x["vae_latent"]).sample[..., ::4, ::4], "vae_decoded")

    optimus = model.optimus
    mean, logvar = optimus.encode(x["bert_ids"], (x["bert_ids"] > 0).long())
    compare("Optimus encode", mean, "optimus_mean")
    compare("Optimus encode", logvar, "optimus_logvar")
    logits = optimus.decode_logits(x["optimus_latent"], x["gpt_ids"])
    compare("Optimus decode logits", logits[..., x["vocab_subset"]], "optimus_logits_subset")
    compare("Optimus decode logits", logits.logsumexp(-1), "optimus_logsumexp")
    generated = optimus.generate(x["optimus_latent"], recipe.GENERATE_MAX_LENGTH,
                                 generator=torch.Generator().manual_seed(recipe.GENERATE_SEED))
    tokens["Optimus generate"] = (generated, _tokens(fixture["optimus_generated"]))

    clip = model.clip
    compare("CLIP text token", clip_text_token(clip, x["clip_ids"]), "clip_text")
    pixels = clip_pixels(x["clip_images"], recipe.CLIP_IMAGE_SIZE)
    compare("CLIP image preprocessing", pixels, "clip_pixels")
    compare("CLIP image token (from [0,1] images)", clip_image_token(clip, pixels), "clip_image")

    compare("temporal blocks (video input)", model.unet_frontal.temporal_down[0](x["unet_video"]), "temporal_unet")
    compare("temporal blocks (video input)", model.vae.decoder.temporal_blocks[0](x["vae_video"]), "temporal_vae")
    clip_block = clip.vision_model.encoder.layers[0].temporal_self_attn
    video = x["clip_video"]  # official layout [tokens, frames, C]; ours [frames, tokens, C]
    compare("temporal blocks (video input)", clip_block(video.transpose(0, 1), num_frames=video.shape[1])
            .transpose(0, 1), "temporal_clip")

    table = dict(zip(TEXTS, x["sampler_text_ids"])) | {"": recipe.uncond_clip_ids()[0]}
    sampler = Sampler(model, Tokenizers(clip=_ClipIds(table), bert=None, gpt2=_TokenIds()),
                      SamplerConfig(steps=recipe.SAMPLER_STEPS, image_size=recipe.IMAGE_SIZE,
                                    max_report_tokens=recipe.GENERATE_MAX_LENGTH))
    seeded = lambda: torch.Generator().manual_seed(recipe.SAMPLER_SEED)  # noqa: E731
    out = sampler({"text": TEXTS}, ("frontal",), generator=seeded())
    compare("DDIM sampler T->F (latent)", out["latents"]["frontal"], "t2f_latent")
    compare("DDIM sampler T->F (image)", out["frontal"][..., ::4, ::4], "t2f_image")
    out = sampler({"frontal": x["sampler_image"]}, ("text", "lateral"), generator=seeded())
    compare("DDIM sampler F->T+L (latents)", out["latents"]["text"], "f2tl_text_latent")
    compare("DDIM sampler F->T+L (latents)", out["latents"]["lateral"], "f2tl_lateral_latent")
    compare("DDIM sampler F->T+L (lateral image)", out["lateral"][..., ::4, ::4], "f2tl_lateral_image")
    tokens["DDIM sampler F->T+L (report tokens)"] = ([[int(i) for i in r.split()] for r in out["text"]],
                                                     _tokens(fixture["f2tl_tokens"]))
    return rel, tokens


def load_fixture() -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(FIXTURE, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def converted_model(meta: dict):
    torch.manual_seed(0)
    model = build_xgem(CONFIG).eval()
    targets = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(from_released(released_state(meta), CONFIG, targets), strict=True)
    return model


@pytest.fixture(scope="module")
def fidelity():
    meta, arrays = load_fixture()
    return meta, measure(converted_model(meta), arrays)


def test_fixture_comes_from_the_official_commit(fidelity):
    meta, _ = fidelity
    assert meta["official_commit"].startswith("fc06dcc")
    rules = conversion_rules(CONFIG)
    # every buffer the official model saves is one we derive instead of storing
    assert all(released_to_ours(name, rules) is None for name in meta["layout"]["buffers"])


@pytest.mark.parametrize("component", [
    "image UNet (single)", "image UNet (joint F+L)", "image UNet (joint T+L)", "text UNet (single)",
    "text UNet (joint T+L)", "environment vectors", "VAE encode", "VAE decode", "Optimus encode",
    "Optimus decode logits", "CLIP text token", "CLIP image preprocessing", "CLIP image token (from [0,1] images)",
    "temporal blocks (video input)", "DDIM sampler T->F (latent)", "DDIM sampler T->F (image)",
    "DDIM sampler F->T+L (latents)", "DDIM sampler F->T+L (lateral image)"])
def test_component_matches_the_official(fidelity, component):
    _, (rel, _) = fidelity
    assert rel[component] <= TOLERANCE, f"{component}: max relative difference {rel[component]:.2e}"


@pytest.mark.parametrize("output", ["Optimus generate", "DDIM sampler F->T+L (report tokens)"])
def test_sampled_tokens_equal_the_official(fidelity, output):
    _, (_, tokens) = fidelity
    ours, official = tokens[output]
    assert ours == official
    assert all(len(row) == recipe.GENERATE_MAX_LENGTH - 2 for row in ours)  # <BOS> and the forced <EOS> count


if __name__ == "__main__":
    meta, arrays = load_fixture()
    rel, tokens = measure(converted_model(meta), arrays)
    print(f"agreement with danielemolino/XGeM@{meta['official_commit'][:7]} (max |ours - official| / max |official|)")
    for name, value in rel.items():
        print(f"  {name:<40} {value:.1e}")
    for name, (ours, official) in tokens.items():
        print(f"  {name:<40} {'identical' if ours == official else 'DIFFERENT'}")
