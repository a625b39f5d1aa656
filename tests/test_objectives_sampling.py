"""CLIP and Optimus objectives, stage presets, tokenizers, export and any-to-any sampling on `tiny`."""

import torch
import pytest

from xgem_dist.data.demo import FINDINGS, IMPRESSIONS
from xgem_dist.model.diffusion import PerSampleRandom
from xgem_dist.model.export import load_components, save_components
from xgem_dist.model.objectives import (MAX_LOGIT_SCALE, clamp_logit_scale, clip_contrastive_loss, clip_pixels,
                                        cyclic_beta, optimus_loss)
from xgem_dist.model.sample import COMBINATIONS, Sampler, SamplerConfig, ddim_scheduler, parse_combination
from xgem_dist.model.stages import STAGES, apply_stage
from xgem_dist.model.tokenizers import load_tokenizers, train_small_tokenizers
from xgem_dist.model.xgem import build_xgem

REPORTS = FINDINGS + IMPRESSIONS


@pytest.fixture(scope="module")
def tokenizers():
    return train_small_tokenizers(REPORTS)


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return build_xgem("tiny")


def test_small_tokenizers_have_the_tiny_presets_ids_and_round_trip(tokenizers, tmp_path):
    assert (tokenizers.gpt2.pad_token_id, tokenizers.gpt2.bos_token_id, tokenizers.gpt2.eos_token_id) == (512, 513, 514)
    assert tokenizers.clip.eos_token_id == 511 and len(tokenizers.clip) == 512
    assert max(tokenizers.bert.get_vocab().values()) < 512
    ids = tokenizers.gpt2("Small left pleural effusion.")["input_ids"]
    assert ids[0] == 513 and ids[-1] == 514
    assert tokenizers.gpt2.decode(ids, skip_special_tokens=True) == "Small left pleural effusion."
    tokenizers.save(tmp_path)
    loaded = load_tokenizers(tmp_path)
    for name in ("clip", "bert", "gpt2"):
        text = "No acute cardiopulmonary process."
        assert getattr(loaded, name)(text)["input_ids"] == getattr(tokenizers, name)(text)["input_ids"]
    with pytest.raises(FileNotFoundError):
        load_tokenizers(tmp_path / "nothing")


