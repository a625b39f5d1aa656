"""XGeM's latent-diffusion objectives: multi-prompt conditioning, CFG dropout, per-stream eps MSE and the
joint (environment-encoder) loss.

Joint wiring: in the paper each stream's connectors attend to the *other* streams' environment
vectors ("paper"); the released code lets every stream attend to its own vector ("released"), so
streams couple only through the shared context and the contrastive loss on the vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .encoders import IMAGE_LATENT_SCALE

TEXT_LATENT_SCALE = 4.3108
# prompt kinds, as indices into the table of empty-condition embeddings
PROMPT_TEXT, PROMPT_IMAGE, PROMPT_BOTH = 0, 1, 2


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon")


@torch.no_grad()
def image_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """images [B, 1 or 3, H, W] in [-1, 1] -> scaled VAE latent sample [B, 4, H/8, W/8]."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return vae.encode(images).latent_dist.sample() * IMAGE_LATENT_SCALE


@torch.no_grad()
def text_latents(optimus, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Optimus posterior mean, scaled: [B, latent_dim]."""
    return optimus.encode(input_ids, attention_mask)[0] * TEXT_LATENT_SCALE


@dataclass(frozen=True)
class PromptPolicy:
    cfg_dropout: float = 0.1


def multi_prompt_context(text: torch.Tensor, image: torch.Tensor, has_image: torch.Tensor, empty: torch.Tensor,
                         policy: PromptPolicy = PromptPolicy(), generator: torch.Generator | None = None):
    """Per sample one of: the image prompt, the text prompt, their mean (uniformly), text only where the
    sample has no image prompt; then with probability cfg_dropout the empty-condition embedding of that kind.

    text, image: [B, 1, D]; has_image: [B] bool; empty: [3, D] (text, image, both).
    Returns (context [B, 1, D], kind [B] in {PROMPT_TEXT, PROMPT_IMAGE, PROMPT_BOTH}, dropped [B] bool).
    """
    batch = text.shape[0]
    choice = torch.randint(0, 3, (batch,), generator=generator, device=text.device)
    kind = torch.where(has_image.to(text.device), choice, torch.full_like(choice, PROMPT_TEXT))
    both = (text + image) / 2
    context = torch.where((kind == PROMPT_IMAGE).view(-1, 1, 1), image,
                          torch.where((kind == PROMPT_BOTH).view(-1, 1, 1), both, text))
    dropped = torch.rand(batch, generator=generator, device=text.device) < policy.cfg_dropout
    context = torch.where(dropped.view(-1, 1, 1), empty[kind].unsqueeze(1).to(context.dtype), context)
    return context, kind, dropped


def noisy(scheduler: DDPMScheduler, x0: torch.Tensor, generator: torch.Generator | None = None):
    """(x_t, noise, t) with t uniform over the training timesteps."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator,
                      device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return scheduler.add_noise(x0, noise, t), noise, t


def eps_mse(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's latent, then over the batch."""
    return F.mse_loss(prediction.float(), noise.float(), reduction="none").flatten(1).mean(1).mean()


def stream_loss(unet, scheduler: DDPMScheduler, x0: torch.Tensor, context: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Single-stream denoising loss (connectors unused)."""
    x_t, noise, t = noisy(scheduler, x0, generator)
    return eps_mse(unet(x_t, t, context), noise)


def environment_contrastive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over cosine similarities of paired environment vectors (no temperature, as released)."""
    logits = a.squeeze(1) @ b.squeeze(1).T
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def joint_loss(unets: list, scheduler: DDPMScheduler, x0s: list[torch.Tensor], context: torch.Tensor,
               wiring: str = "paper", generator: torch.Generator | None = None) -> torch.Tensor:
    """Two streams denoised together with a shared t: (MSE_a + MSE_b + 2 * contrastive) / 2."""
    if len(unets) != 2 or wiring not in ("paper", "released"):
        raise ValueError("joint_loss takes two streams and wiring 'paper' or 'released'")
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0s[0].shape[0],), generator=generator,
                      device=x0s[0].device)
    noises = [torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) for x in x0s]
    x_ts = [scheduler.add_noise(x, n, t) for x, n in zip(x0s, noises)]
    envs = [unet.environment(x_t, t) for unet, x_t in zip(unets, x_ts)]
    attend = envs[::-1] if wiring == "paper" else envs
    mse = sum(eps_mse(unet(x_t, t, context, env=env), n) for unet, x_t, env, n in zip(unets, x_ts, attend, noises))
    return (mse + 2 * environment_contrastive(envs[0], envs[1])) / 2
