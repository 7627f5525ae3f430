"""Benchmarks. `python bench.py <command> [--quick] [--device DEVICE] [--threads N]`; commands are in COMMANDS.

    scan   the selective scan (eqs. (3)-(6)). On CUDA: the Triton kernels at Mamba-2.8B and DASS shapes, forward and
           forward+backward, against a device-to-device copy (the memory roofline), the sequential loop and mambapy's
           parallel scan. On CPU: the chunked PyTorch fallback against the sequential loop.

Timing: CUDA events (on CPU perf_counter) around each call after warm-up; the median (CPU: minimum) of several
repetitions.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import mamba


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------

def timeit(fn: Callable[[], object], device: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Wall time of fn() in milliseconds: the median over reps on CUDA, the minimum on CPU (where other processes
    only ever add time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times) if device.type == "cuda" else min(times)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def fmt(x: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


# ----------------------------------------------------------------------------------------------------------------
# scan
# ----------------------------------------------------------------------------------------------------------------

def scan_inputs(batch: int, dim: int, dstate: int, length: int, dtype: torch.dtype, device, requires_grad=False):
    """Inputs as the Mamba mixer passes them: u, Δ, z, B, C in the activation dtype; A, D, delta_bias fp32."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g).to(device=device, dtype=dt)  # noqa: E731
    t = dict(u=rnd(batch, dim, length), delta=rnd(batch, dim, length) - 2.0, z=rnd(batch, dim, length),
             B=rnd(batch, dstate, length), C=rnd(batch, dstate, length),
             A=-torch.arange(1, dstate + 1, dtype=torch.float32, device=device).repeat(dim, 1),  # S4D-real init
             D=rnd(dim, dt=torch.float32), delta_bias=rnd(dim, dt=torch.float32))
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


def scan_bytes(batch: int, dim: int, dstate: int, length: int, dtype: torch.dtype) -> int:
    """The least memory traffic of a forward: read u, Δ, z, B, C, write y."""
    return (4 * batch * dim + 2 * batch * dstate) * length * torch.tensor([], dtype=dtype).element_size()


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias, pscan):
    """The scan with mambapy's parallel scan for eq. (5): the (batch, L, D, N) decays and inputs are materialised."""
    dt = torch.nn.functional.softplus(delta.float() + delta_bias[:, None])            # (batch, D, L)
    a = torch.exp(dt.transpose(1, 2)[..., None] * A)                                   # (batch, L, D, N)
    x = (dt * u).transpose(1, 2)[..., None] * B.float().transpose(1, 2)[:, :, None, :]
    hs = pscan(a, x)
    y = (hs * C.float().transpose(1, 2)[:, :, None, :]).sum(-1).transpose(1, 2) + D[:, None] * u
    return (y * torch.nn.functional.silu(z.float())).to(u.dtype)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy in GB/s, counting the bytes read and written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / ms / 1e6


def scan_row(batch, dim, dstate, length, dtype, device, backend, copy_gbs, pscan, ref_max_ms, reps):
    """One row of the device table: times, GB/s, speedups and peak memory of one shape."""
    cuda = device.type == "cuda"
    t = scan_inputs(batch, dim, dstate, length, dtype, device, requires_grad=True)
    kwargs = dict(delta_softplus=True)

    def fwd():
        with torch.no_grad():
            return mamba.selective_scan(**t, **kwargs, backend=backend)

    dy = torch.randn(batch, dim, length, device=device, dtype=dtype)
    leaves = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]

    def fwd_bwd():
        y = mamba.selective_scan(**t, **kwargs, backend=backend)
        return torch.autograd.grad(y, leaves, dy)

    ms_fwd = timeit(fwd, device, reps=reps)
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fwd_bwd()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    ms_fb = timeit(fwd_bwd, device, reps=reps)
    gbs = scan_bytes(batch, dim, dstate, length, dtype) / ms_fwd / 1e6

    # The sequential loop (forward only; its backward keeps every state): skipped where it would take too long.
    ms_ref = None
    est_ref_ms = 64.0 * (batch * dim * dstate * length) / (4 * 5120 * 16 * 1024)  # measured on an H200
    if not cuda or est_ref_ms <= ref_max_ms:
        ms_ref = timeit(lambda: mamba.selective_scan(**{k: v.detach() for k, v in t.items()}, **kwargs,
                                                     backend="ref"), device, warmup=1, reps=2)
    # mambapy: it materialises about eight (batch, L, D, N) fp32 tensors in forward+backward.
    ms_p = ms_pfb = peak_p = None
    pscan_bytes = 8 * batch * length * dim * dstate * 4
    fits = not cuda or pscan_bytes < 0.6 * torch.cuda.get_device_properties(device).total_memory
    if pscan is not None and fits:
        def p_fwd():
            with torch.no_grad():
                return mambapy_scan(**t, pscan=pscan)

        def p_fwd_bwd():
            return torch.autograd.grad(mambapy_scan(**t, pscan=pscan), leaves, dy)

        ms_p = timeit(p_fwd, device, warmup=1, reps=3)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            p_fwd_bwd()
            torch.cuda.synchronize(device)
            peak_p = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        ms_pfb = timeit(p_fwd_bwd, device, warmup=1, reps=3)
    ratio = lambda a, b: None if a is None else a / b  # noqa: E731
    return [f"({batch}, {dim}, {dstate}, {length})", str(dtype).removeprefix("torch."),
            fmt(ms_fwd, ".3f"), f"{gbs:.0f} ({100 * gbs / copy_gbs:.0f}%)" if copy_gbs else f"{gbs:.1f}",
            fmt(ms_fb, ".3f"), fmt(peak, ".0f"), fmt(ratio(ms_ref, ms_fwd), ".3g", "x"),
            fmt(ratio(ms_p, ms_fwd), ".3g", "x"), fmt(ratio(ms_pfb, ms_fb), ".3g", "x"),
            fmt(None if peak_p is None or not peak else peak_p / peak, ".1f", "x")]


