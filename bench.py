"""Benchmarks. `python bench.py <command> [--smoke] [--quick] [--device DEVICE] [--threads N] [--budget S]`;
the commands are in COMMANDS.

    scan    the selective scan (eqs. (3)-(6)). On CUDA: the Triton kernels at Mamba-2.8B and DASS shapes, forward and
            forward+backward, against a device-to-device copy (the memory roofline), the sequential loop and mambapy's
            parallel scan. On CPU: the chunked PyTorch fallback against the sequential loop.
    mamba   the Mamba-2.8B language model in bf16: prefill and decode, beside transformers' MambaForCausalLM and the
            memory roofline of decoding (weight bytes over the measured copy bandwidth).
    llama   the same for LLaMA-7B (Vicuna-7B's shape) beside transformers' LlamaForCausalLM (SDPA).
    dass    DASS-small over 10 s to 60 min of audio beside an AST-style transformer encoder.
    sslalm  the full-size ssLALM and hybrid LALM: one training step per micro-batch, and answering about a 10 s clip.
    train   training throughput of the four variants at the largest micro-batch that fits.
    all     everything above in turn within a time budget (--budget seconds): what does not fit is skipped.

Every model is built with random weights directly on the device (bf16 for the frozen LLMs); no weight file is read.
--smoke runs the same code on tiny models and inputs (seconds on a CPU; what tests/test_bench.py runs).
Timing: CUDA events (on CPU perf_counter) around each call after warm-up; the median (CPU: minimum) of several
repetitions. Memory: torch.cuda.max_memory_allocated, reset before each case (n/a on CPU). A case that runs out of
memory prints OOM; after an OOM, or when the next input would exceed the per-case time cap (--cap), the bigger
inputs of that model are skipped.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import math
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dass
import scan
from dass import DASS, DASSConfig
from llama import LlamaConfig, LlamaLM
from mamba import MambaConfig, MambaLM
from sslalm import SSLALM, SSLALMConfig


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
            return scan.selective_scan(**t, **kwargs, backend=backend)

    dy = torch.randn(batch, dim, length, device=device, dtype=dtype)
    leaves = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]

    def fwd_bwd():
        y = scan.selective_scan(**t, **kwargs, backend=backend)
        return torch.autograd.grad(y, leaves, dy)

    ms_fwd = timeit(fwd, device, reps=reps)
    peak = extra_peak_mib(fwd_bwd, device)
    ms_fb = timeit(fwd_bwd, device, reps=reps)
    gbs = scan_bytes(batch, dim, dstate, length, dtype) / ms_fwd / 1e6

    # The sequential loop (forward only; its backward keeps every state): skipped where it would take too long.
    ms_ref = None
    est_ref_ms = 64.0 * (batch * dim * dstate * length) / (4 * 5120 * 16 * 1024)  # measured on an H200
    if not cuda or est_ref_ms <= ref_max_ms:
        ms_ref = timeit(lambda: scan.selective_scan(**{k: v.detach() for k, v in t.items()}, **kwargs,
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
        peak_p = extra_peak_mib(p_fwd_bwd, device)
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
            run = lambda backend: scan.selective_scan(**t, delta_softplus=True, backend=backend)  # noqa: E731
            with torch.no_grad():
                ms_loop = timeit(lambda: run("ref"), device, warmup=1, reps=reps)
                ms_torch = timeit(lambda: run("torch"), device, warmup=1, reps=reps)
            leaves = [v.requires_grad_() for v in t.values()]
            ms_fb = timeit(lambda: torch.autograd.grad(run("torch").sum(), leaves), device, warmup=1, reps=reps)
            rows.append([f"({batch}, {dim}, {dstate}, {length})", f"{ms_loop:.1f}", f"{ms_torch:.1f}",
                         f"{ms_loop / ms_torch:.1f}x", f"{ms_fb:.1f}"])
    header = ["(batch, D, N, L)", "loop fwd ms", "fallback fwd ms", "speedup", "fallback fwd+bwd ms"]
    return (f"fp32 on CPU, {torch.get_num_threads()} threads; fallback = scan._scan_chunked (backend 'torch'), "
            f"loop = scan.selective_scan_ref.\n\n" + table(header, rows))


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
# Shared by the model benchmarks (mamba, llama, dass, sslalm, train)
# ----------------------------------------------------------------------------------------------------------------

BF16 = torch.bfloat16
OOM = "OOM"


def bench_device(args) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run_note(device: torch.device, dtype: str, *lines: str) -> str:
    """The lines above a table: device, versions, dtype, then `lines`; markdown line breaks."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    try:
        import triton
        versions = f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}"
    return "\n".join(s + "  " for s in (f"device: {name}; {versions}; dtype: {dtype}", *lines))


