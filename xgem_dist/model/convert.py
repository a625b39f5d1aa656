"""Checkpoint interop with the released XGeM (danielemolino/XGeM, `MedCoDi_M`): state_dict names both ways.

The released model uses LDM/CoDi module names; ours are diffusers/transformers names. The table of
name prefixes is generated from the model config (levels, layers per level), so it serves every
preset with the released structure. Where the release stores a 1x1 convolution and we use a Linear
(text-UNet MLP blocks, VAE mid-block attention), weights are reshaped; nothing else changes.
Buffers the release saves but we derive (the DDPM schedule, GPT-2's causal masks, CLIP's position
ids) are dropped on import (the schedule is checked first) and re-created on export.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .diffusion import training_scheduler
from .xgem import XGeMConfig

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
FC_RESNET = RESNET | {"in_layers.2": "linear1", "out_layers.3": "linear2", "skip_connection": "shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
GPT2_MASK = re.compile(r"^optimus\.decoder\.transformer\.h\.\d+\.attn\.bias$")
CLIP_POSITION_IDS = ("clip.model.text_model.embeddings.position_ids", "clip.model.vision_model.embeddings.position_ids")


@dataclass(frozen=True)
class Rule:
    released: str  # name prefix in the release (a module path)
    ours: str  # module path in our model
    inner: dict[str, str] | None = None  # renames inside the module
    conv_weights: tuple[str, ...] = ()  # our Linears (inner names) that the release stores as 1x1 convs


def _unet_rules(released: str, ours: str, levels: int, layers: int, attn_levels: int, text: bool,
                temporal: bool) -> list[Rule]:
    res_inner = FC_RESNET if text else RESNET
    core = ours if text else f"{ours}unet."
    rules = [Rule(f"{released}time_embed.0", f"{core}time_embedding.linear_1"),
             Rule(f"{released}time_embed.2", f"{core}time_embedding.linear_2"),
             Rule(f"{released}input_blocks.0.0", f"{ours}linear_in" if text else f"{ours}unet.conv_in"),
             Rule(f"{released}out.0", f"{ours}norm_out" if text else f"{ours}unet.conv_norm_out"),
             Rule(f"{released}out.2", f"{ours}linear_out" if text else f"{ours}unet.conv_out")]

    def resnet(rel: str, our: str, temporal_path: str | None) -> list[Rule]:
        if text:
            return [Rule(rel, our, res_inner, conv_weights=("linear1", "linear2", "shortcut"))]
        if not temporal:
            return [Rule(rel, our, res_inner)]
        return [Rule(f"{rel}.0", our, res_inner), Rule(f"{rel}.1", temporal_path)]

    k = 0
    for level in range(levels):
        for j in range(layers):
            index = 1 + level * (layers + 1) + j
            if text:
                our_res, our_attn = f"{ours}down_resnets.{k}", f"{ours}down_attentions.{k}"
            else:
                our_res = f"{ours}unet.down_blocks.{level}.resnets.{j}"
                our_attn = f"{ours}unet.down_blocks.{level}.attentions.{j}"
            rules += resnet(f"{released}input_blocks.{index}.0", our_res, f"{ours}temporal_down.{k}")
            if level < attn_levels:
                rules.append(Rule(f"{released}input_blocks.{index}.1", our_attn))
                rules.append(Rule(f"{released}input_block_connecters_in.{index}.0",
                                  f"{ours}down_connectors.{level * layers + j}"))
            k += 1
        if level < levels - 1:
            index = 1 + level * (layers + 1) + layers
            if text:
                rules.append(Rule(f"{released}input_blocks.{index}.0", f"{ours}downsamplers.{level}"))
            else:
                rules.append(Rule(f"{released}input_blocks.{index}.0.op",
                                  f"{ours}unet.down_blocks.{level}.downsamplers.0.conv"))
    for i, rel in enumerate(("middle_block.0", "middle_block.2")):
        our = f"{ours}mid_resnets.{i}" if text else f"{ours}unet.mid_block.resnets.{i}"
        rules += resnet(f"{released}{rel}", our, f"{ours}temporal_mid.{i}")
    rules.append(Rule(f"{released}middle_block.1",
                      f"{ours}mid_attention" if text else f"{ours}unet.mid_block.attentions.0"))
    k = 0
    for i in range(levels):
        level = levels - 1 - i
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            attn_index = (i - (levels - attn_levels)) * (layers + 1) + j  # among the up blocks with attention
            if text:
                our_res, our_attn = f"{ours}up_resnets.{k}", f"{ours}up_attentions.{attn_index}"
            else:
                our_res = f"{ours}unet.up_blocks.{i}.resnets.{j}"
                our_attn = f"{ours}unet.up_blocks.{i}.attentions.{j}"
            rules += resnet(f"{released}output_blocks.{index}.0", our_res, f"{ours}temporal_up.{k}")
            if level < attn_levels:
                rules.append(Rule(f"{released}output_blocks.{index}.1", our_attn))
                rules.append(Rule(f"{released}output_block_connecters_in.{index}.0",
                                  f"{ours}up_connectors.{attn_index}"))
            k += 1
        if level > 0:
            index = i * (layers + 1) + layers
            slot = 2 if level < attn_levels else 1
            if text:
                rules.append(Rule(f"{released}output_blocks.{index}.{slot}", f"{ours}upsamplers.{i}"))
            else:
                rules.append(Rule(f"{released}output_blocks.{index}.{slot}.conv",
                                  f"{ours}unet.up_blocks.{i}.upsamplers.0.conv"))
    # environment encoder: in, then [resnet, down] per attention level (no down after the last), out
    env_rel, env = f"{released}connecters_out", f"{ours}env_encoder"
    rules.append(Rule(f"{env_rel}.0.0", f"{env}.{'linear_in' if text else 'conv_in'}"))
    for level in range(attn_levels):
        rules += resnet(f"{env_rel}.{1 + 2 * level}.0", f"{env}.resnets.{level}", f"{env}.temporal.{level}")
        if level < attn_levels - 1:
            if text:
                rules.append(Rule(f"{env_rel}.{2 + 2 * level}.0", f"{env}.downsamplers.{level}"))
            else:
                rules.append(Rule(f"{env_rel}.{2 + 2 * level}.0.op", f"{env}.downsamplers.{level}.conv"))
    rules.append(Rule(f"{env_rel}.{2 * attn_levels}.0", f"{env}.norm_out"))
    rules.append(Rule(f"{env_rel}.{2 * attn_levels}.2", f"{env}.{'linear_out' if text else 'conv_out'}"))
    return rules


def _vae_rules(levels: int, temporal: bool) -> list[Rule]:
    rules = [Rule("autokl.quant_conv", "vae.quant_conv"), Rule("autokl.post_quant_conv", "vae.post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [Rule(f"autokl.{part}.conv_in", f"vae.{part}.conv_in"),
                  Rule(f"autokl.{part}.conv_out", f"vae.{part}.conv_out"),
                  Rule(f"autokl.{part}.norm_out", f"vae.{part}.conv_norm_out"),
                  Rule(f"autokl.{part}.mid.block_1", f"vae.{part}.mid_block.resnets.0", VAE_RESNET),
                  Rule(f"autokl.{part}.mid.block_2", f"vae.{part}.mid_block.resnets.1", VAE_RESNET),
                  Rule(f"autokl.{part}.mid.attn_1", f"vae.{part}.mid_block.attentions.0", VAE_ATTENTION,
                       conv_weights=("to_q", "to_k", "to_v", "to_out.0"))]
    for level in range(levels):
        for j in range(2):
            rules.append(Rule(f"autokl.encoder.down.{level}.block.{j}",
                              f"vae.encoder.down_blocks.{level}.resnets.{j}", VAE_RESNET))
        if level < levels - 1:
            rules.append(Rule(f"autokl.encoder.down.{level}.downsample.conv",
                              f"vae.encoder.down_blocks.{level}.downsamplers.0.conv"))
        up = levels - 1 - level  # the release numbers decoder levels from the highest resolution
        for j in range(3):
            rules.append(Rule(f"autokl.decoder.up.{level}.block.{j}",
                              f"vae.decoder.up_blocks.{up}.resnets.{j}", VAE_RESNET))
        if level > 0:
            rules.append(Rule(f"autokl.decoder.up.{level}.upsample.conv",
                              f"vae.decoder.up_blocks.{up}.upsamplers.0.conv"))
    if temporal:
        rules.append(Rule("autokl.decoder.mid.video_att", "vae.decoder.temporal_blocks.0"))
        for level in range(levels - 1, 0, -1):
            for j in range(3):
                rules.append(Rule(f"autokl.decoder.up.{level}.video_attn.{j}",
                                  f"vae.decoder.temporal_blocks.{1 + (levels - 1 - level) * 3 + j}"))
    return rules


def conversion_rules(cfg: XGeMConfig) -> list[Rule]:
    image, text = cfg.image_unet, cfg.text_unet
    rules = []
    for view in ("frontal", "lateral"):
        rules += _unet_rules(f"model.diffusion_model.unet_{view}.", f"unet_{view}.", len(image.block_out_channels),
                             image.layers_per_block, image.attention_levels, text=False, temporal=image.temporal)
    rules += _unet_rules("model.diffusion_model.unet_text.", "unet_text.", len(text.block_out_channels),
                         text.layers_per_block, text.attention_levels, text=True, temporal=False)
    rules += _vae_rules(len(cfg.vae.block_out_channels), cfg.vae.temporal)
    rules += [Rule("optimus.encoder.linear", "optimus.to_posterior"),
              Rule("optimus.decoder.transformer.linear_emb", "optimus.latent_to_embedding"),
              Rule("optimus.decoder.transformer.linear", "optimus.latent_to_memory"),
              Rule("optimus.encoder", "optimus.encoder"), Rule("optimus.decoder", "optimus.decoder"),
              Rule("clip.model", "clip")]
    return rules


def _match(name: str, rules: list[Rule], released_side: bool) -> tuple[Rule, str] | None:
    """The most specific rule whose prefix (on the given side) is a module prefix of name, and the rest."""
    best = None
    for rule in rules:
        prefix = rule.released if released_side else rule.ours
        if name.startswith(prefix + ".") and (best is None or len(prefix) > len(best[0])):
            best = (prefix, rule)
    if best is None:
        return None
    return best[1], name[len(best[0]) + 1 :]


def _rename_inner(rest: str, inner: dict[str, str] | None, forward: bool) -> str:
    if not inner:
        return rest
    table = inner if forward else {v: k for k, v in inner.items()}
    for source in sorted(table, key=len, reverse=True):
        if rest == source or rest.startswith(source + "."):
            return table[source] + rest[len(source) :]
    return rest


def released_to_ours(name: str, rules: list[Rule]) -> str | None:
    """Our name for a released tensor; None for the buffers we derive instead of storing."""
    if name in SCHEDULE_BUFFERS or name in CLIP_POSITION_IDS or GPT2_MASK.match(name):
        return None
    found = _match(name, rules, released_side=True)
    if found is None:
        raise KeyError(f"no conversion rule for released tensor {name!r}")
    rule, rest = found
    return f"{rule.ours}.{_rename_inner(rest, rule.inner, forward=True)}"


def ours_to_released(name: str, rules: list[Rule]) -> tuple[str, bool]:
    """(released name, whether the release stores it as a 1x1 conv weight)."""
    found = _match(name, rules, released_side=False)
    if found is None:
        raise KeyError(f"no conversion rule for tensor {name!r}")
    rule, rest = found
    as_conv = any(rest == f"{module}.weight" for module in rule.conv_weights)
    return f"{rule.released}.{_rename_inner(rest, rule.inner, forward=False)}", as_conv


def schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM buffers the release saves, from our training schedule (LDM formulas, v_posterior 0)."""
    betas = training_scheduler().betas.double()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=betas.dtype), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    values = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    return {k: v.float() for k, v in values.items()}


