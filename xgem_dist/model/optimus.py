"""Optimus, XGeM's text VAE: a BERT encoder to a 768-d Gaussian latent and a GPT-2 decoder conditioned on it.

The latent reaches the decoder twice: as a one-position past key = value in every layer (one Linear
to n_layer * hidden) and added to every token embedding (a second Linear). GPT-2's vocabulary has
three extra tokens: <PAD>, <BOS>, <EOS>.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig, BertModel, DynamicCache, GPT2Config, GPT2LMHeadModel


@dataclass(frozen=True)
class OptimusConfig:
    latent_dim: int = 768
    bert: dict | None = None  # BertConfig fields; None = BERT-base-cased
    gpt2: dict | None = None  # GPT2Config fields; None = GPT-2 small with vocab 50,260

    def bert_config(self) -> BertConfig:
        return BertConfig(**(self.bert or {"vocab_size": 28996}))

    def gpt2_config(self) -> GPT2Config:
        fields = {"vocab_size": 50260, "pad_token_id": 50257, "bos_token_id": 50258, "eos_token_id": 50259}
        return GPT2Config(**(fields | (self.gpt2 or {})))


class Optimus(nn.Module):
    def __init__(self, cfg: OptimusConfig = OptimusConfig(), init_context=None):
        super().__init__()
        self.config = cfg
        self.encoder = BertModel._from_config(cfg.bert_config(), add_pooling_layer=True)
        self.decoder = GPT2LMHeadModel._from_config(cfg.gpt2_config())
        gpt = self.decoder.config
        with init_context() if init_context else contextlib.nullcontext():
            self.to_posterior = nn.Linear(self.encoder.config.hidden_size, 2 * cfg.latent_dim, bias=False)
            self.latent_to_memory = nn.Linear(cfg.latent_dim, gpt.n_layer * gpt.n_embd, bias=False)
            self.latent_to_embedding = nn.Linear(cfg.latent_dim, gpt.n_embd, bias=False)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(mean, logvar), each [B, latent_dim], from the pooled [CLS] state."""
        pooled = self.encoder(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        mean, logvar = self.to_posterior(pooled).chunk(2, dim=-1)
        return mean, logvar

    def _memory(self, z: torch.Tensor) -> DynamicCache:
        gpt = self.decoder.config
        head_dim = gpt.n_embd // gpt.n_head
        per_layer = self.latent_to_memory(z).view(z.shape[0], gpt.n_layer, gpt.n_head, 1, head_dim)
        cache = DynamicCache(config=gpt)
        for layer in range(gpt.n_layer):
            kv = per_layer[:, layer]
            cache.update(kv, kv, layer)
        return cache

    def decode_logits(self, z: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [B, T, vocab] for input_ids given latent z [B, latent_dim]."""
        embeds = self.decoder.transformer.wte(input_ids) + self.latent_to_embedding(z).unsqueeze(1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        memory_mask = torch.ones_like(attention_mask[:, :1])
        out = self.decoder(inputs_embeds=embeds, past_key_values=self._memory(z),
                           attention_mask=torch.cat([memory_mask, attention_mask], dim=1), use_cache=False)
        return out.logits

    @torch.no_grad()
    def generate(self, z: torch.Tensor, max_length: int = 100, greedy: bool = False,
                 generator: torch.Generator | list[torch.Generator] | None = None) -> list[list[int]]:
        """Token ids per latent, <BOS> and <EOS> left out, as the released sampler makes them: from <BOS>, one
        token at a time until <EOS>; max_length counts <BOS> and the <EOS> forced into the last slot, so at
        most max_length - 2 tokens come back. Multinomial at temperature 1 (no top-k/top-p filtering) unless
        greedy. The latents are decoded one after the other (all of the first one's draws, then the
        second's), so a generator seeded as the released sampler's global RNG gives its tokens for the
        whole batch; a list gives each latent its own generator. The draws are made on the generator's
        device, whatever the model's."""
        gpt = self.decoder.config
        weight = self.latent_to_memory.weight
        out = []
        for i, latent in enumerate(z.to(device=weight.device, dtype=weight.dtype)):
            own = generator[i] if isinstance(generator, list) else generator
            ids = torch.full((1, 1), gpt.bos_token_id, dtype=torch.long, device=weight.device)
            tokens: list[int] = []
            while True:
                logits = self.decode_logits(latent[None], ids)[0, -1].float()
                if greedy:
                    token = int(logits.argmax())
                else:
                    probs = logits.softmax(-1)
                    if own is not None:
                        probs = probs.to(own.device)
                    token = int(torch.multinomial(probs, 1, generator=own))
                if token == gpt.eos_token_id or ids.shape[1] + 1 >= max_length:
                    break
                tokens.append(token)
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            out.append(tokens)
        return out
