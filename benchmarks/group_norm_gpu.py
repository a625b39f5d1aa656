"""GroupNorm+SiLU at XGeM's activation shapes on one GPU: the fused Triton kernel against torch (F.group_norm
then F.silu, both on bf16 tensors as in a bf16 DeepSpeed engine, and under bf16 autocast, where
group_norm runs in fp32), forward and forward+backward, in ms and in GB/s of the minimal traffic (forward:
read x, write y; backward: read x and dy, write dx). Also what `auto` picks per shape. Prints a table and
writes JSON. Needs CUDA and triton (no Ray, no DALI, no DeepSpeed).

    python benchmarks/group_norm_gpu.py [--json benchmarks/results/group_norm_gpu.json]
"""

from __future__ import annotations

import argparse

import torch
from attention_gpu import timed

from kernels.group_norm import group_norm
from xgem_dist.model.norm import GroupNormKernel, torch_group_norm
from xgem_dist.storage import write_json

# image UNet activations at batch 32, 256 px (latent 32: levels 32/16/8/4, incl. the decoder's concatenated
# inputs), batch 8 at 512 px, and the text UNet's flattened 4C features; 32 groups throughout
SHAPES = [(32, 320, 32, 32), (32, 960, 32, 32), (32, 640, 16, 16), (32, 1280, 8, 8), (32, 2560, 8, 8),
          (32, 1280, 4, 4), (8, 320, 64, 64), (8, 640, 32, 32), (32, 5120), (32, 1280)]
GROUPS, EPS = 32, 1e-5


def _autocast_torch(x, groups, weight, bias, eps, silu):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return torch_group_norm(x, groups, weight, bias, eps, silu).to(x.dtype)  # fp32 there; the next conv casts


def rows() -> list[dict]:
    auto = GroupNormKernel("auto")
    impls = {"torch": torch_group_norm, "torch_autocast": _autocast_torch, "triton": group_norm}
    out = []
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        bias = torch.randn(shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        nbytes = x.numel() * x.element_size()
        row = {"shape": list(shape)}
        for name, fn in impls.items():
            forward = timed(lambda: fn(x, GROUPS, weight, bias, EPS, True))
            both = timed(lambda: fn(x, GROUPS, weight, bias, EPS, True).backward(grad))
            row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = round(forward * 1e3, 4), round(both * 1e3, 4)
            row[f"{name}_fwd_gbs"] = round(2 * nbytes / forward / 1e9, 1)
            row[f"{name}_fwdbwd_gbs"] = round(5 * nbytes / both / 1e9, 1)
            x.grad = weight.grad = bias.grad = None
        row["triton_vs_torch_fwdbwd"] = round(row["torch_fwdbwd_ms"] / row["triton_fwdbwd_ms"], 3)
        auto(x, GROUPS, weight, bias, EPS, True)
        row["auto_choice"] = next(choice for key, (choice, _) in auto.measured.choices.items() if key[0][0] == shape)
        out.append(row)
        print(row, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmarks/results/group_norm_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    table = rows()
    print(f"\n{'shape':>22} {'torch':>9} {'autocast':>9} {'triton':>9} {'x':>6}  auto  (fwd+bwd ms; GB/s triton)")
    for r in table:
        print(f"{str(r['shape']):>22} {r['torch_fwdbwd_ms']:>9} {r['torch_autocast_fwdbwd_ms']:>9} "
              f"{r['triton_fwdbwd_ms']:>9} {r['triton_vs_torch_fwdbwd']:>6}  {r['auto_choice']}  "
              f"{r['triton_fwdbwd_gbs']}")
    result = {"benchmark": "group_norm_gpu", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "groups": GROUPS, "rows": table}
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
