"""Compile the Triton scan kernels for an NVIDIA GPU, without one, and report what the compiled code does.

    python tools/compile_kernels.py [--arch 90] [--dtypes fp32,bf16,fp16] [--quick]   (90: H100 / H200, 80: A100)

The models' scans run on "meta" tensors; each kernel launch is recorded and compiled as it would specialise. Per
state update: (the kernel unrolled for 4 steps - for 2) / (2 N) instructions. BENCHMARKS.md reads the table.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's stand-ins
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # fused multiply-adds, as Triton's launches (3.9) make them
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import scan  # noqa: E402
import triton_scan  # noqa: E402
from bench import scan_inputs  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTERS = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
DTYPES = {name[1:]: dtype for dtype, name in POINTERS.items()}
PASSES = {("_scan_fwd", False): "forward", ("_scan_fwd", True): "forward, span pass", ("_scan_bwd", False): "backward",
          ("_scan_bwd", True): "backward, span pass", ("_state_update_kernel", None): "decode step"}
MODELS = [("Mamba B, C views", (4, 5120, 16, 1024), True), ("Mamba B, C contiguous", (4, 5120, 16, 1024), False),
          ("DASS", (4, 384, 1, 8192), True)]  # (label, (batch, D, N, L), B and C as views of the projection)


def launches(shape: tuple[int, int, int, int], dtype: torch.dtype, bc_views: bool) -> list[tuple[object, dict]]:
    """(kernel, arguments by name) of each launch of the scan's forward, backward and decode step on "meta" tensors."""
    t = {k: v.detach().requires_grad_() for k, v in scan_inputs(*shape, dtype, "meta", bc_views).items()}
    step = {dict(u="x", delta="dt").get(k, k): v.detach()[..., 0] for k, v in t.items() if k in "u delta z B C".split()}
    recorded = []

    def stand_in(kernel) -> collections.defaultdict:  # kernel[grid](*args, **kw) records (kernel, args by name)
        launch = lambda *args, **kw: recorded.append((kernel, dict(zip(kernel.arg_names, args), **kw)))  # noqa: E731
        return collections.defaultdict(lambda: launch)
    with mock.patch.multiple(triton_scan, **{name: stand_in(getattr(triton_scan, name)) for name, _ in PASSES}):
        y = scan.selective_scan(**t, delta_softplus=True, backend="triton")
        torch.autograd.grad(y, list(t.values()), torch.empty_like(y))
        scan.selective_state_update(torch.zeros(*shape[:3], device="meta"), A=t["A"], D=t["D"], dt_bias=t["delta_bias"],
                                    dt_softplus=True, backend="triton", **step)
    return recorded


def compile_launch(kernel, args: dict, arch: int, **override):
    """triton.compile specialised as the launch: pointers 16-byte aligned, integers 1 constant, multiples of 16 so."""
    args, signature, constants, attrs = {**args, **override}, {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = args[param.name]
        if isinstance(value, torch.Tensor):
            signature[param.name], attrs[(i,)] = POINTERS[value.dtype], [["tt.divisibility", 16]]
        elif param.is_constexpr or (value == 1 and not param.do_not_specialize):
            signature[param.name], constants[param.name] = "constexpr", value
        else:
            signature[param.name] = "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": args.get("num_warps", 4)}).asm["cubin"]


def cubin_report(cubin: bytes) -> tuple[dict, collections.Counter]:
    """(registers, stack, shared and local bytes; SASS opcode counts) of a cubin, from cuobjdump and nvdisasm."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([BIN / "nvdisasm", "-c", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass, re.M)
    return dict(zip(("registers", "stack", "shared", "local"), found.groups())), collections.Counter(ops)


def per_update(kernel, args: dict, arch: int) -> list[str]:
    """SASS, fp32, MUFU, SHFL and BAR instructions per state update: (CHUNK = 4) - (CHUNK = 2), over 2 N updates."""
    two, four = (cubin_report(compile_launch(kernel, args, arch, CHUNK=chunk))[1] for chunk in (2, 4))
    diff = {op: (four[op] - two[op]) / (2 * args["DSTATE"]) for op in four | two}
    fp32 = sum(diff.get(op, 0) for op in ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP"))
    return [f"{sum(diff.values()):.1f}", f"{fp32:.1f}"] + [f"{diff.get(op, 0):.2f}" for op in ("MUFU", "SHFL", "BAR")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--dtypes", default="fp32,bf16,fp16")
    p.add_argument("--quick", action="store_true", help="no per-update figures (a third of the compiles)")
    args = p.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_{args.arch}\n\n| kernel | dtype | registers | stack (spill) bytes "
          "| shared bytes | SASS / update | fp32 / update | MUFU | SHFL | BAR |\n" + "|---" * 10 + "|")
    for dtype in args.dtypes.split(","):
        kernels = {}  # name: (kernel, launch); a span pass and the decode step once per model
        for label, shape, bc_views in MODELS:
            for kernel, launch in launches(shape, DTYPES[dtype], bc_views):
                local = launch.get("LOCAL")  # True: a span pass; None: the decode step
                name = f"{label if local is False else label.split()[0]}: {PASSES[kernel.__name__, local]}"
                kernels.setdefault(name, (kernel, launch))
        for name, (kernel, launch) in kernels.items():
            res = cubin_report(compile_launch(kernel, launch, args.arch))[0]
            measured = launch.get("LOCAL") is False and not args.quick  # the main forward and backward
            step = per_update(kernel, launch, args.arch) if measured else ["-"] * 5
            print(f"| {name} | {dtype} | {res['registers']} | {res['stack']} | {res['shared']} | "
                  + " | ".join(step) + " |", flush=True)


if __name__ == "__main__":
    main()
