"""The selective scan benchmark (eqs. (3)-(6)): the Triton kernels beside mamba_ssm's CUDA kernels, mambapy's parallel
scan and a device-to-device copy on a GPU; the chunked PyTorch fallback beside the sequential loop on a CPU.

    python tools/bench_scan.py [--quick] [--device cuda|cpu] [--mamba-ssm BUILD_DIR] [--smoke]
    python tools/bench_scan.py --build-mamba-ssm SRC_DIR   (mamba_ssm's selective_scan_cuda for this GPU, timed)

GPU: the Mamba-2.8B shapes (D = 5120, N = 16) at batch 4, L = 1024 and batch 1, L = 2048, and DASS's (N = 1), in fp32
and bf16. The Triton kernels get their inputs as the Mamba mixer makes them (Δ, z transposes; B, C views of x_proj's
output); mamba_ssm gets the contiguous (batch, D, L) inputs its kernels require, and only its kernels are timed.
Times: triton.testing.do_bench_cudagraph (many calls in one CUDA graph, replayed between CUDA events: no Python
launch overhead; the median). Training memory: what the
scan's autograd node keeps beyond its inputs, over u's size in fp32, and the peak memory of forward + backward.
Every row is printed as soon as it is measured. Then the span sweep: the Triton kernels with time split into 1, 2,
4 and 8 spans (how many warps per SM the plan should aim for). --smoke: tiny shapes through the same code on CPU
(the Triton kernels under TRITON_INTERPRET=1), the check that this script runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.utils import cpp_extension

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scan  # noqa: E402
import triton_scan  # noqa: E402

try:
    from mambapy.pscan import pscan
except ImportError:  # an oracle only; its column reads n/a without it
    pscan = None

ROOT = Path(__file__).resolve().parents[1]
MAMBA = [(4, 5120, 16, 1024), (1, 5120, 16, 2048)]                         # (batch, D, N, L)
DASS = [(4, 384, 1, 8192), (1, 384, 1, 65536)]
SMOKE = [(1, 32, 4, 6), (1, 32, 1, 6)]


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the implementations
# ----------------------------------------------------------------------------------------------------------------

def scan_inputs(batch: int, dim: int, dstate: int, length: int, dtype: torch.dtype, device: torch.device,
                bc_views: bool = True) -> dict[str, torch.Tensor]:
    """Inputs as the models hand them to the scan. N > 1, the Mamba mixer: x (batch, D, L) contiguous; Δ the transpose
    of a (batch, L, D) projection; z half of in_proj's (batch, L, 2D) output; B, C views of x_proj's (batch, L,
    160 + 2N) output (bc_views) or contiguous (batch, N, L). N = 1, DASS's SS2D: four directions as four groups of
    D / 4 channels, every tensor contiguous, no gate. A = -[1 .. N] per channel (S4D-real), D, delta_bias fp32."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    t = dict(A=-torch.arange(1, dstate + 1, dtype=torch.float32, device=device).repeat(dim, 1),
             D=torch.randn(dim, generator=g).to(device), delta_bias=torch.randn(dim, generator=g).to(device))
    if dstate == 1:
        return dict(t, u=rnd(batch, dim, length), delta=rnd(batch, dim, length) - 2.0,
                    B=rnd(batch, 4, dstate, length), C=rnd(batch, 4, dstate, length))
    proj = rnd(batch, length, 160 + 2 * dstate)                            # x_proj: (dt_rank, B, C) per step
    B, C = (proj[..., 160:160 + dstate].transpose(1, 2), proj[..., 160 + dstate:].transpose(1, 2))
    return dict(t, u=rnd(batch, dim, length), delta=(rnd(batch, length, dim) - 2.0).transpose(1, 2),
                z=rnd(batch, length, 2 * dim)[..., dim:].transpose(1, 2), B=B if bc_views else B.contiguous(),
                C=C if bc_views else C.contiguous())


def grouped(t: dict) -> dict:
    """B, C as (batch, G, N, L), as scan.selective_scan hands them on."""
    return dict(t, **{k: t[k] if t[k].dim() == 4 else t[k].unsqueeze(1) for k in ("B", "C")})


