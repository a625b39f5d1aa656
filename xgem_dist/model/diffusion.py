"""XGeM's latent-diffusion objectives: multi-prompt conditioning, CFG dropout, per-stream eps MSE and the
joint (environment-encoder) loss.

Joint wiring: in the paper each stream's connectors attend to the *other* streams' environment
vectors ("paper"); the released code lets every stream attend to its own vector ("released"), so
streams couple only through the shared context and the contrastive loss on the vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .encoders import IMAGE_LATENT_SCALE

TEXT_LATENT_SCALE = 4.3108
# prompt kinds, as indices into the table of empty-condition embeddings
PROMPT_TEXT, PROMPT_IMAGE, PROMPT_BOTH = 0, 1, 2


class PerSampleRandom:
    """Random draws made per sample from a seed of its own (e.g. derived from the sample's global index),
    so a sample's noise, timestep and prompt do not depend on the rank or micro-batch it lands in."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str | None = None):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators]).to(self.device, dtype)

    def randint(self, high: int) -> torch.Tensor:
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self.generators]).to(self.device)

    def rand(self) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(self.device)


@dataclass(frozen=True)
class GlobalBatch:
    """How one micro-batch's per-sample losses become its share of the loss over the whole global batch (every
    rank and accumulated micro-batch), so that loss and gradient do not depend on the world size or the
    accumulation. The engine averages gradients over `shares` (ranks x micro-batches), so each micro-batch
    returns `shares` times its part of the global figure.

    weight_total: the samples that have the target in the global batch (None: this micro-batch's own);
    gather: every rank's rows, with gradients back to this rank's rows (identity on one rank)."""

    weight_total: float | None = None
    shares: int = 1
    world_size: int = 1
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows

    def mean(self, per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        weights = torch.ones_like(per_sample) if weights is None else weights.to(per_sample)
        total = weights.sum().clamp(min=1) if self.weight_total is None else max(float(self.weight_total), 1.0)
        return self.shares * (per_sample * weights).sum() / total

    def contrastive(self, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None = None,
                    scale: torch.Tensor | float = 1.0, symmetric: bool = False) -> torch.Tensor:
        """Cross-entropy of scale * a @ b.T over the rows of the whole global batch where `rows` is true."""
        if self.shares != self.world_size:
            raise ValueError("a contrastive loss over the global batch needs grad_accum 1")
        rows = torch.ones(a.shape[0], dtype=torch.bool, device=a.device) if rows is None else rows
        keep = self.gather(rows.to(a.dtype).unsqueeze(1)).squeeze(1).detach() > 0
        logits = (scale * self.gather(a) @ self.gather(b).T).float()
        # rows outside the loss neither count nor compete (masked, not indexed: no data-dependent shapes)
        outside = ~(keep.unsqueeze(0) & keep.unsqueeze(1))
        labels = torch.arange(logits.shape[0], device=logits.device)
        losses = [F.cross_entropy(x.masked_fill(outside, torch.finfo(x.dtype).min / 2), labels, reduction="none")
                  for x in ((logits, logits.T) if symmetric else (logits,))]
        per_row = sum(losses) / len(losses)
        loss = (per_row * keep).sum() / keep.sum().clamp(min=1)
        return self.shares * loss / self.world_size


class LossParts:
    """What one micro-batch's loss was made of, for metrics and validation: per stream, the per-sample losses
    with their weights and timesteps (None where the objective has none); per global term (a contrastive loss
    over the whole global batch, the same value on every rank), its value."""

    def __init__(self):
        self.streams: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        self.globals: dict[str, torch.Tensor] = {}

    def add(self, name: str, per_sample: torch.Tensor, weights: torch.Tensor | None = None,
            t: torch.Tensor | None = None) -> None:
        self.streams[name] = (per_sample.detach().float(), weights, t)

    def add_global(self, name: str, value: torch.Tensor) -> None:
        self.globals[name] = value.detach().float()


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon")


@torch.no_grad()
def image_latents(vae, images: torch.Tensor, rng: PerSampleRandom) -> torch.Tensor:
    """images [B, 1 or 3, H, W] in [-1, 1] -> scaled VAE latent sample [B, 4, H/8, W/8], the posterior's
    noise drawn from each sample's own generator."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    posterior = vae.encode(images).latent_dist
    return posterior_latents(posterior.mean, posterior.logvar, rng)


def posterior_latents(mean: torch.Tensor, logvar: torch.Tensor, rng: PerSampleRandom) -> torch.Tensor:
    """A scaled sample of the VAE posterior N(mean, exp(logvar)) [B, 4, h, w], the noise drawn from each sample's
    own generator (the same draw as image_latents: a precomputed posterior gives the same latents)."""
    noise = rng.randn(mean.shape[1:], dtype=mean.dtype).to(mean.device)
    return (mean + torch.exp(0.5 * logvar) * noise) * IMAGE_LATENT_SCALE


@torch.no_grad()
def text_latents(optimus, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Optimus posterior mean, scaled: [B, latent_dim]."""
    return optimus.encode(input_ids, attention_mask)[0] * TEXT_LATENT_SCALE


@dataclass(frozen=True)
class PromptPolicy:
    cfg_dropout: float = 0.1


def multi_prompt_context(text: torch.Tensor, image: torch.Tensor, has_image: torch.Tensor, empty: torch.Tensor,
                         rng: PerSampleRandom, policy: PromptPolicy = PromptPolicy()):
    """Per sample one of: the image prompt, the text prompt, their mean (uniformly), text only where the
    sample has no image prompt; then with probability cfg_dropout the empty-condition embedding of that kind.

    text, image: [B, 1, D]; has_image: [B] bool; empty: [3, D] (text, image, both).
    Returns (context [B, 1, D], kind [B] in {PROMPT_TEXT, PROMPT_IMAGE, PROMPT_BOTH}, dropped [B] bool).
    """
    choice = rng.randint(3).to(text.device)
    kind = torch.where(has_image.to(text.device), choice, torch.full_like(choice, PROMPT_TEXT))
    both = (text + image) / 2
    context = torch.where((kind == PROMPT_IMAGE).view(-1, 1, 1), image,
                          torch.where((kind == PROMPT_BOTH).view(-1, 1, 1), both, text))
    dropped = rng.rand().to(text.device) < policy.cfg_dropout
    context = torch.where(dropped.view(-1, 1, 1), empty[kind].unsqueeze(1).to(context.dtype), context)
    return context, kind, dropped


def noisy(scheduler: DDPMScheduler, x0: torch.Tensor, rng: PerSampleRandom,
          t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, noise, t); t uniform over the training timesteps unless given."""
    if t is None:
        t = rng.randint(scheduler.config.num_train_timesteps).to(x0.device)
    noise = rng.randn(x0.shape[1:], dtype=x0.dtype).to(x0.device)
    return scheduler.add_noise(x0, noise, t), noise, t


def eps_mse(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per sample: the mean over its latent [B]."""
    return F.mse_loss(prediction.float(), noise.float(), reduction="none").flatten(1).mean(1)


def stream_loss(unet, scheduler: DDPMScheduler, x0: torch.Tensor, context: torch.Tensor,
                rng: PerSampleRandom, weights: torch.Tensor | None = None,
                batch: GlobalBatch = GlobalBatch(), t: torch.Tensor | None = None,
                parts: LossParts | None = None, name: str = "stream") -> torch.Tensor:
    """Single-stream denoising loss (connectors unused); weights mask samples that lack the target. t: fixed
    timesteps (validation) instead of uniform draws; parts: receives the per-sample losses under `name`."""
    x_t, noise, t = noisy(scheduler, x0, rng, t)
    per_sample = eps_mse(unet(x_t, t, context), noise)
    if parts is not None:
        parts.add(name, per_sample, weights, t)
    return batch.mean(per_sample, weights)


def joint_loss(unets: list, scheduler: DDPMScheduler, x0s: list[torch.Tensor], context: torch.Tensor,
               rng: PerSampleRandom, wiring: str = "paper", weights: torch.Tensor | None = None,
               batch: GlobalBatch = GlobalBatch(), t: torch.Tensor | None = None,
               parts: LossParts | None = None, names: tuple[str, str] = ("a", "b")) -> torch.Tensor:
    """Two streams denoised together with a shared t: (MSE_a + MSE_b + 2 * contrastive) / 2; the contrastive
    term is a cross-entropy over the environment vectors' cosine similarities (no temperature, as released)
    across the global batch's samples that have both streams."""
    if len(unets) != 2 or wiring not in ("paper", "released"):
        raise ValueError("joint_loss takes two streams and wiring 'paper' or 'released'")
    if t is None:
        t = rng.randint(scheduler.config.num_train_timesteps).to(x0s[0].device)
    x_ts, noises = [], []
    for x0 in x0s:
        x_t, noise, _ = noisy(scheduler, x0, rng, t)
        x_ts.append(x_t)
        noises.append(noise)
    envs = [unet.environment(x_t, t) for unet, x_t in zip(unets, x_ts)]
    attend = envs[::-1] if wiring == "paper" else envs
    mse = 0
    for unet, x_t, env, n, name in zip(unets, x_ts, attend, noises, names):
        per_sample = eps_mse(unet(x_t, t, context, env=env), n)
        if parts is not None:
            parts.add(name, per_sample, weights, t)
        mse = mse + batch.mean(per_sample, weights)
    contrastive = batch.contrastive(envs[0].squeeze(1), envs[1].squeeze(1), weights)
    if parts is not None:
        parts.add_global("contrastive", contrastive)
    return (mse + 2 * contrastive) / 2
