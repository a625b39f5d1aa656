"""The loss of each XGeM training stage as one nn.Module, so DeepSpeed wraps a single forward.

Every rank runs the same modules on every step (ZeRO-3 gathers parameters collectively): samples
that lack what a stage needs (a missing view, an empty report) are masked out of the loss, never
skipped. All randomness is drawn per sample from the sample's own seed (PerSampleRandom), and every
loss is a mean over the whole global batch (`global_batch`, set by the loop each step), so neither
depends on the world size. Frozen modules run in eval mode (no dropout in the targets they compute).

Conditioning: `online` runs the frozen encoders (VAE, CLIP, Optimus) on each micro-batch; `precomputed` takes
their outputs from the batch (the loader reads them from `xgem-dist precompute` shards) and draws the VAE
posterior sample from the same per-sample generator, so both give the same losses. The constant empty-prompt
embeddings are computed once per run (online: at the first forward, collectively on every rank) or read with the
precomputed shards.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.diffusion import (TEXT_LATENT_SCALE, GlobalBatch, LossParts, PerSampleRandom, PromptPolicy,
                               image_latents, joint_loss, multi_prompt_context, posterior_latents, stream_loss,
                               text_latents, training_scheduler)
from ..model.encoders import clip_image_token, clip_text_token
from ..model.objectives import clip_contrastive_loss, clip_pixels, cyclic_beta, optimus_loss
from ..model.tokenizers import Tokenizers
from ..data.loader import tokenize_reports
from ..data.precompute import empty_prompt_embeddings
from ..model.xgem import XGeM

CONDITIONING_MODES = ("online", "precomputed")
# the stages whose frozen-encoder inputs can be precomputed (clip and optimus train those encoders)
PRECOMPUTABLE_STAGES = ("frontal", "lateral", "text", "joint-text", "joint-frontal", "joint-lateral")
JOINT_STREAMS = {"joint-text": ("text", "lateral", "frontal"), "joint-frontal": ("frontal", "lateral", "text"),
                 "joint-lateral": ("lateral", "frontal", "text")}  # (trained stream, partner, condition)


class TrainingTask(nn.Module):
    def __init__(self, model: XGeM, stage: str, tokenizers: Tokenizers, total_steps: int,
                 wiring: str = "", cfg_dropout: float = 0.1, conditioning: str = "online",
                 empty: dict[str, torch.Tensor] | None = None):
        """empty: the empty-prompt embeddings {"text", "image"} [D] (precomputed conditioning gives them)."""
        super().__init__()
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        if conditioning == "precomputed" and stage not in PRECOMPUTABLE_STAGES:
            raise ValueError(f"stage {stage!r} trains a conditioning encoder: it needs conditioning online")
        if conditioning == "precomputed" and empty is None:
            raise ValueError("precomputed conditioning needs the precomputed empty-prompt embeddings")
        self.precomputed = conditioning == "precomputed"
        self._empty_cache = empty
        self.model, self.stage, self.tokenizers = model, stage, tokenizers
        self.total_steps, self.policy = total_steps, PromptPolicy(cfg_dropout)
        self.wiring = wiring or model.config.wiring  # "": the model's (XGeMConfig.wiring)
        self.scheduler = training_scheduler()
        self.step = 0  # set by the loop: the Optimus KL weight follows it
        self.global_batch = GlobalBatch()  # set by the loop before each step's micro-batches
        self.parts = LossParts()  # what the last forward's loss was made of
        self.unets = {"frontal": model.unet_frontal, "lateral": model.unet_lateral, "text": model.unet_text}
        # tokenized once here: the loader's thread uses the same (not thread-safe) fast tokenizers later
        self._empty_report_ids = tokenize_reports(tokenizers, [""])["clip_ids"]
        self.train()  # nothing else calls it before the first step: the frozen modules' dropout must be off

    def train(self, mode: bool = True) -> TrainingTask:
        """Trainable modules in train mode, every module whose parameters are all frozen in eval mode."""
        super().train(mode)
        for module in self.model.modules():
            flags = [p.requires_grad for p in module.parameters()]
            if flags and not any(flags):
                module.eval()
        return self

    def target_weights(self, batch: dict) -> torch.Tensor:
        """[B] bool: the samples that count in this stage's loss (the loop sums them over the global batch)."""
        frontal, lateral = batch["frontal_present"], batch["lateral_present"]
        valid = batch.get("valid", torch.ones(len(batch["seed"]), dtype=torch.bool)).to(frontal.device)
        has_report = torch.tensor([bool(r.strip()) for r in batch["report"]], device=frontal.device) & valid
        frontal, lateral = frontal & valid, lateral & valid
        if self.stage in ("frontal", "lateral"):
            return frontal if self.stage == "frontal" else lateral
        if self.stage in ("text", "optimus"):
            return has_report
        if self.stage == "clip":
            return has_report & (frontal | lateral)
        if self.stage in JOINT_STREAMS:
            return has_report & frontal & lateral
        raise ValueError(f"unknown stage {self.stage!r}")

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.unet_frontal.parameters()).dtype


    def _clip_image(self, images: torch.Tensor) -> torch.Tensor:
        size = self.model.clip.config.vision_config.image_size
        return clip_image_token(self.model.clip, clip_pixels(images, size).to(self._dtype))

    def _x0(self, modality: str, batch: dict, rng: PerSampleRandom) -> torch.Tensor:
        if modality == "text":
            if self.precomputed:
                return (batch["optimus_mean"] * TEXT_LATENT_SCALE).to(self._dtype)
            return text_latents(self.model.optimus, batch["bert_ids"], batch["bert_mask"])
        if self.precomputed:
            return posterior_latents(batch[f"vae_{modality}_mean"].to(self._dtype),
                                     batch[f"vae_{modality}_logvar"].to(self._dtype), rng)
        return image_latents(self.model.vae, (batch[modality] * 2 - 1).to(self._dtype), rng)

    @torch.no_grad()
    def _report_token(self, batch: dict) -> torch.Tensor:
        """[B, 1, D]: the CLIP embedding of each sample's report."""
        if self.precomputed:
            return batch["clip_report"].unsqueeze(1)
        return clip_text_token(self.model.clip, batch["clip_ids"])

    @torch.no_grad()
    def _image_token(self, batch: dict, view: str) -> torch.Tensor:
        """[B, 1, D]: the CLIP embedding of each sample's `view` image."""
        if self.precomputed:
            return batch[f"clip_{view}"].unsqueeze(1)
        return self._clip_image(batch[view])

    def _empty(self) -> dict[str, torch.Tensor]:
        if self._empty_cache is None:
            self._empty_cache = empty_prompt_embeddings(self.model.clip, self._empty_report_ids, self._device,
                                                        self._dtype)
        text, image = (self._empty_cache[kind].to(self._device) for kind in ("text", "image"))
        return {"text": text, "image": image, "both": (text + image) / 2}

    def forward(self, batch: dict) -> torch.Tensor:
        """batch: the loader's (images, presence, reports and, if the loader did not tokenize, none of the ids)."""
        if "clip_ids" not in batch and not self.precomputed:
            batch = {**batch, **tokenize_reports(self.tokenizers, batch["report"])}
        batch = {k: v.to(self._device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        rng = PerSampleRandom(batch["seed"], self._device)
        weights = self.target_weights(batch)
        valid = batch.get("valid", torch.ones(len(batch["seed"]), dtype=torch.bool, device=self._device))
        for view in ("frontal", "lateral"):
            batch[f"{view}_present"] = batch[f"{view}_present"] & valid
        reduce, t = self.global_batch, batch.get("timestep")  # fixed timesteps: validation
        self.parts = parts = LossParts()
        if self.stage in ("frontal", "lateral"):
            other = "lateral" if self.stage == "frontal" else "frontal"
            text, image = self._report_token(batch), self._image_token(batch, other)
            empty = self._empty()
            context, _, _ = multi_prompt_context(text, image, batch[f"{other}_present"],
                                                 torch.stack([empty["text"], empty["image"], empty["both"]]),
                                                 rng, self.policy)
            return stream_loss(self.unets[self.stage], self.scheduler, self._x0(self.stage, batch, rng),
                               context.to(self._dtype), rng, weights, reduce, t, parts, self.stage)
        if self.stage == "text":
            frontal, lateral = self._image_token(batch, "frontal"), self._image_token(batch, "lateral")
            blank = self._empty()["image"]
            context, _, _ = multi_prompt_context(frontal, lateral, batch["lateral_present"],
                                                 torch.stack([blank, blank, blank]), rng, self.policy)
            return stream_loss(self.model.unet_text, self.scheduler, self._x0("text", batch, rng),
                               context.to(self._dtype), rng, weights, reduce, t, parts, "text")
        if self.stage == "clip":
            use_frontal = batch["frontal_present"].view(-1, 1, 1, 1)
            images = torch.where(use_frontal, batch["frontal"], batch["lateral"])
            pixels = clip_pixels(images, self.model.clip.config.vision_config.image_size).to(self._dtype)
            loss = clip_contrastive_loss(self.model.clip, batch["clip_ids"], pixels, rows=weights, batch=reduce)
            parts.add_global("contrastive", loss)
            return loss
        if self.stage == "optimus":
            beta = cyclic_beta(self.step, self.total_steps)
            out = optimus_loss(self.model.optimus, batch["bert_ids"], batch["gpt2_ids"], beta, rng,
                               batch["bert_mask"], weights=weights, batch=reduce)
            parts.add("text", out["per_sample"], weights)
            return out["loss"]
        if self.stage in JOINT_STREAMS:
            trained, partner, condition = JOINT_STREAMS[self.stage]
            if condition == "text":
                context, blank = self._report_token(batch), self._empty()["text"]
            else:
                context, blank = self._image_token(batch, condition), self._empty()["image"]
            dropped = (rng.rand() < self.policy.cfg_dropout).view(-1, 1, 1)
            context = torch.where(dropped, blank.view(1, 1, -1), context)
            x0s = [self._x0(trained, batch, rng), self._x0(partner, batch, rng)]
            return joint_loss([self.unets[trained], self.unets[partner]], self.scheduler, x0s,
                              context.to(self._dtype), rng, self.wiring, weights, reduce, t, parts, (trained, partner))
        raise ValueError(f"unknown stage {self.stage!r}")