@contextmanager
def on(device: torch.device, dtype: torch.dtype):
    """Tensors made inside are made on `device` in `dtype` unless told otherwise: a model built here never exists
    in fp32 or on the host first (MambaLM keeps A_log and D in fp32 by itself, as its checkpoints do)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """The most memory allocated since reset_peak, GiB (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def extra_peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """The most memory one call of fn allocates beyond what was allocated before it, MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    reset_peak(device)
    base = allocated_gib(device)
    fn()
    return (peak_gib(device) - base) * 1024


def measure(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1,
            max_s: float | None = None) -> tuple[float, float | None]:
    """(ms per call, peak GiB over all calls). When a warm-up call takes long, fewer reps (at least one) so that
    the timed calls take about max_s seconds."""
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    if warmup and max_s:
        reps = max(1, min(reps, int(max_s * warmup / max(time.perf_counter() - t0, 1e-6))))
    return timeit(fn, device, warmup=0, reps=reps), peak_gib(device)


def free_memory() -> None:
    """Give the memory of dropped models and failed cases back to the CUDA allocator (nothing to do on CPU)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def attempt(fn: Callable[[], object]) -> tuple[object, str | None]:
    """Run one benchmark case: (its result, None), or (None, why not): "OOM" when the device ran out of memory,
    "error: <type>" for any other failure (traceback on stderr), so that one failing case does not end the run."""
    try:
        return fn(), None
    except torch.OutOfMemoryError:
        why = OOM
    except Exception as e:  # noqa: BLE001  a benchmark run must go on to its other cases
        traceback.print_exc(file=sys.stderr)
        why = f"error: {type(e).__name__}"
    free_memory()
    return None, why


def budget_left(args) -> float | None:
    """Seconds left of the run's time budget (--budget), or None when there is none."""
    deadline = getattr(args, "deadline", None)
    return None if deadline is None else deadline - time.monotonic()


def guarded(args, fn: Callable[[], object], why: str | None = None) -> tuple[object, str | None]:
    """attempt(fn), unless there is already a reason not to (why: e.g. its model failed to build) or the time
    budget is spent."""
    if why is not None:
        return None, why
    left = budget_left(args)
    if left is not None and left <= 0:
        return None, "skipped (time budget)"
    return attempt(fn)


class Cases:
    """Runs the cases of one model in increasing input size. Skips a case when the run's time budget is spent,
    every case after an OOM, and (unless power is None) a case whose time, extrapolated from the last one as
    size**power, exceeds the per-case time cap (--cap seconds) - and every case after it. Warm the model up (compile
    its kernels) before the first case, or that time counts in the extrapolation."""

    def __init__(self, args, power: float | None = 1.0):
        self.args, self.power = args, power
        self.stopped: str | None = None
        self.last: tuple[float, float] | None = None  # (size, seconds) of the last case run

    def __call__(self, size: float, fn: Callable[[], object]) -> tuple[object, str | None]:
        left = budget_left(self.args)
        if left is not None and left <= 0:
            return None, "skipped (time budget)"
        if self.stopped:
            return None, self.stopped
        if self.last and self.power is not None:
            estimate = self.last[1] * (size / self.last[0]) ** self.power
            if estimate > self.args.cap:
                self.stopped = f"skipped (≈{estimate:.0f} s > {self.args.cap:g} s cap)"
                return None, self.stopped
        t0 = time.perf_counter()
        result, why = attempt(fn)
        self.last = (size, time.perf_counter() - t0)
        if why == OOM:
            self.stopped = "skipped (OOM before)"
        return result, why


def sig(x: float) -> str:
    """At least 3 significant digits, no exponent: 0.0123, 4.56, 78.9, 12,345."""
    decimals = max(0, 2 - math.floor(math.log10(abs(x)))) if x else 0
    return f"{x:,.{decimals}f}"


def cell(value: float | None, why: str | None, spec: str | None = None) -> str:
    """A table cell: the number (spec, default `sig`), or why there is none (OOM, skipped, error, n/a)."""
    return why if why is not None else "n/a" if value is None else sig(value) if spec is None else f"{value:{spec}}"


def count(n: int) -> str:
    """A parameter count: 2.77B, 29.9M, 12,345."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def mem_cell(gib: float | None, why: str | None, device: torch.device) -> str:
    """A memory cell: GiB on CUDA, n/a on CPU (no allocator statistics), or why there is no number."""
    return why if why is not None else fmt(gib, ".2f") if device.type == "cuda" else "n/a"


def copy_gbs(device: torch.device, smoke: bool) -> float:
    """copy_bandwidth, measured once per device in a run (small buffers with --smoke)."""
    key = (str(device), smoke)
    if key not in _COPY_GBS:
        _COPY_GBS[key] = copy_bandwidth(device, 1 << 24 if smoke else 1 << 30)
    return _COPY_GBS[key]


_COPY_GBS: dict[tuple[str, bool], float] = {}


# ----------------------------------------------------------------------------------------------------------------
# mamba, llama: the language models against transformers and the memory roofline
# ----------------------------------------------------------------------------------------------------------------

def mamba_config(smoke: bool) -> MambaConfig:
    return MambaConfig(d_model=64, n_layer=2, vocab_size=512) if smoke else MambaConfig()


def llama_config(smoke: bool) -> LlamaConfig:
    # max_position_embeddings only bounds the positions (RoPE has no table): room to decode after 4096 tokens
    if smoke:
        return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vocab_size=512, max_position_embeddings=8192)
    return LlamaConfig(max_position_embeddings=8192)


def build_lm(kind: str, cfg, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Our MambaLM / LlamaLM with random weights, made on the device in dtype."""
    with on(device, dtype):
        return (MambaLM if kind == "mamba" else LlamaLM)(cfg).eval()


def build_hf_lm(kind: str, cfg, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
    """transformers' MambaForCausalLM (its PyTorch path when mamba_ssm is absent) or LlamaForCausalLM (SDPA) of
    the same shape with random weights, made on the device in dtype; None when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    d = cfg.to_hf_dict() if kind == "mamba" else cfg.to_hf()
    for key in ("architectures", "model_type"):
        d.pop(key)
    if kind == "mamba":
        config, cls = transformers.MambaConfig(**d, use_mambapy=False), transformers.MambaForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**d), transformers.LlamaForCausalLM
        config._attn_implementation = "sdpa"
    with on(device, dtype):
        return cls(config).eval()


def decode_bytes(kind: str, model: nn.Module, batch: int, prefix: int) -> int:
    """The least bytes a decode step reads: every weight once (the untied input embedding only in B rows, so not
    counted) plus each sequence's cache: Mamba's conv and SSM states, LLaMA's keys and values of the prefix."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    if kind == "mamba":
        cache = c.n_layer * c.d_inner * (c.d_conv * 2 + c.d_state * 4)  # bf16 conv state, fp32 SSM state
    else:
        weights -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
        cache = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * prefix * 2  # bf16 k and v
    return weights + batch * cache


def our_prefill(model: nn.Module, ids: Tensor) -> Callable[[], object]:
    return lambda: model.prefill(model.embed(ids), None, ids.shape[1])


def hf_prefill(model: nn.Module, ids: Tensor) -> Callable[[], object]:
    """transformers' forward without a cache; only the last position's logits where it can (logits_to_keep)."""
    kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    return lambda: model(input_ids=ids, use_cache=False, **kw)


def our_decode(model: nn.Module, ids: Tensor, steps: int, reps: int, device: torch.device, graph: bool = True
               ) -> tuple[float, float | None]:
    """Greedy decoding after the prompt ids (B, P): (ms per step, peak GiB while decoding, after the prefill).
    graph: MambaLM's CUDA-graph decode steps (checked first: the same tokens as eager steps) or eager ones."""
    if hasattr(model, "cuda_graph"):
        model.cuda_graph = graph
        if graph and device.type == "cuda":
            check_graph_decode(model, ids, steps)
    logits, cache = model.prefill(model.embed(ids), None, ids.shape[1] + (reps + 1) * steps)
    token = logits.argmax(-1)

    def run():
        nonlocal token
        for _ in range(steps):
            token = model.decode_step(token, cache).argmax(-1)

    ms, peak = measure(run, device, reps=reps)
    return ms / steps, peak


def check_graph_decode(model: nn.Module, ids: Tensor, steps: int) -> None:
    """Greedy tokens and logits of CUDA-graph decode steps against eager ones from the same prompt."""
    runs = []
    for graph in (False, True):
        model.cuda_graph = graph
        logits, cache = model.prefill(model.embed(ids), None, ids.shape[1] + steps)
        tokens, all_logits = [], []
        for _ in range(steps):
            tokens.append(logits.argmax(-1))
            logits = model.decode_step(tokens[-1], cache)
            all_logits.append(logits.clone())
        runs.append((torch.stack(tokens), torch.stack(all_logits)))
    (t0, l0), (t1, l1) = runs
    if not torch.equal(t0, t1) or not torch.allclose(l0, l1, rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"CUDA-graph decoding differs from eager decoding: tokens equal {torch.equal(t0, t1)}, "
                           f"max logit difference {(l0 - l1).abs().max().item():.3g}")


def hf_decode(model: nn.Module, ids: Tensor, steps: int, reps: int, device: torch.device, max_s: float
              ) -> tuple[float, float | None]:
    """Greedy decoding with transformers' generate: (ms per step, peak GiB of the whole call). A step's time is
    (time of 1 + steps new tokens - time of 1 new token) / steps, so the prefill cancels out. One rep each when
    a call takes more than max_s / reps seconds."""
    mask = torch.ones_like(ids)

    def gen(n: int):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    t0 = time.perf_counter()
    gen(2)
    sync(device)
    if time.perf_counter() - t0 > max_s / reps:
        reps = 1
    one = timeit(lambda: gen(1), device, warmup=0, reps=reps)
    ms, peak = measure(lambda: gen(1 + steps), device, reps=reps, warmup=0)
    return ((ms - one) / steps if ms > one else None), peak  # None (n/a): lost in the timing noise


@torch.no_grad()
def lm_tables(kind: str, args) -> str:
    """Prefill and decode tables of one language model ('mamba' or 'llama'), ours beside transformers'."""
    device, smoke = bench_device(args), args.smoke
    cfg = mamba_config(smoke) if kind == "mamba" else llama_config(smoke)
    vocab = cfg.vocab_size
    if kind == "mamba":
        prefill_lengths = [16, 64] if smoke else [256, 1024, 4096, 8192]
        decode_cases = [(b, p) for b in ((1, 2) if smoke else (1, 16)) for p in ((16, 64) if smoke else (256, 4096))]
    else:
        prefill_lengths = [16, 64] if smoke else [256, 4096]
        decode_cases = [(1, p) for p in ((16, 64) if smoke else (256, 4096))]
    steps, reps = (4, 2) if smoke else (32, 3)
    gbs = copy_gbs(device, smoke)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = {(b, n): torch.randint(0, vocab, (b, n), generator=g).to(device)
           for b, n in [(1, n) for n in prefill_lengths] + decode_cases}
    ours = "mamba.MambaLM" if kind == "mamba" else "llama.LlamaLM"
    theirs = "transformers " + ("MambaForCausalLM" if kind == "mamba" else "LlamaForCausalLM (SDPA)")
    with on("meta", BF16):  # shapes only: the parameter count and the bytes a decode step reads
        meta = (MambaLM if kind == "mamba" else LlamaLM)(cfg)
    params = sum(p.numel() for p in meta.parameters())
    roof = {(b, p): b * gbs * 1e9 / decode_bytes(kind, meta, b, p) for b, p in decode_cases}
    prefill_rows, decode_rows, speed = [], [], {}
    for name, build, prefill, decode in ((ours, build_lm, our_prefill, our_decode),
                                         (theirs, build_hf_lm, hf_prefill,
                                          lambda *a: hf_decode(*a, max_s=args.cap / 4))):
        model, why = guarded(args, lambda: build(kind, cfg, device, BF16))
        if model is None and why is None:
            why = "n/a (transformers not installed)"
        if model is not None:  # warm-up: kernels compile here, not inside the first case (see Cases)
            _, why = guarded(args, prefill(model, ids[1, prefill_lengths[0]]))
        cases, prefill_why = Cases(args), {}
        for n in prefill_lengths:
            res, w = (None, why) if why else \
                cases(n, lambda: measure(prefill(model, ids[1, n]), device, reps, max_s=args.cap / 4))
            ms, peak = res or (None, None)
            prefill_why[n] = w
            speed[name, 0, n] = tok_s = ms and n / ms * 1e3
            prefill_rows.append([name, str(n), cell(ms, w), cell(tok_s, w), mem_cell(peak, w, device)])
        by_batch: dict[tuple[str, int], Cases] = {}  # decoding: after a prefix whose prefill ran; none after an OOM
        variants = [(name, decode)]
        if name == ours and kind == "mamba" and device.type == "cuda":  # the CUDA graph's worth, in the same run
            variants.append((f"{ours}, no CUDA graph", lambda *a: our_decode(*a, graph=False)))
        for row_name, decode_fn in variants:
            for b, p in decode_cases:
                cases = by_batch.setdefault((row_name, b), Cases(args, power=None))
                res, w = (None, why) if why else (None, "skipped (as its prefill)") if prefill_why[p] else \
                    cases(p, lambda: decode_fn(model, ids[b, p], steps, reps, device))
                ms, peak = res or (None, None)
                speed[row_name, b, p] = tok_s = ms and b / ms * 1e3
                decode_rows.append([row_name, str(b), str(p), cell(ms, w), cell(tok_s, w), sig(roof[b, p]),
                                    cell(tok_s and 100 * tok_s / roof[b, p], w), mem_cell(peak, w, device)])
        del model
        free_memory()
    for row, key in [(r, (0, int(r[1]))) for r in prefill_rows] + [(r, (int(r[1]), int(r[2]))) for r in decode_rows]:
        a, b = speed[(row[0], *key)], speed[(theirs, *key)]  # tokens/s
        row.append("" if row[0] == theirs else fmt(a / b, ".3g", "x") if a and b else "n/a")
    if kind == "mamba":
        import importlib.util
        fast = importlib.util.find_spec("mamba_ssm") is not None
        hf_note = ("transformers uses mamba_ssm's CUDA kernels (installed)" if fast else
                   "transformers runs its PyTorch path (mamba_ssm not installed): a sequential loop over the prompt")
        cache_note = ("Mamba's decode state has the same size whatever the prefix, so its decode peak stays flat; "
                      "on a GPU its decode steps replay a CUDA graph, checked first against eager steps (same "
                      "greedy tokens), and the 'no CUDA graph' rows launch every kernel each step")
    else:
        hf_note, cache_note = "transformers with attn_implementation='sdpa', its dynamic cache", \
            "the key/value cache grows with the prefix"
    notes = run_note(device, "bfloat16 weights",
                     f"{ours}: {count(params)} parameters, random weights; {hf_note}",
                     f"device-to-device copy: {gbs:.0f} GB/s (read + write); roofline = batch × copy GB/s / bytes "
                     f"read per step (weights + cache)",
                     f"decode: {steps} greedy steps, batch as given; peak GiB of {ours}: while decoding, after the "
                     f"prefill ({cache_note}); of transformers: the whole generate call",
                     "prefill: batch 1, the prompt's last logits; tokens/s = prompt tokens / time; "
                     "vs transformers: our tokens/s over theirs")
    return (notes + "\n\n" + table(["model", "prompt tokens", "prefill ms", "tokens/s", "peak GiB", "vs transformers"],
                                   prefill_rows)
            + "\n\n" + table(["model", "batch", "prefix", "ms/step", "tokens/s", "roofline tokens/s", "% of roofline",
                              "decode peak GiB", "vs transformers"], decode_rows))


def bench_mamba(args) -> None:
    print(lm_tables("mamba", args))


def bench_llama(args) -> None:
    print(lm_tables("llama", args))


# ----------------------------------------------------------------------------------------------------------------
# dass: DASS-small over long audio beside an AST-style transformer
# ----------------------------------------------------------------------------------------------------------------

class ASTBlock(nn.Module):
    """Pre-norm ViT block: x + attention(LN(x)), x + MLP(LN(x)) with GELU; attention by SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, width) -> (B, L, width)."""
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ASTEncoder(nn.Module):
    """An AST-style audio transformer, the comparison for DASS: 16×16 patches of the (128 mel × T) fbank taken with
    stride 10 in both axes as AST does (overlapping: 12 × ((T - 16) // 10 + 1) patches, 1212 for 1024 frames),
    `depth` pre-norm blocks of `width` with `heads` heads, a final LayerNorm. No class tokens and no positional
    embedding: AST's learned table covers 1212 patches only, and neither changes the cost measurably."""

    def __init__(self, width: int = 768, depth: int = 12, heads: int = 12, patch: int = 16, stride: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, width, patch, stride)
        self.blocks = nn.ModuleList(ASTBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, fbank: Tensor) -> Tensor:
        """fbank (B, T, 128) -> patch features (B, n_patches, width)."""
        x = self.patch_embed(fbank.transpose(1, 2).unsqueeze(1)).flatten(2).transpose(1, 2)  # (B, patches, width)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def dass_encoder(smoke: bool) -> DASS:
    """DASS-small (tiny with smoke) without its AudioSet head, as the LALM uses it."""
    model = DASS(DASSConfig(**SMOKE_DASS["small"]) if smoke else DASSConfig.small())
    del model.classifier["head"]
    return model


@torch.no_grad()
def bench_dass(args) -> None:
    device, smoke = bench_device(args), args.smoke
    frames = [256, 600, 2400] if smoke else [1024, 6000, 60000, 360000]
    window = 512 if smoke else dass.WINDOW
    reps = 2 if smoke else 3
    ast = dict(width=32, depth=2, heads=2) if smoke else dict(width=768, depth=12, heads=12)
    models = [  # (name, build, forward, how the time grows with the input)
        (f"DASS-small, {window}-frame windows", lambda: dass_encoder(smoke), lambda m, x: m.features(x, window), 1.0),
        ("DASS-small, one pass", lambda: dass_encoder(smoke), lambda m, x: m.features(x, None), 1.0),
        ("AST-style, {depth} × {width}".format(**ast), lambda: ASTEncoder(**ast), lambda m, x: m(x), 2.0),
    ]
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = {n: torch.randn(1, n, 128, generator=g).to(device) for n in frames}
    rows = []
    for name, build, forward, power in models:
        def run(n: int) -> Callable[[], object]:
            def call():
                with torch.autocast(device.type, dtype=BF16):
                    return forward(model, inputs[n])
            return call

        with torch.device(device):
            model, why = guarded(args, lambda: build().eval())
        params = sum(p.numel() for p in model.parameters()) if model is not None else None
        if model is not None:  # warm-up: kernels compile here, not inside the first case (see Cases)
            _, why = guarded(args, run(frames[0]))
        cases = Cases(args, power)
        for n in frames:
            res, w = (None, why) if why else cases(n, lambda: measure(run(n), device, reps, max_s=args.cap / 4))
            ms, peak = res or (None, None)
            rows.append([name, count(params) if params else "n/a", str(n), f"{n / 100:g} s", cell(ms, w),
                         cell(ms and n * 10 / ms, w), mem_cell(peak, w, device)])
        del model
        free_memory()
    print(run_note(device, "bfloat16 autocast, fp32 weights (as in training); batch 1; random weights and input",
                   f"DASS with windows: DASS.features' default for long audio (independent {window}-frame windows); "
                   "one pass: window=None; without the AudioSet head",
                   "AST-style: 16×16 patches with stride 10 (overlapping, as AST), SDPA attention; its time grows "
                   "with the square of the length", "x real time: seconds of audio per second of compute"))
    print()
    print(table(["model", "params", "frames", "audio", "forward ms", "x real time", "peak GiB"], rows))


# ----------------------------------------------------------------------------------------------------------------
# sslalm, train: the full model of Fig. 1 in training and answering
# ----------------------------------------------------------------------------------------------------------------

SMOKE_DASS = {"small": dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)),
              "medium": dict(dims=(8, 16, 32, 64), depths=(1, 1, 2, 1))}
