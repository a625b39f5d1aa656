"""Compiles every attention kernel config, and the GroupNorm kernels at each tile shape XGeM's activations
get, for the GPUs we target, on any machine (no GPU needed), and reads the machine code's resource use:
registers, spills (stack/local memory), shared memory, and whether attention's matrix products use
Hopper's wgmma. Fails on a compile error, a spill or too much shared memory: the CPU interpreter checks
the kernels' arithmetic, this checks that they build well for the GPU.

    python -m kernels.compile_check [--arch 90 --arch 80] [--dtype bf16] [--json out.json]

Must run without TRITON_INTERPRET (it compiles), so tests call it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import attention, group_norm

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory a block may use
FP32_POINTERS = ("LSE2", "DELTA", "MEAN", "RSTD", "DW", "DB", "W", "B")  # GroupNorm: fp32 weights (autocast)
SCALARS = {"scale": "fp32", "qk_scale": "fp32", "n_q": "i32", "n_k": "i32", "head_dim": "i32",
           "groups": "i32", "channels": "i32", "positions": "i32", "eps": "fp32", "inv_count": "fp32"}
# GroupNorm (channels per group, positions): image UNets at 256 and 512 px (latent sides 32..4, 64..8;
# 320..2560 channels incl. the decoder's concatenations, 32 groups) and the text UNet's 4C features
GROUP_NORM_SHAPES = sorted({(c, s) for c in (5, 10, 20, 30, 40, 60, 80) for s in (4096, 1024, 256, 64, 16)}
                           | {(c, 1) for c in (40, 80, 120, 160, 240)})
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _signature(fn, dtype: str) -> tuple[dict, dict]:
    """Signature and the 16-byte alignment attributes a launch with torch tensors gets."""
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in SCALARS:
            signature[name] = SCALARS[name]
        else:
            signature[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(item.split(":", 1) for item in line.split())
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}


def _compile(row: dict, fn, dtype: str, constexprs: dict, warps: int, stages: int, needs_wgmma: bool) -> dict:
    arch = row["arch"]
    signature, attrs = _signature(fn, dtype)
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
    except Exception as e:  # noqa: BLE001 - reported per config
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    row.update(_resources(compiled.asm["cubin"]), shared=compiled.metadata.shared,
               wgmma="wgmma" in compiled.asm["ptx"])
    problems = []
    if row["stack"] or row["local"]:
        problems.append(f"spills ({row['stack']} B stack, {row['local']} B local)")
    if row["shared"] > SHARED_LIMIT[arch]:
        problems.append(f"{row['shared']} B shared memory > {SHARED_LIMIT[arch]}")
    if needs_wgmma and arch >= 90 and not row["wgmma"]:
        problems.append("no wgmma")
    if problems:
        row["error"] = "; ".join(problems)
    return row


def check_one(kernel: str, config_index: int, head_dim: int, dtype: str, arch: int) -> dict:
    config = attention.configs_for(arch, kernel, head_dim)[config_index]
    d_lo, d_hi = attention.head_split(head_dim)
    constexprs = {**config.kwargs, "D_LO": d_lo, "D_HI": max(d_hi, 16), "SPLIT": d_hi > 0}
    row = {"kernel": kernel, "head_dim": head_dim, "dtype": dtype, "arch": arch, **config.kwargs,
           "warps": config.num_warps, "stages": config.num_stages}
    return _compile(row, attention.KERNELS[kernel], dtype, constexprs, config.num_warps, config.num_stages, True)


def check_group_norm(kernel: str, channels: int, positions: int, dtype: str, arch: int) -> dict:
    tiles = group_norm.blocks(channels, positions)
    warps = tiles.pop("num_warps")
    row = {"kernel": f"gn-{kernel}", "channels": channels, "positions": positions, "dtype": dtype, "arch": arch,
           **tiles, "warps": warps}
    fn = group_norm.KERNELS[kernel]
    return _compile(row, fn, dtype, {**tiles, "SILU": True}, warps, 1, False)


def check_all(arches: list[int], dtypes: list[str], workers: int) -> list[dict]:
    jobs = [(kernel, i, head_dim, dtype, arch) for arch in arches for kernel in attention.KERNELS
            for head_dim in attention.head_dims(arch) for i in range(len(attention.configs_for(arch, kernel, head_dim)))
            for dtype in dtypes]
    tiles = {tuple(group_norm.blocks(c, s).items()): (c, s) for c, s in GROUP_NORM_SHAPES}  # one shape per tile
    norm_jobs = [(kernel, c, s, dtype, arch) for arch in arches for kernel in group_norm.KERNELS
                 for c, s in sorted(tiles.values()) for dtype in dtypes]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(check_one, *zip(*jobs))) + list(pool.map(check_group_norm, *zip(*norm_jobs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90 and 80)")
    parser.add_argument("--dtype", action="append", choices=["bf16", "fp16"], help="default: bf16 and fp16")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this check compiles the kernels")
    rows = check_all(args.arch or [90, 80], args.dtype or ["bf16", "fp16"], args.workers)
    print(f"{'kernel':>7} {'D':>4} {'dtype':>5} {'sm':>3} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} "
          f"{'regs':>5} {'smem KB':>8} {'wgmma':>6}  problem")
    for r in rows:
        if "head_dim" not in r:
            continue
        print(f"{r['kernel']:>7} {r['head_dim']:>4} {r['dtype']:>5} {r['arch']:>3} {r['BLOCK_M']:>4} {r['BLOCK_N']:>4} "
              f"{r['warps']:>5} {r['stages']:>6} {r.get('registers', '-'):>5} "
              f"{r.get('shared', 0) / 1024:>8.1f} {str(r.get('wgmma', '-')):>6}  {r.get('error', '')}")
    print(f"\n{'kernel':>7} {'C/G':>4} {'HW':>5} {'dtype':>5} {'sm':>3} {'tile':>8} {'warps':>5} {'regs':>5}  problem")
    for r in rows:
        if "channels" in r:
            print(f"{r['kernel']:>7} {r['channels']:>4} {r['positions']:>5} {r['dtype']:>5} {r['arch']:>3} "
                  f"{r['BLOCK_C']:>3}x{r['BLOCK_S']:<4} {r['warps']:>5} {r.get('registers', '-'):>5}  "
                  f"{r.get('error', '')}")
    failed = [r for r in rows if "error" in r]
    print(f"{len(rows) - len(failed)} of {len(rows)} kernel configs compile cleanly")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
