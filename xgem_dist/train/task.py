"""The loss of each XGeM training stage as one nn.Module, so DeepSpeed wraps a single forward.

Every rank runs the same modules on every step (ZeRO-3 gathers parameters collectively): samples
that lack what a stage needs (a missing view, an empty report) are masked out of the loss, never
skipped. All randomness is drawn per sample from the sample's own seed (PerSampleRandom), and every
loss is a mean over the whole global batch (`global_batch`, set by the loop each step), so neither
depends on the world size. Frozen modules run in eval mode (no dropout in the targets they compute).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.diffusion import (GlobalBatch, LossParts, PerSampleRandom, PromptPolicy, image_latents, joint_loss,
                               multi_prompt_context, stream_loss, text_latents, training_scheduler)
from ..model.encoders import clip_image_token, clip_text_token
from ..model.objectives import clip_contrastive_loss, clip_pixels, cyclic_beta, optimus_loss
from ..model.tokenizers import Tokenizers
from ..data.loader import tokenize_reports
from ..model.xgem import XGeM

JOINT_STREAMS = {"joint-text": ("text", "lateral", "frontal"), "joint-frontal": ("frontal", "lateral", "text"),
                 "joint-lateral": ("lateral", "frontal", "text")}  # (trained stream, partner, condition)


class TrainingTask(nn.Module):
    def __init__(self, model: XGeM, stage: str, tokenizers: Tokenizers, total_steps: int,
                 wiring: str = "", cfg_dropout: float = 0.1):
        super().__init__()
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
            return text_latents(self.model.optimus, batch["bert_ids"], batch["bert_mask"])
        return image_latents(self.model.vae, (batch[modality] * 2 - 1).to(self._dtype), rng)

    def _empty(self) -> dict[str, torch.Tensor]:
        side = self.model.clip.config.vision_config.image_size
        with torch.no_grad():
            text = clip_text_token(self.model.clip, self._empty_report_ids.to(self._device))[0, 0]
            image = self._clip_image(torch.zeros(1, 1, side, side, device=self._device))[0, 0]
        return {"text": text, "image": image, "both": (text + image) / 2}

    def forward(self, batch: dict) -> torch.Tensor:
        """batch: the loader's (images, presence, reports and, if the loader did not tokenize, none of the ids)."""
        if "clip_ids" not in batch:
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
            with torch.no_grad():
                text, image = clip_text_token(self.model.clip, batch["clip_ids"]), self._clip_image(batch[other])
            empty = self._empty()
            context, _, _ = multi_prompt_context(text, image, batch[f"{other}_present"],
                                                 torch.stack([empty["text"], empty["image"], empty["both"]]),
                                                 rng, self.policy)
            return stream_loss(self.unets[self.stage], self.scheduler, self._x0(self.stage, batch, rng),
                               context.to(self._dtype), rng, weights, reduce, t, parts, self.stage)
        if self.stage == "text":
            with torch.no_grad():
                frontal, lateral = self._clip_image(batch["frontal"]), self._clip_image(batch["lateral"])
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
            with torch.no_grad():
                if condition == "text":
                    context, blank = clip_text_token(self.model.clip, batch["clip_ids"]), self._empty()["text"]
                else:
                    context, blank = self._clip_image(batch[condition]), self._empty()["image"]
            dropped = (rng.rand() < self.policy.cfg_dropout).view(-1, 1, 1)
            context = torch.where(dropped, blank.view(1, 1, -1), context)
            x0s = [self._x0(trained, batch, rng), self._x0(partner, batch, rng)]
            return joint_loss([self.unets[trained], self.unets[partner]], self.scheduler, x0s,
                              context.to(self._dtype), rng, self.wiring, weights, reduce, t, parts, (trained, partner))
        raise ValueError(f"unknown stage {self.stage!r}")
