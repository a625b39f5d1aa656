"""Any-to-any sampling: DDIM with classifier-free guidance over one or two output streams.

Conditions (any of report text, frontal, lateral) become CLIP tokens and are mixed by their mean;
the unconditional branch mixes the empty report and the blank image the same way. Two outputs are
denoised together, their connectors attending to the environment vectors (`paper` wiring: each
stream attends to the other's; `released`: to its own).

Latents, the DDIM update and its noise stay float32 whatever the model's dtype; each network gets its
input in its own dtype. `generator` is one torch.Generator for the whole batch (the released sampler's
global RNG, drawn batch-wide) or one per item, so that an item's result does not depend on the others.
Random draws are made on the generators' device and moved to the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from .diffusion import IMAGE_LATENT_SCALE, TEXT_LATENT_SCALE
from .encoders import clip_image_token, clip_text_token
from .objectives import clip_pixels
from .tokenizers import Tokenizers
from .xgem import XGeM, check_wiring

Generators = torch.Generator | list[torch.Generator] | None

MODALITIES = ("text", "frontal", "lateral")
_LETTER = {"T": "text", "F": "frontal", "L": "lateral"}
COMBINATIONS = ("T->F", "F->L", "F->T", "L->T", "T->L", "L->F", "F+L->T", "F+T->L", "L+T->F", "F->T+L", "L->T+F",
                "T->F+L")


def parse_combination(spec: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """'F+T->L' -> (('frontal', 'text'), ('lateral',))."""
    given, _, wanted = spec.partition("->")
    try:
        return tuple(_LETTER[c] for c in given.split("+")), tuple(_LETTER[c] for c in wanted.split("+"))
    except KeyError as e:
        raise ValueError(f"bad combination {spec!r}: use T, F, L joined by + on each side of ->") from e


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 50
    eta: float = 1.0
    guidance: float = 7.5
    wiring: str = ""  # "paper" | "released"; "": the model's (XGeMConfig.wiring; `xgem`: released)
    image_size: int = 256
    max_report_tokens: int = 100


def ddim_scheduler(steps: int) -> DDIMScheduler:
    """The released sampler's grid: t = 980, 960, ..., 0 for 50 steps; the last step ends at alpha_bar_0."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=0, prediction_type="epsilon", timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    return scheduler


class Sampler:
    def __init__(self, model: XGeM, tokenizers: Tokenizers, cfg: SamplerConfig = SamplerConfig()):
        self.model, self.tokenizers, self.cfg = model, tokenizers, cfg
        self.wiring = check_wiring(cfg.wiring or model.config.wiring)
        self.unets = {"text": model.unet_text, "frontal": model.unet_frontal, "lateral": model.unet_lateral}

    def _text_tokens(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizers.clip(texts, padding="max_length", max_length=self.tokenizers.clip_max_length,
                                   truncation=True, return_tensors="pt")
        return clip_text_token(self.model.clip, enc["input_ids"].to(self._device)).float()

    def _image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        size = self.model.clip.config.vision_config.image_size
        pixels = clip_pixels(images.to(self._device), size).to(self.model.clip.dtype)
        return clip_image_token(self.model.clip, pixels).float()

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _contexts(self, inputs: dict, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        cond, uncond = [], []
        side = self.cfg.image_size
        for modality, value in inputs.items():
            if modality == "text":
                cond.append(self._text_tokens(list(value)))
                uncond.append(self._text_tokens([""] * batch))
            else:
                cond.append(self._image_tokens(value))
                uncond.append(self._image_tokens(torch.zeros(batch, 1, side, side)))
        return torch.stack(cond).mean(0), torch.stack(uncond).mean(0)

    def _initial_latent(self, modality: str, batch: int, generator: Generators) -> torch.Tensor:
        if modality == "text":
            shape = (batch, self.model.config.text_unet.latent_dim)
        else:
            factor = 2 ** (len(self.model.config.vae.block_out_channels) - 1)
            side = self.cfg.image_size // factor
            shape = (batch, self.model.config.image_unet.latent_channels, side, side)
        if isinstance(generator, list):
            return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]
                             ).to(self._device)
        device = generator.device if generator is not None else None
        return torch.randn(shape, generator=generator, device=device).to(self._device)

    def _eps(self, modality: str, x: torch.Tensor, steps: torch.Tensor, context: torch.Tensor,
             env: torch.Tensor | None) -> torch.Tensor:
        dtype = self._dtype(modality)
        return self.unets[modality](x.to(dtype), steps, context.to(dtype), env=env).float()

    def _dtype(self, modality: str) -> torch.dtype:
        return next(self.unets[modality].parameters()).dtype

    @torch.no_grad()
    def __call__(self, inputs: dict, outputs: tuple[str, ...], generator: Generators = None) -> dict:
        """inputs: {"text": list[str], "frontal"/"lateral": [B,1,H,W] in [0,1]}; returns the outputs, images as
        [B,1,image_size,image_size] in [0,1] and reports as lists of strings, plus their final latents."""
        unknown = set(inputs) - set(MODALITIES) | set(outputs) - set(MODALITIES)
        if unknown or not inputs or not outputs or set(inputs) & set(outputs) or len(outputs) > 2:
            raise ValueError(f"inputs {sorted(inputs)} and 1-2 outputs {outputs} must be distinct modalities")
        batch = len(next(iter(inputs.values())))
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        cond, uncond = self._contexts(inputs, batch)
        context = torch.cat([uncond, cond])
        scheduler = ddim_scheduler(self.cfg.steps)
        latents = {m: self._initial_latent(m, batch, generator) for m in outputs}
        for t in scheduler.timesteps:
            steps = torch.full((2 * batch,), int(t), device=self._device)
            env = {}
            if len(outputs) == 2:
                own = {m: self.unets[m].environment(torch.cat([latents[m]] * 2).to(self._dtype(m)), steps)
                       for m in outputs}
                env = own if self.wiring == "released" else {outputs[0]: own[outputs[1]],
                                                             outputs[1]: own[outputs[0]]}
            for m in outputs:
                x = torch.cat([latents[m]] * 2)
                eps_uncond, eps_cond = self._eps(m, x, steps, context, env.get(m)).chunk(2)
                eps = eps_uncond + self.cfg.guidance * (eps_cond - eps_uncond)
                latents[m] = scheduler.step(eps, t, latents[m], eta=self.cfg.eta, generator=generator).prev_sample
        result: dict = {"latents": latents}
        for m in outputs:
            if m == "text":
                ids = self.model.optimus.generate(latents[m] / TEXT_LATENT_SCALE, self.cfg.max_report_tokens,
                                                  generator=generator)
                result[m] = self.tokenizers.gpt2.batch_decode(ids, skip_special_tokens=True)
            else:
                decoded = self.model.vae.decode((latents[m] / IMAGE_LATENT_SCALE).to(self.model.vae.dtype)).sample
                result[m] = ((decoded.float() + 1) / 2).clamp(0, 1)[:, :1]
        return result
