"""The CLIP and Optimus training objectives (stages 1 and 2 of XGeM); the diffusion ones are in diffusion.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from .clip_preprocess import clip_pixels  # noqa: F401  (the CLIP stage's input, used with the loss)
from .diffusion import GlobalBatch, PerSampleRandom
from .encoders import clip_image_token, clip_text_token
from .optimus import Optimus

MAX_LOGIT_SCALE = math.log(100.0)


def clip_contrastive_loss(clip: CLIPModel, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                          batch: GlobalBatch = GlobalBatch()) -> torch.Tensor:
    """Symmetric InfoNCE between report and image tokens with CLIP's learnable temperature, over the global
    batch's rows where `rows` is true."""
    text = clip_text_token(clip, input_ids, attention_mask).squeeze(1)
    image = clip_image_token(clip, pixel_values).squeeze(1)
    return batch.contrastive(image, text, rows, scale=clip.logit_scale.exp(), symmetric=True)


@torch.no_grad()
def clamp_logit_scale(clip: CLIPModel) -> None:
    """After each optimizer step: keep the temperature's log in [0, ln 100]."""
    clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def cyclic_beta(step: int, total_steps: int, cycles: int = 1, ratio_zero: float = 0.5,
                ratio_increase: float = 0.25, beta_max: float = 1.0) -> float:
    """Optimus' KL weight: per cycle, 0 for ratio_zero of it, a linear ramp over ratio_increase, then beta_max."""
    period = total_steps / cycles
    position = (step % period) / period
    if position < ratio_zero:
        return 0.0
    return beta_max * min(1.0, (position - ratio_zero) / ratio_increase)


def optimus_loss(optimus: Optimus, bert_ids: torch.Tensor, gpt_ids: torch.Tensor, beta: float,
                 rng: PerSampleRandom, bert_mask: torch.Tensor | None = None, dim_target_kl: float = 3.0,
                 weights: torch.Tensor | None = None, batch: GlobalBatch = GlobalBatch()) -> dict[str, torch.Tensor]:
    """Token cross-entropy (summed over each report, padding ignored) + beta * KL, averaged over the batch's
    samples with weight.

    While beta is 0 the full KL is reported; once beta > 0 only the (sample, dimension) terms above
    dim_target_kl count (free bits), as in the released recipe.
    """
    mean, logvar = optimus.encode(bert_ids, bert_mask)
    noise = rng.randn(mean.shape[1:], dtype=mean.dtype).to(mean.device)
    z = mean + (0.5 * logvar).exp() * noise
    pad = optimus.decoder.config.pad_token_id
    logits = optimus.decode_logits(z, gpt_ids[:, :-1], (gpt_ids[:, :-1] != pad).long())
    reconstruction = F.cross_entropy(logits.transpose(1, 2).float(), gpt_ids[:, 1:], ignore_index=pad,
                                     reduction="none").sum(1)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1)
    if beta > 0:
        kl = kl * (kl > dim_target_kl)
    kl = kl.sum(1)
    per_sample = reconstruction + beta * kl
    return {"loss": batch.mean(per_sample, weights), "per_sample": per_sample.detach(),
            "reconstruction": reconstruction.mean(), "kl": kl.mean()}
