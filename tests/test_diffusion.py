"""Diffusion objectives on the tiny preset: conditioning statistics, losses, gradients, a tiny overfit."""

import math

import pytest
import torch

from xgem_dist.model.diffusion import (PROMPT_BOTH, PROMPT_IMAGE, PROMPT_TEXT, GlobalBatch, PerSampleRandom, PromptPolicy,
                                       image_latents, joint_loss, multi_prompt_context, stream_loss, text_latents,
                                       training_scheduler)
from xgem_dist.model.xgem import build_xgem


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_xgem("tiny")


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_multi_prompt_frequencies_and_cfg_dropout_rate():
    n, d = 30_000, 8
    g = torch.Generator().manual_seed(1)
    text, image = torch.randn(n, 1, d, generator=g), torch.randn(n, 1, d, generator=g)
    empty = torch.randn(3, d, generator=g)
    has_image = torch.rand(n, generator=g) < 0.7
    context, kind, dropped = multi_prompt_context(text, image, has_image, empty, PerSampleRandom(range(n)),
                                                  PromptPolicy(0.1))
    assert (kind[~has_image] == PROMPT_TEXT).all()
    with_image = kind[has_image]
    for k in (PROMPT_TEXT, PROMPT_IMAGE, PROMPT_BOTH):
        assert within(int((with_image == k).sum()), len(with_image), 1 / 3)
    assert within(int(dropped.sum()), n, 0.1)
    assert torch.equal(context[dropped].squeeze(1), empty[kind[dropped]])
    kept = ~dropped
    expected = {PROMPT_TEXT: text, PROMPT_IMAGE: image, PROMPT_BOTH: (text + image) / 2}
    for k, source in expected.items():
        rows = kept & (kind == k)
        assert torch.equal(context[rows], source[rows])


def test_latent_encoders_scale_and_shapes(tiny):
    images = torch.rand(2, 1, 64, 64) * 2 - 1
    latents = image_latents(tiny.vae, images, PerSampleRandom([1, 2]))
    assert latents.shape == (2, 4, 16, 16)
    # the posterior's noise is each sample's own: the same seeds give the same latents in any batch
    again = torch.cat([image_latents(tiny.vae, images[:1], PerSampleRandom([1])),
                       image_latents(tiny.vae, images[1:], PerSampleRandom([2]))])
    assert torch.allclose(latents, again, atol=1e-6)
    assert not torch.allclose(latents, image_latents(tiny.vae, images, PerSampleRandom([3, 4])))
    ids = torch.randint(0, 512, (2, 12))
    tiny.optimus.eval()  # no dropout: two encodings of the same ids agree
    z = text_latents(tiny.optimus, ids)
    assert z.shape == (2, 32) and torch.allclose(z, 4.3108 * tiny.optimus.encode(ids)[0])
    tiny.optimus.train()


@pytest.mark.parametrize("stream", ["unet_frontal", "unet_text"])
def test_stream_loss_falls_when_overfitting_one_batch(tiny, stream):
    unet = getattr(tiny, stream)
    scheduler = training_scheduler()
    torch.manual_seed(0)
    x0 = torch.randn(4, 4, 16, 16) if stream == "unet_frontal" else torch.randn(4, 32)
    context = torch.randn(4, 1, 32)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = stream_loss(unet, scheduler, x0, context, PerSampleRandom([3, 4, 5, 6]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_joint_loss_trains_connectors_and_wiring_differs(tiny):
    unets = [tiny.unet_text, tiny.unet_lateral]
    x0s = [torch.randn(3, 32), torch.randn(3, 4, 16, 16)]
    context = torch.randn(3, 1, 32)
    losses = {}
    for wiring in ("paper", "released"):
        for unet in unets:
            unet.zero_grad()
        loss = joint_loss(unets, training_scheduler(), x0s, context, PerSampleRandom([5, 6, 7]), wiring)
        loss.backward()
        losses[wiring] = loss.item()
        for unet in unets:
            for module in (unet.env_encoder, unet.down_connectors, unet.up_connectors):
                assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert losses["paper"] != losses["released"]
    with pytest.raises(ValueError):
        joint_loss(unets, training_scheduler(), x0s, context, PerSampleRandom([1, 2, 3]), "swapped")


def test_global_batch_shares_add_up_to_the_whole_batch_mean_and_gradient():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], requires_grad=True)
    weights = torch.tensor([True, False, True, True, True, False])
    whole = GlobalBatch().mean(per_sample, weights)
    (whole_grad,) = torch.autograd.grad(whole, per_sample)
    # 3 ranks x 2 micro-batches of one sample each; the engine averages gradients over the 6 shares
    shares = GlobalBatch(weight_total=float(weights.sum()), shares=6, world_size=3)
    parts = [shares.mean(per_sample[i:i + 1], weights[i:i + 1]) for i in range(6)]
    assert sum(p.item() for p in parts) / 6 == pytest.approx(whole.item())
    (split_grad,) = torch.autograd.grad(sum(parts) / 6, per_sample)
    assert torch.allclose(split_grad, whole_grad)
    assert whole.item() == pytest.approx((1 + 3 + 4 + 5) / 4)
    with pytest.raises(ValueError, match="grad_accum 1"):
        shares.contrastive(torch.randn(1, 4), torch.randn(1, 4))
    # rows outside the contrastive loss neither count nor compete: the same as leaving them out
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    masked = GlobalBatch().contrastive(a, b, weights, scale=3.0, symmetric=True)
    assert masked.item() == pytest.approx(GlobalBatch().contrastive(a[weights], b[weights], scale=3.0,
                                                                    symmetric=True).item(), rel=1e-6)
    assert GlobalBatch().contrastive(a, b, torch.zeros(6, dtype=torch.bool)).item() == 0.0


def test_per_sample_draws_do_not_depend_on_the_batch_they_land_in():
    together = PerSampleRandom([11, 12, 13]).randn((4,))
    apart = torch.cat([PerSampleRandom([11]).randn((4,)), PerSampleRandom([12, 13]).randn((4,))])
    assert torch.equal(together, apart)
