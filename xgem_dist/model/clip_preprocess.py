"""CLIP's image preprocessing as the released model ran it, in torch: batched, on any device.

The released code hands [0, 1] float images to transformers' CLIP image processor, which converts them
to uint8 by truncation, resizes the short side to the model's image size with PIL's bicubic filter
(antialiased: the filter widens with the downscale factor; 8-bit fixed-point arithmetic, rounded to
uint8 after each pass, width first), centre-crops, divides by 255 and normalises with CLIP's mean/std.
`pil_bicubic_resize` reproduces Pillow's resampling bit for bit (tests compare it with Pillow): the
coefficients are computed as Pillow computes them, and the integer sums are exact in float64.
"""

from __future__ import annotations

import functools
import math

import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit images (32 - 8 - 2)
BICUBIC_SUPPORT = 2.0


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=64)
def _fixed_point_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """[out_size, in_size] float64 matrix of Pillow's integer filter coefficients for one axis, times
    2^-PRECISION_BITS (exact: a power of two), so that a product sums to Pillow's fixed-point sum / 2^22."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    inverse = 1.0 / filterscale  # Pillow multiplies by the inverse: the same last bits
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        taps = [_bicubic((x - center + 0.5) * inverse) for x in range(first, last)]
        total = sum(taps)
        for x, tap in zip(range(first, last), taps):
            k = (tap / total if total != 0.0 else tap) * (1 << PRECISION_BITS)
            weights[out, x] = math.trunc(k + 0.5) if k >= 0 else math.trunc(k - 0.5)
    return (weights / (1 << PRECISION_BITS)).to(device)


def _round_to_uint8(scaled_sums: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 on sum / 2^22: (sum + 2^21) >> 22, clamped to [0, 255] (values stay float64)."""
    return scaled_sums.add_(0.5).floor_().clamp_(0, 255)


def pil_bicubic_resize(images: torch.Tensor, height: int, width: int,
                       window: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """uint8-valued images [..., H, W] (any dtype) -> [..., height, width] float64, uint8-valued, as
    PIL.Image.resize((width, height), BICUBIC) on the 8-bit image. window (top, left, rows, cols): only that
    part of the output is computed (the same values as cropping it afterwards)."""
    top, left, rows, cols = window or (0, 0, height, width)
    x = images.to(torch.float64)
    if x.shape[-1] != width:
        x = _round_to_uint8(x @ _fixed_point_weights(x.shape[-1], width, x.device)[left : left + cols].T)
    else:
        x = x[..., left : left + cols]
    if x.shape[-2] != height:
        x = _round_to_uint8(_fixed_point_weights(x.shape[-2], height, x.device)[top : top + rows] @ x)
    else:
        x = x[..., top : top + rows, :]
    return x


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side `size` and the long one scaled and truncated, as transformers."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images [B, C, H, W] in [0, 1] (values outside are clamped; the released path wraps them around in
    uint8) -> CLIP input [B, 3, size, size], float32 on the images' device."""
    quantised = torch.trunc(images.float().clamp(0, 1) * 255)  # float32 product, truncated: numpy's astype(uint8)
    height, width = short_side_size(images.shape[-2], images.shape[-1], size)
    window = ((height - size) // 2, (width - size) // 2, size, size)  # the centre crop
    x = (pil_bicubic_resize(quantised, height, width, window) / 255).float()
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std
