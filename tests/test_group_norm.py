"""The fused GroupNorm(+SiLU) Triton kernel (under TRITON_INTERPRET=1 on the CPU) and the norm switch."""

import copy

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import kernels.group_norm as gn  # noqa: E402
import kernels.outputs  # noqa: E402
from xgem_dist.model.norm import GroupNorm, GroupNormKernel, SiLULinear, set_norm_backend  # noqa: E402
from xgem_dist.model.xgem import build_xgem  # noqa: E402

BOUNDS = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # max |error| / max |reference|
ON_CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter tests run on CPU machines")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(kernels.outputs, "POISON", True)


def check(shape, groups, silu, dtype, device="cpu", offset=0.0):
    torch.manual_seed(sum(shape) + groups)
    x = (torch.randn(shape, device=device) * 2 + offset).to(dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[1], device=device)).requires_grad_()
    bias = (0.5 * torch.randn(shape[1], device=device)).requires_grad_()
    out = gn.group_norm(x, groups, weight, bias, 1e-5, silu)
    grad = torch.randn_like(out)
    out.backward(grad)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    want = F.group_norm(x64, groups, w64, b64, 1e-5)
    want = F.silu(want) if silu else want
    want.backward(grad.double())
    assert out.dtype == dtype and out.shape == x.shape
    for name, got, ref in (("y", out, want), ("dx", x.grad, x64.grad), ("dw", weight.grad, w64.grad),
                           ("db", bias.grad, b64.grad)):
        assert torch.isfinite(got).all(), name
        error = float((got.detach().double() - ref).abs().max() / ref.abs().max())
        assert error < BOUNDS[dtype], (name, shape, groups, silu, dtype, error)


@ON_CPU
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,groups", [
    ((2, 80, 8, 8), 8),  # 10 channels x 64 positions per group, several tiles of channels
    ((2, 40, 5, 7), 4),  # positions not a power of two
    ((3, 128), 4),  # the text UNet's flattened features: one position per channel
    ((1, 6, 3, 3), 1),
])
def test_kernel_matches_float64_reference(shape, groups, silu, dtype):
    check(shape, groups, silu, dtype)


@ON_CPU
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # SiLU of masked-off lanes
def test_statistics_survive_a_large_mean_over_many_tiles():
    """23,040 elements per group (12 tiles), mean 40 x its spread: a raw sum of squares would cancel."""
    check((2, 20, 48, 48), 2, True, torch.float32, offset=80.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on the GPU (the interpreter's bf16 is not)")
@pytest.mark.parametrize("shape,groups", [((4, 320, 32, 32), 32), ((4, 1280, 8, 8), 32), ((8, 5120), 32)])
def test_kernel_bf16_on_gpu(shape, groups):
    check(shape, groups, True, torch.bfloat16, device="cuda")


def test_supports_only_contiguous_affine_float_inputs():
    x, w = torch.randn(2, 8, 4, 4), torch.ones(8)
    assert gn.supports(x, 4, w, w)
    assert not gn.supports(x, 4, None, None)
    assert not gn.supports(x.to(memory_format=torch.channels_last), 4, w, w)
    assert not gn.supports(x.long(), 4, w, w)


def _tiny_unet_run(unet, seed=0):
    torch.manual_seed(seed)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 500]), torch.randn(2, 1, 32)
    env = F.normalize(torch.randn(2, 1, 48), dim=-1)
    unet.zero_grad()
    out = unet(x, t, ctx, env=env)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_fusing_keeps_a_tiny_unets_parameters_output_and_gradients():
    torch.manual_seed(0)
    unet = build_xgem("tiny").unet_frontal
    stock = copy.deepcopy(unet)
    stock_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in stock.modules())
    expected_out, expected_grads = _tiny_unet_run(stock)
    names = list(stock.state_dict())
    for backend in ("auto", "triton", "torch", "auto"):  # on the CPU all compute with torch; twice changes nothing
        assert set_norm_backend(unet, backend) == stock_norms
        assert list(unet.state_dict()) == names
        fused = [m for m in unet.modules() if isinstance(m, GroupNorm) and m.silu]
        # every diffusers ResnetBlock2D (2 norms each), the UNet's output norm and our environment encoder's
        resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
        assert len(fused) == 2 * resnets + 2
        assert sum(isinstance(m, SiLULinear) for m in unet.modules()) == resnets
        assert all(isinstance(m.nonlinearity, torch.nn.Identity) for m in unet.modules()
                   if type(m).__name__ == "ResnetBlock2D") and isinstance(unet.unet.conv_act, torch.nn.Identity)
        out, grads = _tiny_unet_run(unet)
        assert torch.equal(out, expected_out), backend
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert torch.equal(grad, expected_grads[name]), (backend, name)
    with pytest.raises(ValueError, match="norm backend"):
        set_norm_backend(unet, "apex")


def test_triton_backend_refuses_what_the_kernel_does_not_take(monkeypatch):
    compute = GroupNormKernel("triton")
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(compute(x, 4, torch.ones(8), torch.zeros(8), 1e-5, True),
                       F.silu(F.group_norm(x, 4, torch.ones(8), torch.zeros(8), 1e-5)))  # the CPU runs torch
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(RuntimeError, match="does not support"):
        compute(x.to(memory_format=torch.channels_last), 4, torch.ones(8), torch.zeros(8), 1e-5, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_gpu_keeps_the_faster_and_matches_torch():
    compute = GroupNormKernel("auto")
    x = torch.randn(16, 320, 32, 32, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(320, device="cuda"), torch.randn(320, device="cuda")
    out = compute(x, 32, w, b, 1e-5, True)
    ((name, seconds),) = compute.measured.choices.values()
    assert set(seconds) == {"torch", "triton"} and seconds[name] == min(seconds.values())
    assert (out.float() - F.silu(F.group_norm(x.float(), 32, w, b, 1e-5))).abs().max() < 5e-2
