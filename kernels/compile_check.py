"""Compiles every attention kernel config for the GPUs we target, on any machine (no GPU needed), and
reads the machine code's resource use: registers, spills (stack/local memory), shared memory, and
whether the matrix products use Hopper's wgmma. Fails on a compile error, a spill or too much shared
memory: the CPU interpreter checks the kernels' arithmetic, this checks that they build well for the GPU.

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

from . import attention

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory a block may use
FP32_POINTERS = ("LSE2", "DELTA")
SCALARS = {"scale": "fp32", "qk_scale": "fp32", "n_q": "i32", "n_k": "i32", "head_dim": "i32"}
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


def check_one(kernel: str, config_index: int, head_dim: int, dtype: str, arch: int) -> dict:
    config = attention.configs_for(arch, kernel, head_dim)[config_index]
    fn = attention.KERNELS[kernel]
    d_lo, d_hi = attention.head_split(head_dim)
    constexprs = {**config.kwargs, "D_LO": d_lo, "D_HI": max(d_hi, 16), "SPLIT": d_hi > 0}
    signature, attrs = _signature(fn, dtype)
    row = {"kernel": kernel, "head_dim": head_dim, "dtype": dtype, "arch": arch, **config.kwargs,
           "warps": config.num_warps, "stages": config.num_stages}
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as e:  # noqa: BLE001 - reported per config
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    row.update(_resources(compiled.asm["cubin"]), shared=compiled.metadata.shared,
               wgmma="wgmma" in compiled.asm["ptx"])
    problems = []
    if row["stack"] or row["local"]:
        problems.append(f"spills ({row['stack']} B stack, {row['local']} B local)")
    if row["shared"] > SHARED_LIMIT[arch]:
        problems.append(f"{row['shared']} B shared memory > {SHARED_LIMIT[arch]}")
    if arch >= 90 and not row["wgmma"]:
        problems.append("no wgmma")
    if problems:
        row["error"] = "; ".join(problems)
    return row


def check_all(arches: list[int], dtypes: list[str], workers: int) -> list[dict]:
    jobs = [(kernel, i, head_dim, dtype, arch) for arch in arches for kernel in attention.KERNELS
            for head_dim in attention.head_dims(arch) for i in range(len(attention.configs_for(arch, kernel, head_dim)))
            for dtype in dtypes]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(check_one, *zip(*jobs)))


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
        print(f"{r['kernel']:>7} {r['head_dim']:>4} {r['dtype']:>5} {r['arch']:>3} {r['BLOCK_M']:>4} {r['BLOCK_N']:>4} "
              f"{r['warps']:>5} {r['stages']:>6} {r.get('registers', '-'):>5} "
              f"{r.get('shared', 0) / 1024:>8.1f} {str(r.get('wgmma', '-')):>6}  {r.get('error', '')}")
    failed = [r for r in rows if "error" in r]
    print(f"{len(rows) - len(failed)} of {len(rows)} kernel configs compile cleanly")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
