"""Compile the Triton scan kernels for an NVIDIA GPU, without one, and report what the compiled code does.

Triton's compiler and the ptxas in the triton wheel turn every kernel variant the models launch (Mamba-2.8B's N = 16
and DASS's N = 1; the forward and its span pass, the backward and its span pass, the decode step) into a cubin, with
the integer arguments specialised as a launch with the models' tensors specialises them (the Mamba mixer's strides:
Δ, z, y and dy are transposes). From the cubin (the wheel's cuobjdump and nvdisasm): registers, spilled bytes, and
per state update (one state of one channel at one step) the SASS instructions, the MUFU (exp2, log, rcp), SHFL and
barrier instructions. Per-update figures are the difference between the kernel compiled with 2 and 4 steps per chunk,
over 2 · N updates, so loop set-up does not count. This catches what TRITON_INTERPRET=1 cannot (code the compiler
rejects, spills, layout conversions through shared memory) and is what BENCHMARKS.md reasons from.

    python tools/compile_kernels.py [--arch 90] [--dtypes fp32,bf16,fp16] [--quick]   (90: H100 / H200, 80: A100)

--quick compiles each variant once, without the per-update figures (what tests/test_scan.py runs).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's stand-ins
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default (fused multiply-adds), said explicitly
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import triton_scan  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
ACTIVATIONS = {"u_ptr", "delta_ptr", "z_ptr", "y_ptr", "dy_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "B_ptr", "C_ptr",
               "x_ptr", "dt_ptr"}  # in the input dtype; the rest (A, D, delta_bias, states, gradients) fp32


def mamba_args(bc_view: bool) -> dict:
    """Mamba-2.8B (D = 5120, N = 16, dt_rank 160) at batch 4, L = 1024, as its mixer calls the scan: x contiguous
    (batch, D, L); Δ and y (batch, L, D) memory; z half of in_proj's (batch, L, 2D); B, C either (batch, N, L)
    contiguous or, with bc_view, views of x_proj's (batch, L, 160 + 2N) output (no copy)."""
    d, n, length = 5120, 16, 1024
    bdl, ldl = (d * length, length, 1), (d * length, 1, d)
    bc = (length * 192, 0, 1, 192) if bc_view else (n * length, n * length, length, 1)
    return dict(zip(("su", "sv", "sz", "sy", "sg", "sr", "sq"), (bdl, ldl, (2 * d * length, 1, 2 * d), ldl, bdl,
                                                               ldl, bdl)), sB=bc, sC=bc, dim=d, length=length,
                channels_per_group=d, n_groups=1, n_seg=length // 128, n_span=2)


def dass_args() -> dict:
    """DASS-small's SS2D (4 directions x 96 channels, N = 1) on 10 s of audio (L = 32 x 256 patches): contiguous
    inputs, B and C slices of the (batch, 4, dt_rank + 2N, L) projection."""
    d, length = 384, 8192
    bdl = (d * length, length, 1)
    return dict(zip(("su", "sv", "sz", "sy", "sg", "sr", "sq"), [bdl] * 7), sB=(32 * length, 8 * length, length, 1),
                sC=(32 * length, 8 * length, length, 1), dim=d, length=length, channels_per_group=96, n_groups=4,
                n_seg=length // 128, n_span=11)


FLAGS = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True)
MODELS = {"Mamba": (16, dict(FLAGS, HAS_Z=True)), "DASS": (1, dict(FLAGS, HAS_Z=False))}


def variants():
    """(label, kernel, constexprs, argument values, N, per-update?) of every kernel the models launch."""
    for model, (dstate, flags) in MODELS.items():
        tiles = dict(DSTATE=dstate, BLOCK_N=triton.next_power_of_2(dstate), BLOCK_D=32, SEG=128, SPAN=512)
        layouts = [("B, C views", mamba_args(True)), ("B, C contiguous", mamba_args(False))] if model == "Mamba" \
            else [("", dass_args())]
        for layout, args in layouts:
            label = f"{model} {layout}".strip()
            yield (f"{label}: forward", triton_scan._scan_fwd, dict(flags, **tiles, HAS_H0=False, LOCAL=False,
                                                                    STORE_STATES=True), args, dstate, True)
            yield (f"{label}: backward", triton_scan._scan_bwd, dict(flags, **tiles, HAS_H0=False, LOCAL=False,
                                                                     HAS_DLAST=True), args, dstate, True)
        yield (f"{model}: forward, span pass", triton_scan._scan_fwd, dict(flags, **tiles, HAS_H0=True, LOCAL=True,
                                                                           STORE_STATES=False), args, dstate, False)
        yield (f"{model}: backward, span pass", triton_scan._scan_bwd, dict(flags, **tiles, HAS_H0=True, LOCAL=True,
                                                                            HAS_DLAST=True), args, dstate, False)
        yield (f"{model}: decode step", triton_scan._state_update_kernel,
               dict(flags, DSTATE=dstate, BLOCK_N=triton.next_power_of_2(dstate), BLOCK_D=32),
               dict(dim=args["dim"], n_groups=args["n_groups"], channels_per_group=args["channels_per_group"]),
               dstate, False)


def compile_one(kernel, constexprs: dict, args: dict, dtype: str, arch: int):
    """triton.compile with the signature and specialisation a launch gives: pointers 16-byte aligned, integers
    equal to 1 made constants and multiples of 16 marked so, except the arguments the kernel keeps at run time."""
    values = {f"{k}_{axis}": v for k, strides in args.items() if k.startswith("s") and isinstance(strides, tuple)
              for axis, v in zip("bgnt" if len(strides) == 4 else "bdt", strides)}
    values.update({k: v for k, v in args.items() if isinstance(v, int)}, unit=1)
    signature, attrs, constants = {}, {}, dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = DTYPES[dtype] if name in ACTIVATIONS else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in triton_scan._CHANNEL_STRIDES:
            signature[name] = "i32"
        elif values[name] == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": 1 if "scan" in kernel.__name__
                                                                       else 4})