def test_clip_contrastive_loss_falls_and_logit_scale_is_clamped(tiny, tokenizers):
    clip = tiny.clip
    texts = REPORTS[:4]
    ids = tokenizers.clip(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    images = torch.rand(4, 1, 96, 80)
    pixels = clip_pixels(images, clip.config.vision_config.image_size)
    assert pixels.shape == (4, 3, 64, 64)
    optimizer = torch.optim.Adam(clip.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = clip_contrastive_loss(clip, ids, pixels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clamp_logit_scale(clip)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    clamp_logit_scale(clip)
    assert clip.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)


def test_cyclic_beta_schedule():
    total = 1000
    assert [cyclic_beta(s, total) for s in (0, 499)] == [0.0, 0.0]
    assert cyclic_beta(625, total) == pytest.approx(0.5)
    assert [cyclic_beta(s, total) for s in (750, 999)] == [1.0, 1.0]
    assert cyclic_beta(600, total, cycles=2) == 0.0 and cyclic_beta(875, total, cycles=2) == 1.0


def test_optimus_loss_falls_and_free_bits_apply(tiny, tokenizers):
    optimus = tiny.optimus.eval()  # no dropout: a clean overfit signal
    texts = REPORTS[:4]
    bert = tokenizers.bert(texts, padding=True, return_tensors="pt")
    gpt = tokenizers.gpt2(texts, padding=True, return_tensors="pt")["input_ids"]
    optimizer = torch.optim.Adam(optimus.parameters(), lr=3e-3)
    first = last = None
    for step in range(40):
        out = optimus_loss(optimus, bert["input_ids"], gpt, 0.0, PerSampleRandom(range(step, step + 4)),
                           bert_mask=bert["attention_mask"])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        first = first or out["reconstruction"].item()
        last = out["reconstruction"].item()
    assert last < 0.6 * first  # the posterior noise (logvar starts at 0) slows the tiny decoder down
    with torch.no_grad():
        full = optimus_loss(optimus, bert["input_ids"], gpt, 0.0, PerSampleRandom(range(4)))
        free = optimus_loss(optimus, bert["input_ids"], gpt, 1.0, PerSampleRandom(range(4)), dim_target_kl=1e9)
    assert full["kl"] > 0 and free["kl"] == 0 and torch.isclose(free["loss"], free["reconstruction"])


def test_stage_presets_train_exactly_their_parts():
    model = build_xgem("xgem", device="meta")
    expected = {"clip": 427_616_513, "optimus": 241_599_744, "frontal": 859_520_964, "lateral": 859_520_964,
                "text": 1_708_848_448, "joint-text": 339_536_960, "joint-frontal": 296_300_000,
                "joint-lateral": 296_300_000}
    assert set(expected) == set(STAGES)
    for stage, count in expected.items():
        trainable = apply_stage(model, stage)
        assert sum(p.numel() for _, p in trainable) == count, stage
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
        assert not any("temporal" in name for name, _ in trainable)
    with pytest.raises(ValueError, match="unknown stage"):
        apply_stage(model, "everything")


def test_frozen_parts_get_no_gradient_in_a_stage(tiny):
    trainable = apply_stage(tiny, "joint-text")
    optimizer = torch.optim.AdamW([p for _, p in trainable])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(p.numel() for _, p in trainable)
    unet = tiny.unet_text
    x, t, ctx = torch.randn(2, 32), torch.tensor([1, 2]), torch.randn(2, 1, 32)
    unet(x, t, ctx, env=unet.environment(x, t)).square().mean().backward()
    assert all(p.grad is None for n, p in tiny.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for _, p in trainable if "unet_text" in _)


def test_ddim_grid_matches_the_released_sampler():
    scheduler = ddim_scheduler(50)
    assert scheduler.timesteps.tolist() == list(range(980, -1, -20))
    assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_any_to_any_sampling_shapes(combination, tiny, tokenizers):
    sampler = Sampler(tiny.eval(), tokenizers, SamplerConfig(steps=2, image_size=64, max_report_tokens=6))
    given, wanted = parse_combination(combination)
    inputs = {m: (REPORTS[:2] if m == "text" else torch.rand(2, 1, 64, 64)) for m in given}
    result = sampler(inputs, wanted, generator=torch.Generator().manual_seed(0))
    for m in wanted:
        if m == "text":
            assert len(result[m]) == 2 and all(isinstance(r, str) for r in result[m])
            assert result["latents"][m].shape == (2, 32)
        else:
            assert result[m].shape == (2, 1, 64, 64) and 0 <= result[m].min() and result[m].max() <= 1
            assert result["latents"][m].shape == (2, 4, 16, 16)


def test_joint_wiring_changes_the_sample(tiny, tokenizers):
    inputs = {"text": REPORTS[:1]}
    samples = {}
    for wiring in ("paper", "released"):
        sampler = Sampler(tiny.eval(), tokenizers, SamplerConfig(steps=2, image_size=64, wiring=wiring))
        samples[wiring] = sampler(inputs, ("frontal", "lateral"), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(samples["paper"]["frontal"], samples["released"]["frontal"])
    with pytest.raises(ValueError):
        Sampler(tiny, tokenizers, SamplerConfig(steps=2, image_size=64))({"text": ["x"]}, ("text",))


def test_export_and_load_with_safetensors_only(tiny, tmp_path):
    save_components(tiny, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(
        ["xgem_config.json", "unet_frontal", "unet_lateral", "unet_text", "vae", "optimus", "clip"])
    assert not list((tmp_path / "export").rglob("*.bin")) and not list((tmp_path / "export").rglob("*.pt"))
    loaded = load_components(tmp_path / "export")
    state, again = tiny.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    assert isinstance(AutoencoderKL.from_pretrained(tmp_path / "export" / "vae"), AutoencoderKL)
    assert isinstance(CLIPModel.from_pretrained(tmp_path / "export" / "clip"), CLIPModel)


def test_optimus_generate_as_the_released_sampler(tiny):
    """max_length counts <BOS> and the forced <EOS>; a batch draws sample after sample from one generator."""
    optimus = tiny.optimus.eval()
    z = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    batch = optimus.generate(z, max_length=7, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    one_by_one = [optimus.generate(z[i : i + 1], max_length=7, generator=generator)[0] for i in range(3)]
    assert batch == one_by_one
    assert all(len(tokens) <= 5 for tokens in batch) and any(len(tokens) == 5 for tokens in batch)
    assert all(514 not in tokens and 513 not in tokens for tokens in batch)
    assert optimus.generate(z, max_length=2, generator=torch.Generator()) == [[], [], []]
    greedy = optimus.generate(z, max_length=7, greedy=True)
    assert greedy == optimus.generate(z, max_length=7, greedy=True)
    # a bf16 model takes fp32 latents; the draws stay on the generator's device
    bf16 = optimus.to(torch.bfloat16)
    tokens = bf16.generate(z, max_length=7, generator=torch.Generator().manual_seed(5))
    assert len(tokens) == 3 and all(len(t) <= 5 for t in tokens)
