"""Attention at XGeM's shapes on one GPU: our Triton kernel against torch SDPA's flash, efficient and cuDNN
backends, forward and forward+backward TFLOP/s; then one tiny/xgem image-UNet training step with the
`sdpa` and `auto` processors. Prints a table and writes JSON. Needs CUDA and triton (no Ray, no DALI).

    python benchmarks/attention_gpu.py [--dtype bf16] [--unet-model xgem] [--json benchmarks/results/attention_gpu.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.attention import flash_attention

# (batch, heads, query length, key length, head dim): the image UNets at 256 px (and 512 px)
SHAPES = [(32, 8, 1024, 1024, 40), (32, 8, 256, 256, 80), (32, 8, 64, 64, 160),
          (8, 8, 4096, 4096, 40), (8, 8, 1024, 1024, 80), (8, 8, 256, 256, 160),
          (16, 8, 1024, 1024, 64), (16, 8, 1024, 1024, 128)]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


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
    for b, h, n_q, n_k, d in SHAPES:
        q = torch.randn(b, h, n_q, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(b, h, n_k, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(b, h, n_k, d, device="cuda", dtype=dtype, requires_grad=True)
        grad = torch.randn(b, h, n_q, d, device="cuda", dtype=dtype)
        flops = 4 * b * h * n_q * n_k * d  # forward: QK^T and PV
        impls = {"triton": lambda: flash_attention(q, k, v)}
        for name, backend in BACKENDS.items():
            impls[name] = lambda backend=backend: _sdpa(backend, q, k, v)
        row = {"shape": [b, h, n_q, n_k, d]}
        for name, fn in impls.items():
            try:
                fwd = timed(lambda: fn())
                both = timed(lambda: fn().backward(grad))
                row[f"{name}_fwd_tflops"] = round(flops / fwd / 1e12, 1)
                row[f"{name}_fwdbwd_tflops"] = round(3.5 * flops / both / 1e12, 1)  # bwd ~ 2.5x fwd
            except RuntimeError as e:
                row[f"{name}_error"] = str(e).split("\n")[0][:120]
            q.grad = k.grad = v.grad = None
        best = max((row.get(f"{n}_fwdbwd_tflops", 0) for n in BACKENDS), default=0)
        row["triton_vs_best_sdpa_fwdbwd"] = round(row.get("triton_fwdbwd_tflops", 0) / best, 2) if best else None
        rows.append(row)
    return rows


def _sdpa(backend, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def unet_step(model_name: str, dtype: torch.dtype, batch: int) -> dict:
    from xgem_dist.model.attention import set_attention_backend
    from xgem_dist.model.xgem import build_xgem

    model = build_xgem(model_name, device="cuda").to(dtype)
    unet = model.unet_frontal
    side = 32 if model_name != "tiny" else 16
    x = torch.randn(batch, 4, side, side, device="cuda", dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device="cuda")
    context = torch.randn(batch, 1, model.config.image_unet.context_dim, device="cuda", dtype=dtype)
    out = {}
    for backend in ("sdpa", "auto"):
        set_attention_backend(unet, backend)
        out[f"{backend}_step_s"] = round(timed(lambda: unet(x, t, context).float().square().mean().backward(), 5), 4)
    out["speedup"] = round(out["sdpa_step_s"] / out["auto_step_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--unet-model", default="xgem-lean")
    parser.add_argument("--unet-batch", type=int, default=16)
    parser.add_argument("--json", default="benchmarks/results/attention_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    rows = attention_rows(dtype)
    print(f"{'shape':>28} " + " ".join(f"{n:>9}" for n in ("triton", *BACKENDS)) + "  (fwd+bwd TFLOP/s)")
    for r in rows:
        print(f"{str(r['shape']):>28} " + " ".join(f"{r.get(f'{n}_fwdbwd_tflops', float('nan')):>9}"
                                                   for n in ("triton", *BACKENDS)))
    step = unet_step(args.unet_model, dtype, args.unet_batch)
    print(f"image UNet step ({args.unet_model}, batch {args.unet_batch}): {step}")
    result = {"benchmark": "attention_gpu", "gpu": torch.cuda.get_device_name(), "dtype": args.dtype,
              "attention": rows, "unet_step": step}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