def cubin_report(cubin: bytes) -> tuple[dict, collections.Counter]:
    """(resource usage, SASS opcode counts) of a cubin, from the wheel's cuobjdump and nvdisasm."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True)
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", str(path)], capture_output=True, text=True)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage.stdout)
    resources = dict(zip(("registers", "stack", "shared", "local"), map(int, found.groups()))) if found else {}
    ops = collections.Counter(m.group(1) for m in re.finditer(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)",
                                                             sass.stdout, re.M))
    return resources, ops


def per_update(kernel, constexprs: dict, args: dict, dtype: str, arch: int, dstate: int) -> dict:
    """SASS instructions per state update: (kernel with CHUNK = 4) - (CHUNK = 2), over 2 steps of N updates."""
    counts = [cubin_report(compile_one(kernel, dict(constexprs, CHUNK=chunk), args, dtype, arch).asm["cubin"])[1]
              for chunk in (2, 4)]
    diff = {op: (counts[1][op] - counts[0][op]) / (2 * dstate) for op in counts[1] | counts[0]}
    fp32 = sum(v for op, v in diff.items() if op in ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP"))
    return dict(sass=sum(diff.values()), fp32=fp32, mufu=diff.get("MUFU", 0), shfl=diff.get("SHFL", 0),
                bar=diff.get("BAR", 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--dtypes", default="fp32,bf16,fp16")
    p.add_argument("--quick", action="store_true", help="no per-update figures (half the compiles)")
    args = p.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_{args.arch}; per state update: SASS instructions (of them fp32 "
          f"arithmetic), MUFU, SHFL, BAR")
    print("| kernel | dtype | registers | stack (spill) bytes | shared bytes | SASS / update | fp32 / update | MUFU "
          "| SHFL | BAR |\n|---|---|---|---|---|---|---|---|---|---|")
    for label, kernel, constexprs, values, dstate, measure in variants():
        for dtype in args.dtypes.split(","):
            compiled = compile_one(kernel, dict(constexprs, CHUNK=4) if "scan" in kernel.__name__ else constexprs,
                                   values, dtype, args.arch)
            if not compiled.asm.get("cubin"):
                raise SystemExit(f"{label} {dtype}: no cubin")
            res, _ = cubin_report(compiled.asm["cubin"])
            step = per_update(kernel, constexprs, values, dtype, args.arch, dstate) if measure and not args.quick \
                else None
            cells = ["-"] * 5 if step is None else [f"{step['sass']:.1f}", f"{step['fp32']:.1f}", f"{step['mufu']:.2f}",
                                                    f"{step['shfl']:.2f}", f"{step['bar']:.2f}"]
            print(f"| {label} | {dtype} | {res.get('registers', '?')} | {res.get('stack', '?')} | "
                  f"{res.get('shared', '?')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
