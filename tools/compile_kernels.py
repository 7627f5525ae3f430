"""Compile the Triton scan kernels for an NVIDIA GPU, without one.

Triton's compiler and the ptxas that ships with the triton wheel turn every kernel variant the models use (Mamba's
N = 16 and DASS's N = 1 tiles, fp32 / bf16 / fp16 inputs, forward, backward, decode step) into a cubin for the given
architecture; ptxas reports each one's registers and spills. This catches what the tests under TRITON_INTERPRET=1
cannot: code that the interpreter runs but the compiler rejects.

    python tools/compile_kernels.py [--arch 90]      (90: H100 / H200, 80: A100)
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's stand-ins
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import triton_scan  # noqa: E402

# pointers to tensors in the input dtype (the rest are fp32: A, D, delta_bias, states, gradients of parameters)
INPUT_DTYPE = {"u_ptr", "delta_ptr", "z_ptr", "B_ptr", "C_ptr", "y_ptr", "x_ptr", "dt_ptr", "dy_ptr", "du_ptr",
               "ddelta_ptr", "dz_ptr"}
DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
# (name, N, channels per group of B/C, L, flags): the shapes the models run
SHAPES = [("Mamba", 16, 5120, 4096, dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)),
          ("DASS", 1, 96, 8192, dict(HAS_D=True, HAS_Z=False, HAS_BIAS=True, SOFTPLUS=True))]


def variants():
    """(kernel, constexprs, label) for every kernel the models launch."""
    for name, dstate, per_group, length, flags in SHAPES:
        chunk, block_n, block_d, block_d_bwd = triton_scan._tiles(dstate, per_group, length, None)
        tile = dict(DSTATE=dstate, BLOCK_N=block_n, CHUNK=chunk)
        for h0 in (False, True):
            yield (triton_scan._scan_fwd_kernel, dict(**flags, **tile, HAS_H0=h0, STORE_ALL=True, BLOCK_D=block_d),
                   f"{name} forward (initial state: {h0})")
        yield (triton_scan._scan_fwd_kernel, dict(**flags, **tile, HAS_H0=False, STORE_ALL=False, BLOCK_D=block_d),
               f"{name} forward, inference")
        yield (triton_scan._scan_bwd_kernel, dict(**flags, **tile, HAS_H0=True, HAS_DLAST=True, BLOCK_D=block_d_bwd),
               f"{name} backward")
        yield (triton_scan._state_update_kernel, dict(**flags, DSTATE=dstate, BLOCK_N=block_n,
                                                      BLOCK_D=32 if block_n <= 16 else max(1, 512 // block_n)),
               f"{name} decode step")


def compile_one(kernel, constexprs: dict, dtype: str, arch: int):
    signature = {a: "constexpr" if a in constexprs else
                 (DTYPES[dtype] if a in INPUT_DTYPE else "*fp32") if a.endswith("_ptr") else "i32"
                 for a in kernel.arg_names}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


def ptxas_report(ptx: str, arch: int) -> str:
    """ptxas -v on the kernel's PTX: 'N registers, S bytes spill stores'."""
    try:  # the ptxas Triton itself uses for this architecture (its wheel ships more than one)
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        run = subprocess.run([str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    if run.returncode:  # the cubin came from Triton itself; only this report is lost
        return f"registers n/a ({ptxas} -v failed: {run.stderr.strip().splitlines()[-1:]})"
    out = run.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} bytes spilled"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--dtypes", default="fp32,bf16,fp16")
    args = p.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    for kernel, constexprs, label in variants():
        for dtype in args.dtypes.split(","):
            compiled = compile_one(kernel, constexprs, dtype, args.arch)
            assert compiled.asm.get("cubin"), f"{label}: no cubin"
            print(f"{label:<36} {dtype:<5} {ptxas_report(compiled.asm['ptx'], args.arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
