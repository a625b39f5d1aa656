"""CLIP image preprocessing in torch: bit for bit the released path's PIL resampling, batched."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from xgem_dist.model.clip_preprocess import clip_pixels, pil_bicubic_resize, short_side_size


@pytest.mark.parametrize("size", [(256, 256, 224, 224), (45, 61, 32, 43), (300, 200, 336, 224), (17, 19, 40, 37),
                                  (1000, 800, 280, 224)])
def test_resize_is_pillows_bicubic_bit_for_bit(size):
    height, width, out_h, out_w = size
    image = np.random.default_rng(height).integers(0, 256, (height, width), dtype=np.uint8)
    expected = np.array(Image.fromarray(image).resize((out_w, out_h), Image.BICUBIC))
    ours = pil_bicubic_resize(torch.from_numpy(image), out_h, out_w)
    assert np.array_equal(ours.numpy().astype(np.uint8), expected)


def test_clip_pixels_is_the_processors_pipeline_per_image_in_one_batch():
    images = torch.rand(3, 1, 90, 70, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 1 / 255, 0.99999])  # truncation to uint8 at the edges
    ours = clip_pixels(images, 64)
    assert ours.shape == (3, 3, 64, 64) and ours.dtype == torch.float32
    height, width = short_side_size(90, 70, 64)
    assert (height, width) == (82, 64)
    for image, got in zip(images, ours):
        as_uint8 = (image[0].numpy() * 255).astype(np.uint8)
        resized = np.array(Image.fromarray(as_uint8).resize((width, height), Image.BICUBIC))
        top = (height - 64) // 2
        crop = resized[top : top + 64].astype(np.float32) / 255
        expected = (crop[None] - np.array(OPENAI_CLIP_MEAN)[:, None, None]) / np.array(OPENAI_CLIP_STD)[:, None, None]
        assert np.abs(got.numpy() - expected).max() < 1e-6