def triton_fwd_bwd(t: dict, **tiles) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward without autograd, forward + backward) of the Triton scan; tiles (span) override its plan."""
    checked = grouped(t)
    dy = torch.randn_like(t["u"])
    leaves = {k: v.detach().requires_grad_() for k, v in checked.items()}

    def fwd():
        with torch.no_grad():
            return triton_scan.selective_scan(**checked, delta_softplus=True, **tiles)

    def fwd_bwd():
        y = triton_scan.selective_scan(**leaves, delta_softplus=True, **tiles)
        return torch.autograd.grad(y, list(leaves.values()), dy)

    return fwd, fwd_bwd


def mamba_ssm_fwd_bwd(module, t: dict) -> tuple[Callable[[], object], Callable[[], object]]:
    """mamba_ssm's kernels (selective_scan_cuda.fwd / .bwd, as its SelectiveScanFn calls them) on contiguous copies
    of the inputs, made once here: only the kernels are timed."""
    c = {k: v.contiguous() for k, v in grouped(t).items()}
    args = [c["u"], c["delta"], c["A"], c["B"], c["C"], c["D"], c.get("z"), c["delta_bias"]]
    dy = torch.randn_like(c["u"])

    def fwd():
        return module.fwd(*args, True)

    def fwd_bwd():
        out, states, *_ = module.fwd(*args, True)
        return module.bwd(*args, dy, states, out, None, True, False)

    return fwd, fwd_bwd


def pscan_fwd_bwd(t: dict) -> Callable[[], object]:
    """Forward + backward with mambapy's parallel scan for eq. (5) ((batch, L, D, N) decays materialised)."""
    leaves = {k: v.detach().float().requires_grad_() for k, v in grouped(t).items()}

    def fwd_bwd():
        u, delta, A = leaves["u"], leaves["delta"], leaves["A"]
        B, C = (scan._per_channel(leaves[k], u.shape[1]).permute(0, 3, 1, 2) for k in ("B", "C"))  # (b, L, D, N)
        dt = F.softplus(delta + leaves["delta_bias"][:, None]).transpose(1, 2)[..., None]    # (batch, L, D, 1)
        hs = pscan(torch.exp(dt * A), dt * u.transpose(1, 2)[..., None] * B)
        y = (hs * C).sum(-1).transpose(1, 2) + leaves["D"][:, None] * u
        y = y * F.silu(leaves["z"]) if "z" in leaves else y
        return torch.autograd.grad(y.sum(), list(leaves.values()))

    return fwd_bwd


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------

UNGRAPHED: list[str] = []  # what could not be captured in a CUDA graph, timed with its launch overhead