CLIP_FRAMES, TEXT_TOKENS = 1024, 100  # a training clip (32 audio tokens) and about LTU's 108-token text cutoff


class PromptIds:
    """Stands in for the tokenizer when timing: every prompt is the same random ids; its EOS (-1) is never
    produced, so every answer runs to max_new_tokens."""
    eos_token_id = -1

    def __init__(self, vocab: int, n: int = 24, seed: int = 0):
        self.ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()

    def encode(self, text: str) -> list[int]:
        return list(self.ids)


def build_sslalm(size: str, llm: str, device: torch.device, smoke: bool) -> SSLALM:
    """A full-size (or, smoke, tiny) variant with random weights as training runs it: the frozen LLM in bf16,
    DASS, the projector and the LoRA adapters in fp32 and trainable. The LLM is made directly on the device."""
    lm_cfg = mamba_config(smoke) if llm == "mamba" else llama_config(smoke)
    config = SSLALMConfig.paper(size, llm, llm_config=asdict(lm_cfg), dass=SMOKE_DASS[size] if smoke else {})
    lm = build_lm(llm, lm_cfg, device, BF16)
    with torch.device(device):
        model = SSLALM(config, llm=lm, tokenizer=PromptIds(lm_cfg.vocab_size))
    model.set_trainable(SSLALM.PARTS)
    return model.train()