SCAN_HEADER = ["(batch, D, N, L)", "dtype", "fwd ms", "fwd GB/s (% of copy)", "fwd+bwd ms", "fwd+bwd peak MiB",
               "fwd vs loop", "fwd vs pscan", "fwd+bwd vs pscan", "pscan peak / ours"]


def scan_device_table(device: torch.device, shapes, dtypes, backend="triton", ref_max_ms=300.0, reps=5) -> str:
    """The Triton (or any backend's) table on a device; shapes: (batch, D, N, L)."""
    try:
        from mambapy.pscan import pscan
    except ImportError:
        pscan = None
    copy_gbs = copy_bandwidth(device) if device.type == "cuda" else None
    rows = [scan_row(*s, dtype, device, backend, copy_gbs, pscan, ref_max_ms, reps)
            for s in shapes for dtype in (dtypes if s[2] > 1 else dtypes[:1])]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    notes = [f"backend {backend!r} on {name}"]
    if copy_gbs:
        notes.append(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    notes.append("GB/s: the least bytes of a forward (read u, Δ, z, B, C; write y) over its time. vs loop / pscan: "
                 "their time over ours (n/a: mambapy missing, or skipped: too slow / too much memory).")
    return "\n".join(n + "  " for n in notes) + "\n\n" + table(SCAN_HEADER, rows)


def scan_cpu_table(shapes, lengths, reps=3) -> str:
    """The chunked PyTorch fallback against the sequential loop on CPU, forward (fp32)."""
    device = torch.device("cpu")
    rows = []
    for batch, dim, dstate in shapes:
        for length in lengths:
            t = scan_inputs(batch, dim, dstate, length, torch.float32, device)
            run = lambda backend: mamba.selective_scan(**t, delta_softplus=True, backend=backend)  # noqa: E731
            with torch.no_grad():
                ms_loop = timeit(lambda: run("ref"), device, warmup=1, reps=reps)
                ms_torch = timeit(lambda: run("torch"), device, warmup=1, reps=reps)
            leaves = [v.requires_grad_() for v in t.values()]
            ms_fb = timeit(lambda: torch.autograd.grad(run("torch").sum(), leaves), device, warmup=1, reps=reps)
            rows.append([f"({batch}, {dim}, {dstate}, {length})", f"{ms_loop:.1f}", f"{ms_torch:.1f}",
                         f"{ms_loop / ms_torch:.1f}x", f"{ms_fb:.1f}"])
    header = ["(batch, D, N, L)", "loop fwd ms", "fallback fwd ms", "speedup", "fallback fwd+bwd ms"]
    return (f"fp32 on CPU, {torch.get_num_threads()} threads; fallback = mamba._scan_chunked (backend 'torch'), "
            f"loop = mamba.selective_scan_ref.\n\n" + table(header, rows))


def bench_scan(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        lengths = [1024, 4096] if args.quick else [256, 1024, 2048, 4096, 8192]
        mamba_shapes = [(b, 5120, 16, length) for b in ((4,) if args.quick else (4, 16)) for length in lengths]
        dass_shapes = [(4, 96, 1, 8192), (4, 384, 1, 8192)]
        print(scan_device_table(device, mamba_shapes + dass_shapes, [torch.float32, torch.bfloat16]))
    else:
        shapes = [(1, 96, 1), (1, 64, 16)] + ([] if args.quick else [(2, 256, 16)])
        print(scan_cpu_table(shapes, [4096] if args.quick else [1024, 4096]))


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable, str]] = {
    "scan": (bench_scan, "selective scan: Triton / PyTorch fallback vs the sequential loop, mambapy and memcpy"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="fewer shapes")
    common.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    common.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, parents=[common], help=help_text)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    COMMANDS[args.command][0](args)


if __name__ == "__main__":
    main()
