"""The seeded weights and inputs of the fidelity test (tests/test_fidelity.py). Imports only torch, so the
reference generator (tests/make_fidelity_reference.py, run in the official code's own environment) and
the test build the same values.

Weights, by released (official) tensor name, each from a generator seeded with the CRC32 of the name:
norm scales (1-D weights and the temporal blocks' `g`) 1 + N(0, 0.1^2), other matrices and kernels
N(0, 1/fan_in), biases and the rest N(0, 0.1^2). Nothing is left at zero (the released code
zero-initialises several output layers; random values make every path count).
"""

from __future__ import annotations

import math
import zlib

import torch

BATCH = 2
IMAGE_SIZE = 128  # the reduced VAE's images; latents are 4 x 16 x 16
LATENT_DIM = 32  # the reduced Optimus latent, the text UNet's input
CONTEXT_DIM = 32  # the reduced CLIP projection
CLIP_IMAGE_SIZE = 32
SAMPLER_STEPS = 10
SAMPLER_SEED = 1234
GENERATE_SEED = 99
GENERATE_MAX_LENGTH = 12
CLIP_BOS, CLIP_EOS = 49406, 49407
BERT_CLS, BERT_SEP = 101, 102
GPT2_BOS = 50258
TEXT_VOCAB = 50260


def seeded_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    values = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    if name.endswith(".g") or (len(shape) == 1 and name.endswith("weight")):
        return 1 + 0.1 * values
    if len(shape) >= 2:
        return values / math.sqrt(math.prod(shape[1:]))
    return 0.1 * values


def seeded_parameters(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: seeded_tensor(name, shape) for name, shape in shapes.items()}


def _clip_ids(lengths: list[int], generator: torch.Generator) -> torch.Tensor:
    """<BOS> tokens <EOS>, padded with <EOS> to 77 (as CLIP's tokenizer with padding="max_length")."""
    rows = []
    for n in lengths:
        body = torch.randint(0, CLIP_BOS, (n,), generator=generator).tolist()
        row = [CLIP_BOS, *body, CLIP_EOS]
        rows.append(row + [CLIP_EOS] * (77 - len(row)))
    return torch.tensor(rows)


def uncond_clip_ids() -> torch.Tensor:
    """CLIP's tokens of the empty report, per sample."""
    return _clip_ids([0] * BATCH, torch.Generator())


def seeded_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20240611)
    side = IMAGE_SIZE // 8
    bert = torch.zeros(BATCH, 11, dtype=torch.long)
    for i, n in enumerate((9, 5)):
        bert[i, : n + 2] = torch.tensor([BERT_CLS, *torch.randint(1000, 28996, (n,), generator=g).tolist(), BERT_SEP])
    gpt = torch.cat([torch.full((BATCH, 1), GPT2_BOS), torch.randint(0, 50257, (BATCH, 6), generator=g)], dim=1)
    return {
        "unet_x_image": torch.randn(BATCH, 4, side, side, generator=g),
        "unet_x_text": torch.randn(BATCH, LATENT_DIM, generator=g),
        "unet_t": torch.tensor([37, 912]),
        "unet_context": torch.nn.functional.normalize(torch.randn(BATCH, 1, CONTEXT_DIM, generator=g), dim=-1),
        "vae_image": torch.rand(BATCH, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1,
        "vae_latent": torch.randn(BATCH, 4, side, side, generator=g),
        "bert_ids": bert,
        "gpt_ids": gpt,
        "optimus_latent": torch.randn(BATCH, LATENT_DIM, generator=g),
        "vocab_subset": torch.randperm(TEXT_VOCAB, generator=g)[:256],
        "clip_ids": _clip_ids([12, 5], g),
        "clip_images": torch.rand(BATCH, 1, 45, 61, generator=g),
        "unet_video": torch.randn(1, 64, 3, 4, 4, generator=g),
        "vae_video": torch.randn(1, 64, 3, 4, 4, generator=g),
        "clip_video": torch.randn(3, 4, 32, generator=g),  # [(batch * tokens), frames, channels]
        "sampler_text_ids": _clip_ids([20, 7], g),
        "sampler_image": torch.rand(BATCH, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g),
    }
