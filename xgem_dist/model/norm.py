"""GroupNorm for XGeM's UNets, and the SiLU after it fused in, chosen by one switch: `torch` | `triton` | `auto`.

`GroupNorm` is nn.GroupNorm (same parameters, same state dict) that can apply the SiLU that follows it.
`set_norm_backend` rewrites a model into that form once: every diffusers ResnetBlock2D's norm1/norm2 take
over its SiLU (its time-embedding projection applies the SiLU to its own input, so the block's
`nonlinearity` becomes the identity), the UNet's conv_norm_out takes over conv_act, every other
nn.GroupNorm becomes a GroupNorm without SiLU; then it sets how they compute:
- `torch`: F.group_norm then F.silu (the reference; the same arithmetic as the stock modules);
- `triton`: the fused Triton kernel (kernels/group_norm.py) on CUDA, an error where it does not apply;
- `auto`: on CUDA, per input shape, the faster forward+backward of the two, measured the first time the
  shape is seen (a kernel whose output disagrees with torch's is not used).
On the CPU all three run torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from .measured import MeasuredChoice, optional_kernel

BACKENDS = ("torch", "triton", "auto")


def torch_group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float, silu: bool) -> torch.Tensor:
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


class GroupNormKernel:
    """Computes GroupNorm(+SiLU) with the backend's implementation; shared by every GroupNorm of a model."""

    def __init__(self, backend: str = "torch"):
        if backend not in BACKENDS:
            raise ValueError(f"norm backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.kernel, self.supports = (None, None) if backend == "torch" else optional_kernel(
            "kernels.group_norm", "group_norm", "supports", fallback="torch GroupNorm")
        self.measured = None
        if backend == "auto" and self.kernel is not None:
            self.measured = MeasuredChoice("group norm", {"torch": torch_group_norm, "triton": self.kernel},
                                           applies=lambda name, x, groups, weight, bias, *_: (
                                               name == "torch" or self.supports(x, groups, weight, bias)))

    def __call__(self, x: torch.Tensor, groups: int, weight, bias, eps: float, silu: bool) -> torch.Tensor:
        if not x.is_cuda or self.backend == "torch" or (self.backend == "auto" and self.measured is None):
            return torch_group_norm(x, groups, weight, bias, eps, silu)
        if self.measured is not None:
            return self.measured(x, groups, weight, bias, eps, silu)
        if self.kernel is None or not self.supports(x, groups, weight, bias):
            raise RuntimeError(f"the Triton GroupNorm kernel does not support x {tuple(x.shape)} {x.dtype} "
                               f"(contiguous: {x.is_contiguous()}), {groups} groups"
                               + (" (triton is not installed)" if self.kernel is None else ""))
        return self.kernel(x, groups, weight, bias, eps, silu)


REFERENCE = GroupNormKernel("torch")


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, followed by SiLU when `silu`, computed by `self.compute` (see set_norm_backend)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 silu: bool = False, device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.silu = silu
        self.compute = REFERENCE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", silu=True" if self.silu else "")


class SiLULinear(nn.Linear):
    """nn.Linear applied to SiLU(input): a ResnetBlock2D's time-embedding projection once its SiLU is
    taken over by the norms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.silu(x))


def _moved(old: nn.Module, new_type: type, *args, **kwargs) -> nn.Module:
    """A `new_type` module built on the meta device that takes over old's parameters (no copy, so ZeRO-3
    partitioned parameters stay as they are)."""
    with torch.device("meta"):
        new = new_type(*args, **kwargs)
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    new.train(old.training)
    return new


def _group_norm(old: nn.GroupNorm, silu: bool) -> GroupNorm:
    return _moved(old, GroupNorm, old.num_groups, old.num_channels, old.eps, old.affine, silu=silu)


def _fuse(model: nn.Module) -> None:
    for module in model.modules():
        if (isinstance(module, ResnetBlock2D) and isinstance(module.nonlinearity, nn.SiLU)
                and module.time_embedding_norm == "default"):
            module.norm1, module.norm2 = _group_norm(module.norm1, True), _group_norm(module.norm2, True)
            if module.time_emb_proj is not None and not module.skip_time_act:
                linear = module.time_emb_proj
                module.time_emb_proj = _moved(linear, SiLULinear, linear.in_features, linear.out_features,
                                              bias=linear.bias is not None)
            module.nonlinearity = nn.Identity()
        if (isinstance(module, UNet2DConditionModel) and module.conv_norm_out is not None
                and isinstance(module.conv_act, nn.SiLU)):
            module.conv_norm_out, module.conv_act = _group_norm(module.conv_norm_out, True), nn.Identity()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.GroupNorm:
                setattr(parent, name, _group_norm(child, False))


def set_norm_backend(model: nn.Module, backend: str) -> int:
    """Puts every GroupNorm of the model in the fused form above (once) and sets its backend; returns how
    many GroupNorms there are (how many take over a SiLU: count those with `.silu`)."""
    compute = GroupNormKernel(backend)
    _fuse(model)
    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    for norm in norms:
        norm.compute = compute
    return len(norms)