def train_step_case(model: SSLALM, micro: int, frames: int, text: int, device: torch.device, reps: int,
                    max_s: float) -> dict:
    """One training step as train.py runs it: forward and backward under bf16 autocast, gradient clipping, AdamW
    step. Returns ms per step, samples/s, peak GiB and GiB per sample above the weights and optimizer state."""
    model.zero_grad(set_to_none=True)
    g = torch.Generator(device="cpu").manual_seed(micro)
    ids = torch.randint(0, model.llm.config.vocab_size, (micro, text), generator=g).to(device)
    batch = dict(fbank=torch.randn(micro, frames, 128, generator=g).to(device), input_ids=ids, labels=ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step():
        with torch.autocast(device.type, dtype=BF16):
            loss = model(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocates the optimizer state
    static = allocated_gib(device)
    ms, peak = measure(step, device, reps, warmup=0 if device.type == "cpu" else 1, max_s=max_s)
    return dict(ms=ms, samples_s=micro / ms * 1e3, peak=peak,
                per_sample=None if peak is None else (peak - static) / micro)


@torch.no_grad()
def answer_case(model: SSLALM, frames: int, new_tokens: int, device: torch.device, reps: int) -> dict:
    """Answering about one clip (batch 1, greedy, SSLALM.generate: DASS and projector fp32, the LLM bf16):
    ms to the first token and to new_tokens tokens, and the peak GiB."""
    model.eval()
    clip = [torch.randn(frames, 128, generator=torch.Generator().manual_seed(0)).to(device)]
    first, _ = measure(lambda: model.generate(clip, ["?"], max_new_tokens=1, greedy=True), device, reps)
    full, peak = measure(lambda: model.generate(clip, ["?"], max_new_tokens=new_tokens, greedy=True), device, reps)
    model.train()
    per_token = (full - first) / (new_tokens - 1) if full > first and new_tokens > 1 else None  # None: noise
    return dict(first=first, full=full, per_token=per_token, peak=peak)


VARIANT_NAMES = {"mamba": "ssLALM", "llama": "hybrid"}


def sslalm_note(device: torch.device, smoke: bool, frames: int, text: int) -> str:
    llms = "tiny LLMs and DASS" if smoke else "Mamba-2.8B / LLaMA-7B shapes, DASS-small or -medium"
    return run_note(device, "the frozen LLM in bfloat16 weights; DASS, projector and LoRA fp32 under bf16 autocast",
                    f"{llms}, random weights; clips of {frames} fbank frames, {text} random text tokens; "
                    "no gradient checkpointing",
                    "step = forward + backward + gradient clipping + AdamW step (train.py's step); "
                    "per sample: (peak - weights and optimizer state) / micro-batch")


def bench_sslalm(args) -> None:
    device, smoke = bench_device(args), args.smoke
    frames, text = (128, 12) if smoke else (CLIP_FRAMES, TEXT_TOKENS)
    answer_frames, new_tokens = (100, 8) if smoke else (998, 32)  # a 10 s clip gives 998 frames
    micro = {"mamba": (4, 2), "llama": (2,)} if smoke else {"mamba": (16, 4), "llama": (4,)}  # the paper's first
    reps = 2 if smoke else 3
    step_rows, answer_rows = [], []
    for llm in ("mamba", "llama"):
        name = f"{VARIANT_NAMES[llm]} small"
        model, why = guarded(args, lambda: build_sslalm("small", llm, device, smoke))
        for mb in micro[llm]:
            res, w = guarded(args, lambda: train_step_case(model, mb, frames, text, device, reps, args.cap / 4), why)
            r = res or {}
            step_rows.append([name, str(mb), cell(r.get("ms"), w), cell(r.get("samples_s"), w),
                              mem_cell(r.get("peak"), w, device), mem_cell(r.get("per_sample"), w, device)])
        res, w = guarded(args, lambda: answer_case(model, answer_frames, new_tokens, device, reps), why)
        r = res or {}
        answer_rows.append([name, cell(r.get("first"), w), cell(r.get("full"), w),
                            cell(r.get("per_token"), w), mem_cell(r.get("peak"), w, device)])
        del model
        free_memory()
    print(sslalm_note(device, smoke, frames, text))
    print()
    print(table(["model", "micro-batch", "step ms", "samples/s", "peak GiB", "GiB per sample"], step_rows))
    print()
    print(f"Answering about a {answer_frames / 100:g} s clip ({answer_frames} frames): batch 1, greedy, "
          f"{new_tokens} new tokens, through SSLALM.generate (DASS fp32, LLM bf16, no autocast).")
    print()
    print(table(["model", "first token ms", f"{new_tokens} tokens ms", "ms per further token", "peak GiB"],
                answer_rows))


def largest_fitting(sizes, fn: Callable[[int], object]) -> tuple[int | None, object, str | None]:
    """Try fn(size) from the first (largest) size on: (size, result, None) for the first that does not run out of
    memory; (size, None, why) when one fails otherwise; (None, None, "OOM") when none fits."""
    for size in sizes:
        result, why = attempt(lambda: fn(size))
        if why != OOM:
            return size, result, why
    return None, None, OOM


def bench_train(args) -> None:
    device, smoke = bench_device(args), args.smoke
    frames, text = (128, 12) if smoke else (CLIP_FRAMES, TEXT_TOKENS)
    sizes = (4, 2, 1) if smoke else (16, 8, 4, 2, 1)
    reps = 2 if smoke else 3
    rows = []
    for llm in ("mamba", "llama"):
        for size in ("small", "medium"):
            name = f"{VARIANT_NAMES[llm]} {size}"
            model, why = guarded(args, lambda: build_sslalm(size, llm, device, smoke))
            mb, r = None, None
            if model is not None:
                mb, r, why = largest_fitting(sizes, lambda m: train_step_case(model, m, frames, text, device, reps,
                                                                              args.cap / 4))
            r = r or {}
            rows.append([name, cell(mb, why, "d"), cell(r.get("ms"), why),
                         cell(r.get("samples_s"), why), mem_cell(r.get("peak"), why, device),
                         mem_cell(r.get("per_sample"), why, device)])
            del model
            free_memory()
    print(sslalm_note(device, smoke, frames, text))
    print(f"micro-batch: the largest of {', '.join(map(str, sizes))} that fits (OOM: not even 1)  ")
    print()
    print(table(["model", "micro-batch", "step ms", "samples/s", "peak GiB", "GiB per sample"], rows))


# ----------------------------------------------------------------------------------------------------------------
# all: everything within a time budget
# ----------------------------------------------------------------------------------------------------------------

ALL_ORDER = ("mamba", "llama", "dass", "sslalm", "train", "scan")
ALL_START_S = {"mamba": 30, "llama": 30, "dass": 15, "sslalm": 30, "train": 30, "scan": 45}  # least budget to begin


def bench_all(args) -> None:
    """Each command in ALL_ORDER under a '## name' heading. A command starts only with ALL_START_S[name] seconds
    of the budget left (with --smoke: any time left); inside one, cases past the budget print 'skipped'. The
    scan runs with --quick, and only on CUDA (its CPU table has no small size)."""
    device = bench_device(args)
    for name in ALL_ORDER:
        print(f"## {name}\n", flush=True)
        left, need = budget_left(args), 0 if args.smoke else ALL_START_S[name]
        if name == "scan" and device.type != "cuda":
            print("skipped: on CPU the scan table takes minutes; run `python bench.py scan` by itself")
        elif left is not None and left <= need:
            print(f"skipped: {max(left, 0):.0f} s of the {args.budget:g} s budget left")
        else:
            t0 = time.perf_counter()
            COMMANDS[name][0](argparse.Namespace(**{**vars(args), "quick": args.quick or name == "scan"}))
            print(f"\n({name}: {time.perf_counter() - t0:.0f} s)")
        print(flush=True)
        free_memory()


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable, str]] = {
    "scan": (bench_scan, "selective scan: Triton / PyTorch fallback vs the sequential loop, mambapy and memcpy"),
    "mamba": (bench_mamba, "Mamba-2.8B prefill and decode vs transformers' MambaForCausalLM and the roofline"),
    "llama": (bench_llama, "LLaMA-7B prefill and decode vs transformers' LlamaForCausalLM (SDPA) and the roofline"),
    "dass": (bench_dass, "DASS-small on 10 s to 60 min of audio vs an AST-style transformer"),
    "sslalm": (bench_sslalm, "ssLALM vs hybrid: training step per micro-batch, answering about a 10 s clip"),
    "train": (bench_train, "training throughput of the four variants at the largest micro-batch that fits"),
    "all": (bench_all, "every command in turn within --budget seconds (default 420)"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="fewer shapes")
    common.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    common.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    common.add_argument("--smoke", action="store_true", help="tiny models and inputs, few reps (a CPU test run)")
    common.add_argument("--cap", type=float, default=30.0,
                        help="seconds per case: bigger inputs of a model are skipped once one would take longer")
    common.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; what is left is skipped (default: none; all: 420)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, parents=[common], help=help_text)
    args = parser.parse_args(argv)
    if args.command == "all" and args.budget is None:
        args.budget = 420.0
    args.deadline = None if args.budget is None else time.monotonic() + args.budget
    if args.threads:
        torch.set_num_threads(args.threads)
    COMMANDS[args.command][0](args)


if __name__ == "__main__":
    main()
