"""Writes tests/fixtures/xgem_fidelity.npz: what the official XGeM classes compute on a reduced configuration
with the seeded weights and inputs of tests/fidelity_recipe.py. tests/test_fidelity.py checks our modules
against it on CI, without the official code.

Official code: github.com/danielemolino/XGeM at commit fc06dccf75db8c81b76f06f78e7b9b283cbd6169, built from its
own yaml configs (configs/model/*.yaml through core.cfg_helper.model_cfg_bank and get_model), with the sizes
reduced below; CPU, fp32, eval mode. Run it in an environment of its own (never the project's):

    git clone https://github.com/danielemolino/XGeM /tmp/xgem && git -C /tmp/xgem checkout fc06dcc
    python3 -m venv /tmp/venv-official
    /tmp/venv-official/bin/pip install torch==2.13.0 transformers==4.26.0 einops easydict pyyaml tqdm six pillow numpy
    /tmp/venv-official/bin/python tests/make_fidelity_reference.py /tmp/xgem tests/fixtures/xgem_fidelity.npz

The official code imports torchvision, decord, streamlit and pytorch_lightning without needing them here
(stand-in modules below), and takes CLIP's tokenizer, processor and config from the hub: the config is
written out below, the processor is transformers' CLIPFeatureExtractor with openai/clip-vit-large-patch14's
preprocessor values (image side reduced), and token ids are given directly.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
import transformers
import transformers.image_transforms  # noqa: F401  (before the stand-ins: transformers probes those packages)
from transformers import CLIPFeatureExtractor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity_recipe as recipe  # noqa: E402

COMMIT = "fc06dccf75db8c81b76f06f78e7b9b283cbd6169"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
UNET = {"model_channels": 64, "channel_mult": [1, 2, 2, 2], "channel_mult_connector": [1, 2, 2],
        "connector_output_channel": 48, "context_dim": recipe.CONTEXT_DIM}
REDUCED = {
    "vae_ddconfig": {"resolution": recipe.IMAGE_SIZE, "ch": 32, "ch_mult": [1, 1, 2, 2]},
    "bert": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
             "max_position_embeddings": 64},
    "gpt2": {"hidden_size": 32, "n_embd": 32, "n_head": 2, "num_attention_heads": 2, "n_layer": 2,
             "num_hidden_layers": 2, "n_ctx": 64, "n_positions": 64, "max_position_embeddings": 64},
    "image_unet": UNET,
    "text_unet": UNET | {"input_channels": recipe.LATENT_DIM, "output_channels": recipe.LATENT_DIM},
    "clip_text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": recipe.CONTEXT_DIM},
    "clip_vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "image_size": recipe.CLIP_IMAGE_SIZE, "patch_size": 8, "projection_dim": recipe.CONTEXT_DIM},
}


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return self


def build_official(root: Path):
    for name in ("torchvision", "torchvision.models", "torchvision.transforms", "streamlit", "decord",
                 "pytorch_lightning"):
        sys.modules[name] = _StandIn(name)
    sys.path.insert(0, str(root))
    os.chdir(root)  # the yaml configs and Optimus' vocabularies are read from relative paths
    from core.cfg_helper import model_cfg_bank
    from core.models import get_model
    from core.models.encoders import clip as official_clip
    from core.models.encoders.clip_modules import CLIPConfig

    cfg = model_cfg_bank()("MedCoDi_M")
    args = cfg.args
    args.autokl_cfg.args.ddconfig.update(REDUCED["vae_ddconfig"])
    args.optimus_cfg.args.encoder.args.config.update(REDUCED["bert"])
    args.optimus_cfg.args.encoder.args.latent_size = recipe.LATENT_DIM
    args.optimus_cfg.args.decoder.args.config.update(REDUCED["gpt2"] | {"latent_size": recipe.LATENT_DIM})
    args.optimus_cfg.args.args.latent_size = recipe.LATENT_DIM
    for view in ("frontal", "lateral"):
        args.unet_config.args[f"unet_{view}_cfg"].args.update(REDUCED["image_unet"])
    args.unet_config.args.unet_text_cfg.args.update(REDUCED["text_unet"])
    clip_config = CLIPConfig(text_config_dict=REDUCED["clip_text"], vision_config_dict=REDUCED["clip_vision"],
                             projection_dim=recipe.CONTEXT_DIM)
    side = recipe.CLIP_IMAGE_SIZE
    official_clip.CLIPConfig.from_pretrained = staticmethod(lambda *a, **k: clip_config)
    official_clip.CLIPTokenizer.from_pretrained = staticmethod(lambda *a, **k: None)  # token ids are given
    official_clip.CLIPProcessor.from_pretrained = staticmethod(lambda *a, **k: CLIPFeatureExtractor(
        do_resize=True, size=side, resample=3, do_center_crop=True, crop_size=side, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD))
    net = get_model()(cfg).eval()
    from core.models.ddim.ddim_vd import DDIMSampler_VD

    return net, DDIMSampler_VD(net)


def seed_weights(net) -> dict:
    """Fills every parameter from the recipe; returns the names and shapes the test needs."""
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(recipe.seeded_tensor(name, tuple(p.shape)))
    by_storage = {p.data_ptr(): name for name, p in params.items()}
    state = net.state_dict()
    aliases = {k: by_storage[v.data_ptr()] for k, v in state.items()
               if k not in params and v.data_ptr() in by_storage}
    buffers = sorted(k for k in state if k not in params and k not in aliases)
    return {"parameters": {k: list(p.shape) for k, p in params.items()}, "aliases": aliases, "buffers": buffers}


def padded(sequences: list[torch.Tensor]) -> torch.Tensor:
    """Token sequences (<BOS> ... <EOS>) in one array, padded with -1."""
    return torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=-1)


def subsample(images: torch.Tensor) -> torch.Tensor:
    """Every 4th pixel each way: enough to compare decoded images, small enough to store."""
    return images[..., ::4, ::4]


@torch.no_grad()
def reference(net, sampler) -> dict[str, torch.Tensor]:
    x = recipe.seeded_inputs()
    unets = net.model.diffusion_model
    t, ctx = x["unet_t"], x["unet_context"]
    out = {}

    def unet(xs, types_):
        return unets(xs, t, [ctx], types_, ["text"], env_enc=len(types_) > 1)

    out["unet_frontal"] = unet([x["unet_x_image"]], ["frontal"])[0]
    out["unet_text"] = unet([x["unet_x_text"]], ["text"])[0]
    (out["joint_fl_frontal"], out["joint_fl_lateral"]), (out["env_frontal"], out["env_lateral"]) = unet(
        [x["unet_x_image"], x["unet_x_image"].flip(0)], ["frontal", "lateral"])
    (out["joint_tl_text"], out["joint_tl_lateral"]), (out["env_text"], _) = unet(
        [x["unet_x_text"], x["unet_x_image"]], ["text", "lateral"])

    posterior = net.autokl.encode(x["vae_image"])
    out["vae_mean"], out["vae_logvar"] = posterior.mean, posterior.logvar
    out["vae_decoded"] = subsample(net.autokl.decode(x["vae_latent"]))

    bert = x["bert_ids"]
    pooled = net.optimus.encoder(bert, attention_mask=(bert > 0))[1]
    out["optimus_mean"], out["optimus_logvar"] = net.optimus.encoder.linear(pooled).chunk(2, -1)
    logits = net.optimus.decoder(input_ids=x["gpt_ids"], past=x["optimus_latent"])[0]
    out["optimus_logits_subset"] = logits[..., x["vocab_subset"]]
    out["optimus_logsumexp"] = logits.logsumexp(-1)
    torch.manual_seed(recipe.GENERATE_SEED)
    generated = net.optimus.decode(x["optimus_latent"], temperature=1.0, max_length=recipe.GENERATE_MAX_LENGTH)
    out["optimus_generated"] = padded(generated)

    out["clip_text"] = net.clip_encode_text(x["clip_ids"])
    out["clip_pixels"] = net.clip.processor(
        images=list(x["clip_images"].expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()),
        return_tensors="pt")["pixel_values"]
    out["clip_image"] = net.clip_encode_vision(x["clip_images"])

    out["temporal_unet"] = unets.unet_frontal.input_blocks[1][0][1](x["unet_video"])
    out["temporal_vae"] = net.autokl.decoder.mid.video_att(x["vae_video"])
    out["temporal_clip"] = net.clip.model.vision_model.encoder.layers[0].temporal_self_attn(x["clip_video"])

    out.update(sample(net, sampler, x))
    return out


def sample(net, sampler, x) -> dict[str, torch.Tensor]:
    """T->F and F->T+L as demo_model.py runs them (50 steps there, fewer here), batch 2."""
    side = recipe.IMAGE_SIZE // 8
    text = torch.cat([net.clip_encode_text(recipe.uncond_clip_ids()), net.clip_encode_text(x["sampler_text_ids"])])
    image = x["sampler_image"]
    frontal = torch.cat([net.clip_encode_vision(torch.zeros_like(image)), net.clip_encode_vision(image)])
    weights = {"lateral": 1, "text": 1, "frontal": 1}
    out = {}
    torch.manual_seed(recipe.SAMPLER_SEED)
    z, _ = sampler.sample(steps=recipe.SAMPLER_STEPS, shape=[[recipe.BATCH, 4, side, side]], condition=[text],
                          unconditional_guidance_scale=7.5, xtype=["frontal"], condition_types=["text"], eta=1,
                          verbose=False, mix_weight=weights)
    out["t2f_latent"] = z[0]
    out["t2f_image"] = subsample(torch.clamp((net.autokl_decode(z[0]) + 1.0) / 2.0, 0.0, 1.0)[:, :1])
    torch.manual_seed(recipe.SAMPLER_SEED)
    z, _ = sampler.sample(steps=recipe.SAMPLER_STEPS, shape=[[recipe.BATCH, recipe.LATENT_DIM],
                                                             [recipe.BATCH, 4, side, side]],
                          condition=[frontal], unconditional_guidance_scale=7.5, xtype=["text", "lateral"],
                          condition_types=["frontal"], eta=1, verbose=False, mix_weight=weights)
    out["f2tl_text_latent"], out["f2tl_lateral_latent"] = z
    tokens = net.optimus_decode(z[0], max_length=recipe.GENERATE_MAX_LENGTH)  # the RNG continues, as in the demo
    out["f2tl_tokens"] = padded(tokens)
    out["f2tl_lateral_image"] = subsample(torch.clamp((net.autokl_decode(z[1]) + 1.0) / 2.0, 0.0, 1.0)[:, :1])
    return out


def main() -> None:
    root, target = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    torch.set_grad_enabled(False)
    net, sampler = build_official(root)
    layout = seed_weights(net)
    outputs = reference(net, sampler)
    meta = {"official_commit": COMMIT, "reduced": REDUCED, "layout": layout,
            "betas": net.betas.tolist(), "torch": torch.__version__, "transformers": transformers.__version__}
    arrays = {k: v.contiguous().numpy() for k, v in outputs.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {target} ({target.stat().st_size / 1024:.0f} KiB, {len(arrays)} outputs)")


if __name__ == "__main__":
    main()
