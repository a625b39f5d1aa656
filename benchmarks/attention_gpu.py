"""Attention at XGeM's shapes on one GPU: our Triton kernel against torch SDPA (its default pick and each of
its cuDNN, flash and efficient backends) and `auto` (the fastest of those, measured per shape), forward and
forward+backward TFLOP/s; then one image-UNet training step stock (SDPA, torch GroupNorm), with `auto`
attention, and with `auto` attention and GroupNorm+SiLU, each with its GPU time by kernel family.
Prints tables and writes JSON.
Needs CUDA and triton (no Ray, no DALI, no DeepSpeed).

    python benchmarks/attention_gpu.py [--dtype bf16] [--unet-model xgem-lean] [--json benchmarks/results/attention_gpu.json]

FLOPs: forward 4*B*H*Nq*Nk*D (real D, not the padded one), forward+backward 3.5x that.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch

from kernels import attention as kernel
from xgem_dist.model.attention import gpu_candidates, triton_attention
from xgem_dist.storage import write_json

# (batch, heads, query length, key length, head dim): the image UNets at 256 px, then at 512 px, then the
# head dims of the reference kernels
SHAPES = [(32, 8, 1024, 1024, 40), (32, 8, 256, 256, 80), (32, 8, 64, 64, 160),
          (8, 8, 4096, 4096, 40), (8, 8, 1024, 1024, 80), (8, 8, 256, 256, 160),
          (16, 8, 1024, 1024, 64), (16, 8, 1024, 1024, 128)]
GOAL_VS_CUDNN = 1.25  # Triton fwd+bwd over cuDNN SDPA at the D40 and D80 shapes
KERNEL_FAMILIES = [("attention", r"_forward_kernel|_backward_d|fmha|flash|attention|cudnn.*sdpa"),
                   ("group_norm", r"group_?norm|GroupNorm"), ("silu", r"silu|SiLU"),
                   ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|wgmma"), ("conv", r"conv|implicit|winograd"),
                   ("copy/elementwise", r"elementwise|copy|cat|fill|reduce")]


def timed(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1000


def attention_rows(dtype: torch.dtype) -> list[dict]:
    rows = []
    auto = gpu_candidates(*triton_attention())
    impls = {**auto.candidates, "auto": auto}
    for b, h, n_q, n_k, d in SHAPES:
        q = torch.randn(b, h, n_q, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(b, h, n_k, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(b, h, n_k, d, device="cuda", dtype=dtype, requires_grad=True)
        grad = torch.randn(b, h, n_q, d, device="cuda", dtype=dtype)
        flops = 4 * b * h * n_q * n_k * d
        row = {"shape": [b, h, n_q, n_k, d]}
        for name, fn in impls.items():
            if name == "triton" and not kernel.supports(q, k):
                row["triton_error"] = "unsupported head dim on this GPU"
                continue
            try:
                row[f"{name}_fwd_tflops"] = round(flops / timed(lambda: fn(q, k, v)) / 1e12, 1)
                row[f"{name}_fwdbwd_tflops"] = round(3.5 * flops / timed(lambda: fn(q, k, v).backward(grad)) / 1e12, 1)
            except RuntimeError as e:
                row[f"{name}_error"] = str(e).split("\n")[0][:120]
            q.grad = k.grad = v.grad = None
        row["auto_choice"] = next(choice for (shape, *_), (choice, _) in auto.choices.items() if shape == tuple(q.shape))
        for name, base in (("triton", "sdpa-cudnn"), ("auto", "sdpa")):
            if f"{name}_fwdbwd_tflops" in row and f"{base}_fwdbwd_tflops" in row:
                row[f"{name}_vs_{base}_fwdbwd"] = round(row[f"{name}_fwdbwd_tflops"] / row[f"{base}_fwdbwd_tflops"], 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def autotuned_configs() -> dict[str, dict]:
    """What the Triton autotuner picked, per kernel and (n_q, n_k, head_dim, dtypes)."""
    return {f"sm{arch}/{name}": {str(key): str(config) for key, config in tuner.cache.items()}
            for (arch, name), tuner in kernel._TUNED.items() if tuner.cache}


def unet_step(model_name: str, dtype: torch.dtype, batch: int) -> dict:
    from xgem_dist.model.attention import set_attention_backend
    from xgem_dist.model.norm import set_norm_backend
    from xgem_dist.model.xgem import build_xgem

    model = build_xgem(model_name, device="cuda").to(dtype)
    unet = model.unet_frontal
    side = 32 if model_name != "tiny" else 16
    x = torch.randn(batch, 4, side, side, device="cuda", dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device="cuda")
    context = torch.randn(batch, 1, model.config.image_unet.context_dim, device="cuda", dtype=dtype)

    def step():
        unet(x, t, context).float().square().mean().backward()

    out = {"model": model_name, "batch": batch, "latent_side": side}
    # stock (diffusers' SDPA processor, torch GroupNorm then SiLU), then our attention, then our norms too
    for name, attention, norm in (("sdpa", "sdpa", "torch"), ("auto", "auto", "torch"), ("auto_norm", "auto", "auto")):
        set_attention_backend(unet, attention)
        set_norm_backend(unet, norm)
        out[f"{name}_step_s"] = round(timed(step, 5), 4)
        try:
            out[f"{name}_kernel_families"] = kernel_families(step)
        except Exception as e:  # noqa: BLE001 - the timings still count
            out[f"{name}_kernel_families"] = {"error": f"{type(e).__name__}: {e}", "share": {}}
    out["speedup"] = round(out["sdpa_step_s"] / out["auto_step_s"], 3)
    out["speedup_with_norm"] = round(out["sdpa_step_s"] / out["auto_norm_step_s"], 3)
    return out


def kernel_families(step, steps: int = 3) -> dict:
    """GPU time of `steps` steps by kernel family, with the top kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    by_kernel = defaultdict(float)
    for event in prof.events():
        if event.device_type.name == "CUDA":
            by_kernel[event.name] += event.device_time_total
    total = sum(by_kernel.values()) or 1.0
    families = defaultdict(float)
    for name, us in by_kernel.items():
        family = next((f for f, pattern in KERNEL_FAMILIES if re.search(pattern, name, re.IGNORECASE)), "other")
        families[family] += us
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:15]
    return {"share": {f: round(us / total, 4) for f, us in sorted(families.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:140], "ms_per_step": round(us / steps / 1000, 3), "share": round(us / total, 4)}
                            for n, us in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--unet-model", default="xgem-lean")
    parser.add_argument("--unet-batch", type=int, default=16)
    parser.add_argument("--json", default="benchmarks/results/attention_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    rows = attention_rows(dtype)
    names = ("triton", "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "auto")
    print(f"\n{'shape':>28} " + " ".join(f"{n:>14}" for n in names) + "  auto picks   (fwd+bwd TFLOP/s)")
    for r in rows:
        print(f"{str(r['shape']):>28} " + " ".join(f"{r.get(f'{n}_fwdbwd_tflops', float('nan')):>14}" for n in names)
              + f"  {r['auto_choice']}")
    goals = {
        "triton_vs_cudnn_at_d40_d80": {str(r["shape"]): r.get("triton_vs_sdpa-cudnn_fwdbwd") for r in rows
                                       if r["shape"][-1] in (40, 80)},
        "auto_vs_sdpa_min": min(r.get("auto_vs_sdpa_fwdbwd", float("inf")) for r in rows),
    }
    goals["triton_goal_met"] = all((x or 0) >= GOAL_VS_CUDNN for x in goals["triton_vs_cudnn_at_d40_d80"].values())
    print(json.dumps(goals, indent=1))
    result = {"benchmark": "attention_gpu", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": args.dtype, "attention": rows, "goals": goals, "autotuned": autotuned_configs()}
    write_json(args.json, result)  # the attention table stands even if the UNet step never finishes
    print(f"wrote {args.json} (attention)")
    step = unet_step(args.unet_model, dtype, args.unet_batch)
    print(f"image UNet step ({args.unet_model}, batch {args.unet_batch}): stock {step['sdpa_step_s']} s, "
          f"attention auto {step['auto_step_s']} s ({step['speedup']}x), and GroupNorm+SiLU auto "
          f"{step['auto_norm_step_s']} s ({step['speedup_with_norm']}x)")
    for name in ("sdpa", "auto", "auto_norm"):
        print(f"  GPU time by kernel family, {name}: {step[f'{name}_kernel_families']['share']}")
    write_json(args.json, {**result, "unet_step": step})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