def from_released(state_dict: dict[str, torch.Tensor], cfg: XGeMConfig,
                  target_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Released state_dict -> ours (strict: every tensor is used once and every target filled)."""
    rules = conversion_rules(cfg)
    out: dict[str, torch.Tensor] = {}
    if "betas" in state_dict and not torch.allclose(state_dict["betas"].float(), schedule_buffers()["betas"]):
        raise ValueError("the checkpoint's DDPM schedule differs from scaled_linear 0.00085 -> 0.012 over 1000 steps")
    for name, tensor in state_dict.items():
        ours = released_to_ours(name, rules)
        if ours is None:
            continue
        if ours not in target_shapes:
            raise KeyError(f"released {name!r} maps to {ours!r}, which the model does not have")
        if ours in out:
            raise KeyError(f"two released tensors map to {ours!r}")
        if math.prod(tensor.shape) != math.prod(target_shapes[ours]):
            raise ValueError(f"{name} {tuple(tensor.shape)} does not fit {ours} {tuple(target_shapes[ours])}")
        out[ours] = tensor.reshape(target_shapes[ours])
    missing = sorted(set(target_shapes) - set(out))
    if missing:
        raise KeyError(f"{len(missing)} tensors of the model have no released counterpart, e.g. {missing[:3]}")
    return out


def to_released(state_dict: dict[str, torch.Tensor], cfg: XGeMConfig) -> dict[str, torch.Tensor]:
    """Our state_dict -> the released names and shapes, with the derived buffers added."""
    rules = conversion_rules(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        released, as_conv = ours_to_released(name, rules)
        out[released] = tensor.reshape(*tensor.shape, 1, 1) if as_conv and tensor.ndim == 2 else tensor
    positions = cfg.optimus.gpt2_config().n_positions
    mask = torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions)
    for layer in range(cfg.optimus.gpt2_config().n_layer):
        out[f"optimus.decoder.transformer.h.{layer}.attn.bias"] = mask
    clip = cfg.clip.to_transformers()
    vision = clip.vision_config
    out[CLIP_POSITION_IDS[0]] = torch.arange(clip.text_config.max_position_embeddings).unsqueeze(0)
    out[CLIP_POSITION_IDS[1]] = torch.arange((vision.image_size // vision.patch_size) ** 2 + 1).unsqueeze(0)
    return out | schedule_buffers()