def milliseconds(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """CUDA: triton.testing.do_bench_cudagraph's median (one CUDA graph of many calls, replayed between CUDA events:
    no Python launch overhead); if the capture fails, do_bench's (events around the calls) and a note in
    UNGRAPHED. CPU: the best of reps after one warm-up call (one call if reps is 1)."""
    if device.type == "cuda":
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except (RuntimeError, torch.cuda.CudaError) as e:
            UNGRAPHED.append(f"{getattr(fn, '__qualname__', fn)}: {str(e).splitlines()[0][:120]}")
            torch.cuda.synchronize(device)
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    if reps > 1:
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def kept_over_u(t: dict) -> float:
    """Bytes the scan's autograd node keeps beyond its inputs, over u's size in fp32."""
    leaves = {k: v.detach().requires_grad_() for k, v in t.items()}
    given = {v.data_ptr() for v in leaves.values()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        scan.selective_scan(**leaves, delta_softplus=True, backend="triton")
    kept = sum(x.numel() * x.element_size() for x in saved if x.data_ptr() not in given)
    return kept / (leaves["u"].numel() * 4)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """The peak memory one call of fn allocates beyond what was allocated before it, MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def copy_gbs(device: torch.device) -> float | None:
    """Device-to-device copy of 1 GiB in GB/s, bytes read and written (None on CPU)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / milliseconds(lambda: dst.copy_(src), device) / 1e6


def fmt(x: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def row(cells: list[str]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


HEADER = ["(batch, D, N, L)", "dtype", "Triton fwd ms", "Triton fwd+bwd ms", "mamba_ssm fwd ms",
          "mamba_ssm fwd+bwd ms", "fwd speed-up", "fwd+bwd speed-up", "Triton fwd GB/s (% of copy)",
          "kept / u fp32", "fwd+bwd peak MiB", "pscan fwd+bwd ms"]


def device_row(shape, dtype: torch.dtype, device: torch.device, mamba, copy: float | None, bc_views: bool = True,
               reps: int = 3) -> None:
    """One row: the Triton kernels, mamba_ssm's, mambapy's pscan and the memory figures at one shape."""
    batch, dim, dstate, length = shape
    t = scan_inputs(*shape, dtype, device, bc_views)
    fwd, fwd_bwd = triton_fwd_bwd(t)
    ms_f, ms_fb = milliseconds(fwd, device, reps), milliseconds(fwd_bwd, device, reps)
    ms_mf = ms_mfb = ms_p = None
    if mamba is not None:
        m_fwd, m_fwd_bwd = mamba_ssm_fwd_bwd(mamba, t)
        ms_mf, ms_mfb = milliseconds(m_fwd, device), milliseconds(m_fwd_bwd, device)
    fits = device.type == "cpu" or 10 * batch * length * dim * dstate * 4 < torch.cuda.mem_get_info(device)[0]
    if pscan is not None and fits:
        ms_p = milliseconds(pscan_fwd_bwd(t), device, reps)
    moved = sum(t[k].numel() for k in ("u", "delta", "z", "B", "C") if k in t) + t["u"].numel()  # ... and write y
    gbs = moved * t["u"].element_size() / ms_f / 1e6
    ratio = lambda a, b: None if a is None else a / b  # noqa: E731
    row([str(shape) + ("" if bc_views else ", B, C contiguous"), str(dtype).removeprefix("torch."), fmt(ms_f),
         fmt(ms_fb), fmt(ms_mf), fmt(ms_mfb), fmt(ratio(ms_mf, ms_f), ".2f", "x"),
         fmt(ratio(ms_mfb, ms_fb), ".2f", "x"), f"{gbs:.0f}" + (f" ({100 * gbs / copy:.0f}%)" if copy else ""),
         f"{kept_over_u(t):.3f}", fmt(peak_mib(fwd_bwd, device), ".0f"), fmt(ms_p)])


def span_sweep(shape, dtype: torch.dtype, device: torch.device, reps: int = 3) -> None:
    """The Triton kernels with time split into 1, 2, 4, 8 spans (the plan's choice marked)."""
    batch, dim, dstate, length = shape
    t = scan_inputs(*shape, dtype, device)
    chosen = triton_scan.plan(batch, dim, dstate, grouped(t)["B"].shape[1], length, device)
    spans = {triton.cdiv(triton.cdiv(length, chosen.seg), n) * chosen.seg for n in (1, 2, 4, 8)}
    for span in sorted(spans, reverse=True):
        fwd, fwd_bwd = triton_fwd_bwd(t, span=span)
        row([str(shape), str(dtype).removeprefix("torch."), str(triton.cdiv(length, span)) +
             (" (plan)" if span == chosen.span else ""), fmt(milliseconds(fwd, device, reps)),
             fmt(milliseconds(fwd_bwd, device, reps))])


def cpu_table(shapes, lengths) -> None:
    """The chunked PyTorch fallback against the sequential loop on CPU, fp32."""
    print(f"fp32 on CPU, {torch.get_num_threads()} threads; fallback = scan._scan_chunked (backend 'torch'), "
          f"loop = scan.selective_scan_ref.\n")
    row(["(batch, D, N, L)", "loop fwd ms", "fallback fwd ms", "speed-up", "fallback fwd+bwd ms"])
    row(["---"] * 5)
    device = torch.device("cpu")
    for batch, dim, dstate in shapes:
        for length in lengths:
            t = {k: v.contiguous() for k, v in scan_inputs(batch, dim, dstate, length, torch.float32, device).items()}
            run = lambda backend: scan.selective_scan(**t, delta_softplus=True, backend=backend)  # noqa: E731
            with torch.no_grad():
                ms_loop, ms_torch = milliseconds(lambda: run("ref"), device), milliseconds(lambda: run("torch"), device)
            leaves = [v.requires_grad_() for v in t.values()]
            ms_fb = milliseconds(lambda: torch.autograd.grad(run("torch").sum(), leaves), device)
            row([str((batch, dim, dstate, length)), f"{ms_loop:.1f}", f"{ms_torch:.1f}", f"{ms_loop / ms_torch:.1f}x",
                 f"{ms_fb:.1f}"])


# ----------------------------------------------------------------------------------------------------------------
# mamba_ssm's extension
# ----------------------------------------------------------------------------------------------------------------

def build_mamba_ssm(src: Path, build: Path):
    """Build only mamba_ssm's selective-scan extension (selective_scan_cuda) from its source tree (csrc/selective_scan),
    for this GPU's architecture, with the nvcc flags of mamba_ssm's setup.py, into `build`; return the module."""
    sources = sorted(str(p) for p in (src / "csrc" / "selective_scan").glob("*.c*"))
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count()))
    build.mkdir(parents=True, exist_ok=True)
    nvcc = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr",
            "--expt-extended-lambda", "--use_fast_math", "--threads", "4"]
    return cpp_extension.load("selective_scan_cuda", sources, extra_cflags=["-O3", "-std=c++17"],
                              extra_cuda_cflags=nvcc, extra_include_paths=[str(src / "csrc" / "selective_scan")],
                              build_directory=str(build), verbose=True)


def load_mamba_ssm(build: Path | None):
    """The selective_scan_cuda module built in `build` by --build-mamba-ssm, or None."""
    if build is None or not list(build.glob("selective_scan_cuda*.so")):
        return None
    sys.path.insert(0, str(build))
    return importlib.import_module("selective_scan_cuda")


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="the headline shapes only")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, Triton interpreted (a test run)")
    p.add_argument("--mamba-ssm", type=Path, default=ROOT / ".mamba_ssm_build", help="where the extension was built")
    p.add_argument("--build-mamba-ssm", type=Path, metavar="SRC", help="build mamba_ssm's extension from SRC, exit")
    args = p.parse_args(argv)
    if args.build_mamba_ssm:
        start = time.perf_counter()
        module = build_mamba_ssm(args.build_mamba_ssm, args.mamba_ssm)
        print(f"built {module.__name__} in {time.perf_counter() - start:.0f} s into {args.mamba_ssm}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cpu" and not args.smoke:
        cpu_table([(1, 96, 1), (1, 64, 16)] + ([] if args.quick else [(2, 256, 16)]),
                  [4096] if args.quick else [1024, 4096])
        return 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mamba = load_mamba_ssm(args.mamba_ssm) if device.type == "cuda" else None
    copy = copy_gbs(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreted)"
    print(f"{name}; torch {torch.__version__}, triton {triton.__version__}; mamba_ssm: "
          f"{'selective_scan_cuda from ' + str(args.mamba_ssm) if mamba else 'n/a (not built)'}; device-to-device "
          f"copy {fmt(copy, '.0f')} GB/s. Speed-up: mamba_ssm's time over Triton's.\n")
    row(HEADER)
    row(["---"] * len(HEADER))
    shapes = SMOKE if args.smoke else (MAMBA[:1] + DASS[:1] if args.quick else MAMBA + DASS)
    dtypes = [torch.float32] if args.smoke else [torch.float32, torch.bfloat16]
    reps = 1 if args.smoke else 3
    for shape in shapes:
        for dtype in dtypes:
            device_row(shape, dtype, device, mamba, copy, reps=reps)
    device_row(shapes[0], dtypes[-1], device, mamba, copy, bc_views=False, reps=reps)
    print("\nSpan sweep: the Triton kernels with time split into 1, 2, 4, 8 spans run in parallel.\n")
    row(["(batch, D, N, L)", "dtype", "spans", "Triton fwd ms", "Triton fwd+bwd ms"])
    row(["---"] * 5)
    for shape in shapes[:1] if args.smoke else MAMBA:
        span_sweep(shape, dtypes[-1], device, reps)
    if UNGRAPHED:
        print("\nTimed with do_bench, launch overhead included (no CUDA graph): " + "; ".join(UNGRAPHED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
