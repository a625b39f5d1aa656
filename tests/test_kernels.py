"""The Triton attention kernels (under TRITON_INTERPRET=1 on the CPU) and the attention processors."""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels.attention as flash  # noqa: E402
import kernels.outputs  # noqa: E402
from xgem_dist.model.attention import XGeMAttnProcessor, set_attention_backend  # noqa: E402
from xgem_dist.model.xgem import build_xgem  # noqa: E402
from xgem_dist.profile.metrics import count_flops  # noqa: E402

# relative error bounds (max |error| / max |reference|) per input precision
BOUNDS = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def reference(q, k, v, grad):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = torch.softmax(q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v64
    out.backward(grad.double())
    return out, q64.grad, k64.grad, v64.grad


def check(device, dtype, head_dim, n_q, n_k, batch=1, heads=2):
    torch.manual_seed(head_dim + n_q + n_k)
    q, k, v = (torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype, requires_grad=True)
               for n in (n_q, n_k, n_k))
    out = flash.flash_attention(q, k, v)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = reference(q, k, v, grad)
    for got, want in zip((out, q.grad, k.grad, v.grad), expected):
        assert torch.isfinite(got).all()
        error = (got.double() - want).abs().max() / want.abs().max().clamp(min=0.1)  # dQ = dK = 0 for one key
        assert error < BOUNDS[dtype], (head_dim, n_q, n_k, dtype, float(error))


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(kernels.outputs, "POISON", True)


@pytest.mark.parametrize("head_dim", [40, 64, 80, 128, 160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_float64_reference_on_cpu(head_dim, dtype):
    if torch.cuda.is_available():
        pytest.skip("the interpreter tests run on CPU machines")
    check("cpu", dtype, head_dim, n_q=37, n_k=23)


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (16, 16), (5, 70), (50, 3)])
def test_kernel_masks_any_lengths_and_cross_attention(n_q, n_k):
    if torch.cuda.is_available():
        pytest.skip("the interpreter tests run on CPU machines")
    check("cpu", torch.float32, 40, n_q, n_k, batch=2, heads=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on the GPU (the interpreter's bf16 dot is wrong)")
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128, 160])
def test_kernel_bf16_on_gpu(head_dim):
    probe = torch.empty(1, 1, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    if not flash.supports(probe, probe):
        pytest.skip(f"no kernel config for head dim {head_dim} on this GPU")
    check("cuda", torch.bfloat16, head_dim, n_q=300, n_k=257)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_gpu_matches_sdpa():
    from xgem_dist.model.attention import gpu_candidates, triton_attention

    auto = gpu_candidates(*triton_attention())
    q, k, v = (torch.randn(4, 8, n, 40, device="cuda", dtype=torch.bfloat16) for n in (256, 256, 256))
    out = auto(q, k, v)
    ((name, seconds),) = auto.choices.values()
    assert name in seconds and "sdpa" in seconds and seconds[name] == min(seconds.values())
    assert (out.float() - torch.nn.functional.scaled_dot_product_attention(q, k, v).float()).abs().max() < 3e-2


def _cross_attention():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=48, heads=4, dim_head=8)


def test_single_key_path_equals_sdpa_values_and_gradients():
    attn = _cross_attention()
    x = torch.randn(2, 10, 32, requires_grad=True)
    ctx = torch.randn(2, 1, 48, requires_grad=True)
    results = []
    for processor in (None, XGeMAttnProcessor("auto")):
        if processor is not None:
            attn.set_processor(processor)
        attn.zero_grad()
        x.grad = ctx.grad = None
        out = attn(x, encoder_hidden_states=ctx)
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), ctx.grad.clone(),
                        {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (o1, dx1, dc1, g1), (o2, dx2, dc2, g2) = results
    assert torch.allclose(o1, o2, atol=1e-6) and torch.allclose(dc1, dc2, atol=1e-5)
    assert torch.allclose(dx1, dx2, atol=1e-6) and not dx2.any()  # one key: queries do not matter
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6), name
    assert not g2["to_q.weight"].any() and not g2["to_k.weight"].any()  # exactly zero, present


def test_skipped_projections_are_not_counted_as_flops():
    attn = _cross_attention()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 1, 48)
    stock = count_flops(attn, x, encoder_hidden_states=ctx)
    attn.set_processor(XGeMAttnProcessor("auto"))
    ours = count_flops(attn, x, encoder_hidden_states=ctx)
    to_v, to_out = 2 * 2 * 1 * 48 * 32, 2 * 2 * 10 * 32 * 32
    assert ours == to_v + to_out and stock > ours


def test_swapping_processors_keeps_a_tiny_unets_output_and_gradients():
    torch.manual_seed(0)
    model = build_xgem("tiny")
    unet = model.unet_frontal
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 500]), torch.randn(2, 1, 32)
    env = torch.nn.functional.normalize(torch.randn(2, 1, 48), dim=-1)
    results = {}
    for backend in ("sdpa", "auto", "triton"):
        assert set_attention_backend(unet, backend) == 62
        unet.zero_grad()
        out = unet(x, t, ctx, env=env)
        out.square().mean().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None})
    for backend in ("auto", "triton"):  # on the CPU both use SDPA for self-attention
        assert torch.allclose(results["sdpa"][0], results[backend][0], atol=1e-5)
        assert results["sdpa"][1].keys() == results[backend][1].keys()
        for name, grad in results["sdpa"][1].items():
            assert torch.allclose(grad, results[backend][1][name], atol=1e-5), name
    with pytest.raises(ValueError):
        set_attention_backend(unet, "flash")


@pytest.mark.slow
def test_every_kernel_config_compiles_for_hopper_and_ampere_without_spills(tmp_path):
    """The interpreter checks the arithmetic; this compiles each attention autotune candidate and each
    GroupNorm tile shape to machine code (no GPU needed)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--json", str(tmp_path / "rows.json")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    attention = [r for r in rows if "head_dim" in r]
    covered = {(r["arch"], r["kernel"], r["head_dim"], r["dtype"]) for r in attention}
    assert len(covered) == 2 * 3 * (5 + 4)  # dtypes x kernels x head dims (sm_90: 5, sm_80: 4)
    assert all(r["wgmma"] for r in attention if r["arch"] == 90)
    norms = {(r["arch"], r["kernel"], r["dtype"]) for r in rows if "channels" in r}
    assert len(norms) == 2 * 2 * 2  # arches x (forward, backward) x dtypes
    assert all(r["stack"] == r["local"] == 0 for r in rows)
