"""Benchmarks: `python bench.py COMMAND [COMMAND ...] [--smoke] [--device D] [--budget S]`.

    scan     the selective scan: Triton beside mamba_ssm's CUDA kernels and mambapy's pscan on a GPU (Mamba-2.8B's and
             DASS's shapes, fp32 and bf16, training memory); the chunked PyTorch fallback beside the loop on a CPU
    mamba    Mamba-2.8B (bf16) prefill and greedy decoding beside transformers' MambaForCausalLM, same weights
    llama    the same for LLaMA-7B (Vicuna-7B's shape) beside transformers' LlamaForCausalLM (SDPA)
    dass     DASS-small over 10 s to 60 min of audio beside transformers' AST
    sslalm   ssLALM and the hybrid LALM (Fig. 1, four sizes): a training step, answering about a 10 s clip
    all      each of the above in turn (with --budget, each its share of the seconds left)

Random weights and inputs; --smoke: tiny models and shapes through the same code (Triton interpreted on a CPU).
"""
import argparse
import importlib.util
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
import transformers  # the baseline of the mamba and llama tables (requirements-test.txt)
from mambapy.pscan import pscan  # a baseline of the scan table (requirements-test.txt)
from torch import Tensor, nn
from torch.utils import cpp_extension

import dass
import scan
import weights
from llama import LlamaConfig, LlamaLM
from mamba import MambaConfig, MambaLM
from sslalm import SSLALM, SSLALMConfig

BF16 = torch.bfloat16
MAMBA_SSM_SRC, MAMBA_SSM_BUILD = (Path(__file__).resolve().parent / d for d in (".mamba_ssm_src", ".mamba_ssm_build"))


@dataclass
class Run:
    """One invocation: the device (made current by main), tiny or full size, and when the budget is spent."""
    device: torch.device
    smoke: bool = False
    deadline: float = math.inf  # time.monotonic()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def timed(fn: Callable[[], object], run: Run, reps: int = 3, graph: bool = False) -> tuple[float, float | None]:
    """(ms per call, peak GiB or None). graph, on a GPU: do_bench_cudagraph's median (CUDA-graph replays between
    CUDA events). Else the least of reps calls timed to the device's synchronisation, after a warm-up (one if > 5 s)."""
    if graph and run.cuda:
        import triton.testing  # the optional Triton backend, on a GPU only
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"), None
    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)

    def call() -> float:
        t0 = time.perf_counter()
        fn()
        if run.cuda:
            torch.cuda.synchronize(run.device)
        return (time.perf_counter() - t0) * 1e3
    warm_up = call()  # kernels compile, caches fill, MambaLM records its CUDA graph
    times = [call() for _ in range(reps if warm_up < 5e3 else 1)]
    peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.cuda else None
    return min(times), peak


def attempt(fn: Callable[[], object], run: Run, why: str | None = None) -> tuple:
    """(fn(), None), or (None, why not): `why` (what it needs failed), the budget spent, OOM, or an error."""
    if why is not None or time.monotonic() >= run.deadline:
        return None, why or "skipped (time budget)"
    try:
        return fn(), None
    except torch.OutOfMemoryError:  # the allocator frees its cache and retries before it raises this
        return None, "OOM"
    except Exception as e:  # noqa: BLE001  one failing case must not end the run
        traceback.print_exc(file=sys.stderr)
        return None, f"error: {type(e).__name__}"


def cell(value: float | None, why: str | None = None, suffix: str = "") -> str:
    """Why there is no number, n/a, or the number with at least 3 significant digits."""
    if why is not None or value is None:
        return why or "n/a"
    return f"{value:,.{max(0, 2 - math.floor(math.log10(abs(value)))) if value else 0}f}{suffix}"


def show(run: Run, dtype: str, lines: list[str], *tables: tuple[list[str], Iterable[list[str]]]) -> None:
    """The note (device, versions, dtype, `lines`), then markdown tables, each row printed as soon as it is made."""
    name = torch.cuda.get_device_name(run.device) if run.cuda else f"cpu, {torch.get_num_threads()} threads"
    print("\n".join(s + "  " for s in (f"device: {name}; torch {torch.__version__}; dtype: {dtype}", *lines)))
    for header, rows in tables:
        print("\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|", flush=True)
        for cells in rows:
            print("| " + " | ".join(cells) + " |", flush=True)
    print()


def make(cls: type, config, device: torch.device | str) -> nn.Module:
    """cls(config) made on `device` in bf16, never in fp32 or on the host (MambaLM keeps A_log and D fp32 itself)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(BF16)
    try:
        with torch.device(device):
            return cls(config).eval()
    finally:
        torch.set_default_dtype(old)


def scan_inputs(batch: int, dim: int, dstate: int, length: int, dtype: torch.dtype, device: torch.device | str,
                bc_views: bool = True) -> dict[str, Tensor]:
    """The scan's inputs as the models make them. N > 1, Mamba's mixer: Δ and z transposed (batch, L, D) projections,
    B and C views of x_proj's (batch, L, 160 + 2N) output. N = 1, DASS's SS2D: B, C slices of (batch, 4, 6 + 2N, L)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    t = dict(u=rnd(batch, dim, length), A=-torch.arange(1, dstate + 1, device=device).float().repeat(dim, 1),
             D=torch.randn(dim, generator=g).to(device), delta_bias=torch.randn(dim, generator=g).to(device))
    if dstate == 1:
        proj = rnd(batch, 4, 6 + 2 * dstate, length)
        return dict(t, delta=rnd(batch, dim, length) - 2.0, B=proj[:, :, 6:7], C=proj[:, :, 7:])
    proj = rnd(batch, length, 160 + 2 * dstate).transpose(1, 2)              # (batch, 160 + 2N, L)
    B, C = proj[:, 160:160 + dstate], proj[:, 160 + dstate:]
    return dict(t, delta=(rnd(batch, length, dim) - 2.0).transpose(1, 2),
                z=rnd(batch, length, 2 * dim)[..., dim:].transpose(1, 2),
                B=B if bc_views else B.contiguous(), C=C if bc_views else C.contiguous())


def scan_row(shape: tuple[int, int, int, int], dtype: torch.dtype, run: Run, mamba_ssm, bc_views: bool) -> list[str]:
    """Triton's times and mamba_ssm's (its .fwd / .bwd as SelectiveScanFn calls them, on contiguous copies), the
    speed-ups, the bytes the scan's autograd node keeps beyond its inputs over u's fp32 bytes, and pscan's time."""
    t = scan_inputs(*shape, dtype, run.device, bc_views)
    leaves, dy = {k: v.detach().requires_grad_() for k, v in t.items()}, torch.randn_like(t["u"])
    ours = lambda kw: scan.selective_scan(**kw, delta_softplus=True, backend="triton")  # noqa: E731
    ms = lambda fn: timed(fn, run, reps=1, graph=True)[0]  # noqa: E731
    fwd = ms(torch.no_grad()(lambda: ours(t)))
    fwd_bwd = ms(lambda: torch.autograd.grad(ours(leaves), list(leaves.values()), dy))
    m_fwd = m_fwd_bwd = None
    if mamba_ssm:
        c = {k: (v[:, None] if k in "BC" and v.dim() == 3 else v).contiguous() for k, v in t.items()}  # B, C 4-d
        args = [c["u"], c["delta"], c["A"], c["B"], c["C"], c["D"], c.get("z"), c["delta_bias"]]

        def m_both():
            out, x, *_ = mamba_ssm.fwd(*args, True)
            return mamba_ssm.bwd(*args, dy, x, out, None, True, False)
        m_fwd, m_fwd_bwd = ms(lambda: mamba_ssm.fwd(*args, True)), ms(m_both)
    given, saved = {v.data_ptr() for v in leaves.values()}, []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        ours(leaves)
    kept = sum(x.numel() * x.element_size() for x in saved if x.data_ptr() not in given) / (t["u"].numel() * 4)
    f32 = {k: v.detach().float().requires_grad_() for k, v in t.items()}

    def pscan_fwd_bwd():  # mambapy's parallel scan for eq. (5), (batch, L, D, N) decays materialised, fp32
        u, A, dim = f32["u"], f32["A"], f32["u"].shape[1]
        B, C = (M if M.dim() == 4 else M[:, None] for M in (f32["B"], f32["C"]))             # (batch, G, N, L)
        B, C = (M.repeat_interleave(dim // M.shape[1], 1).permute(0, 3, 1, 2) for M in (B, C))  # (batch, L, D, N)
        dt = F.softplus(f32["delta"] + f32["delta_bias"][:, None]).transpose(1, 2)[..., None]  # (batch, L, D, 1)
        hs = pscan(torch.exp(dt * A), dt * u.transpose(1, 2)[..., None] * B)                # eqs. (3)-(5)
        y = (hs * C).sum(-1).transpose(1, 2) + f32["D"][:, None] * u                         # eq. (6)
        y = y * F.silu(f32["z"]) if "z" in f32 else y
        return torch.autograd.grad(y.sum(), list(f32.values()))
    return [cell(fwd), cell(fwd_bwd), cell(m_fwd), cell(m_fwd_bwd), cell(m_fwd and m_fwd / fwd, suffix="x"),
            cell(m_fwd_bwd and m_fwd_bwd / fwd_bwd, suffix="x"), cell(kept),
            cell(*attempt(lambda: ms(pscan_fwd_bwd), run))]


def bench_scan(run: Run) -> None:
    """GPU (and --smoke): the Triton kernels beside mamba_ssm's and pscan. CPU: the fallback beside the loop."""
    if run.cuda or run.smoke:
        built = run.cuda and list(MAMBA_SSM_BUILD.glob("selective_scan_cuda*.so"))
        sys.path.insert(0, str(MAMBA_SSM_BUILD))
        mamba_ssm = importlib.import_module("selective_scan_cuda") if built else None
        shapes, dtypes = ([(1, 32, 4, 6), (1, 32, 1, 6)], [torch.float32]) if run.smoke else (  # (batch, D, N, L):
            [(4, 5120, 16, 1024), (1, 5120, 16, 2048), (4, 384, 1, 8192), (1, 384, 1, 65536)],  # Mamba-2.8B, DASS-small
            [torch.float32, BF16])
        cases = [(shape, dtype, True) for shape in shapes for dtype in dtypes] + [(shapes[0], dtypes[-1], False)]

        def rows():
            for shape, dtype, views in cases:
                cells, why = attempt(lambda: scan_row(shape, dtype, run, mamba_ssm, views), run)
                yield [str(shape) + ("" if views else ", B, C contiguous"), str(dtype)[6:], *(cells or [why] * 8)]
        show(run, "the inputs' (fp32 state)", [
            f"mamba_ssm: {f'selective_scan_cuda from {MAMBA_SSM_BUILD}' if mamba_ssm else 'n/a (not built)'}; times: "
            "medians of CUDA-graph replays; speed-up: mamba_ssm's time over Triton's"],
            (["(batch, D, N, L)", "dtype", "Triton fwd ms", "Triton fwd+bwd ms", "mamba_ssm fwd ms",
              "mamba_ssm fwd+bwd ms", "fwd speed-up", "fwd+bwd speed-up", "kept / u fp32", "pscan fwd+bwd ms"], rows()))
    if not run.cuda:
        def cpu_rows():
            for batch, dim, dstate in [(1, 8, 1), (1, 8, 4)] if run.smoke else [(1, 96, 1), (1, 64, 16), (2, 256, 16)]:
                for length in [6] if run.smoke else [1024, 4096]:
                    t = scan_inputs(batch, dim, dstate, length, torch.float32, "cpu")
                    t = {k: v.contiguous() for k, v in t.items()}
                    go = lambda backend: scan.selective_scan(**t, delta_softplus=True, backend=backend)  # noqa: E731
                    loop, fallback = timed(lambda: go("ref"), run)[0], timed(lambda: go("torch"), run)[0]  # no grad yet
                    leaves = [v.requires_grad_() for v in t.values()]
                    both = timed(lambda: torch.autograd.grad(go("torch").sum(), leaves), run)[0]
                    yield [str((batch, dim, dstate, length)), cell(loop), cell(fallback),
                           cell(loop / fallback, suffix="x"), cell(both)]
        show(run, "float32", ["fallback: scan._scan_chunked (backend 'torch'); loop: scan.selective_scan_ref"],
             (["(batch, D, N, L)", "loop fwd ms", "fallback fwd ms", "speed-up", "fallback fwd+bwd ms"], cpu_rows()))


def build_mamba_ssm() -> None:
    """mamba_ssm's selective_scan_cuda alone, from .mamba_ssm_src/csrc/selective_scan with its setup.py's flags."""
    start, src = time.perf_counter(), MAMBA_SSM_SRC / "csrc" / "selective_scan"
    MAMBA_SSM_BUILD.mkdir(exist_ok=True)
    flags = ["-O3", "-std=c++17"]
    nvcc = [f"-U__CUDA_NO_{t}_{op}__" for t in ("HALF", "BFLOAT16", "BFLOAT162") for op in ("OPERATORS", "CONVERSIONS")]
    cpp_extension.load("selective_scan_cuda", sorted(str(p) for p in src.glob("*.c*")), extra_cflags=flags,
                       extra_cuda_cflags=flags + nvcc + ["--expt-relaxed-constexpr", "--expt-extended-lambda",
                                                         "--use_fast_math", "--threads", "4"],
                       extra_include_paths=[str(src)], build_directory=str(MAMBA_SSM_BUILD), verbose=True)
    print(f"built selective_scan_cuda in {time.perf_counter() - start:.0f} s into {MAMBA_SSM_BUILD}")


def build_lm(kind: str, device: torch.device | str, smoke: bool) -> nn.Module:
    """Mamba-2.8B or LLaMA-7B (tiny with smoke) in bf16; on a GPU MambaLM must decode by CUDA-graph replays."""
    if kind == "llama":  # max_position_embeddings only bounds the positions: room to decode after 4096 tokens
        tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512)
        return make(LlamaLM, LlamaConfig(**(tiny if smoke else {}), max_position_embeddings=8192), device)
    model = make(MambaLM, MambaConfig(d_model=64, n_layer=2, vocab_size=512) if smoke else MambaConfig(), device)
    model.cuda_graph = "require" if torch.device(device).type == "cuda" else False
    return model


def build_hf(kind: str, ours: nn.Module, device: torch.device) -> nn.Module:
    """transformers' MambaForCausalLM or LlamaForCausalLM holding ours' very weight tensors (assigned, not copied)."""
    config = (weights.mamba_hf_config if kind == "mamba" else weights.llama_hf_config)(ours.config)
    config = transformers.AutoConfig.for_model(**config)  # defaults: SDPA for LLaMA; no mambapy
    model = make(transformers.AutoModelForCausalLM.from_config, config, device)
    state = ours.state_dict()
    if kind == "mamba":
        state["lm_head.weight"] = state["backbone.embeddings.weight"]  # tied
    model.load_state_dict(state, assign=True)  # strict: ours have exactly transformers' keys
    return model


def generate(model: nn.Module, ids: Tensor, n: int) -> Tensor:
    """n greedy new tokens (B, n) after the prompt ids (B, P), ours (no EOS: never early) or transformers'."""
    if isinstance(model, (MambaLM, LlamaLM)):
        return model.generate(ids, max_new_tokens=n)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)[:, ids.shape[1]:]


def agreement(ours: nn.Module, theirs: nn.Module, ids: Tensor, n: int) -> str:
    """How far transformers' outputs are from ours on the same weights and prompt ids (1, P)."""
    first = ours.prefill(ours.embed(ids), None, ids.shape[1])[0]
    want = theirs(input_ids=ids).logits[:, -1].float()
    diff = 100 * ((first - want).abs().max() / want.abs().max()).item()
    same = int((generate(ours, ids, n) == generate(theirs, ids, n)).sum())
    return (f"agreement with transformers (same weights, {ids.shape[1]}-token prompt): last logits differ by "
            f"{cell(diff)}% of their largest; {same} of {n} greedy tokens equal")


@torch.no_grad()
def bench_lm(kind: str, run: Run) -> None:
    """Greedy generation, ours beside transformers' on the same weights: ms to the first token (the prefill) and per
    further token ((to 1 + steps tokens - to 1) / steps: on a GPU MambaLM replays the CUDA graph it recorded)."""
    lengths = [16, 64] if run.smoke else [256, 1024, 4096, 8192] if kind == "mamba" else [256, 4096]
    cases = [(1, n) for n in lengths] + ([] if kind == "llama" else [(2 if run.smoke else 16, n) for n in lengths[::2]])
    steps, reps = (4, 2) if run.smoke else (32, 3)
    meta = build_lm(kind, "meta", run.smoke)  # shapes only
    ours, why = attempt(lambda: build_lm(kind, run.device, run.smoke), run)
    theirs, hf_why = attempt(lambda: build_hf(kind, ours, run.device), run, why)
    g = torch.Generator().manual_seed(0)
    ids = {(b, n): torch.randint(0, meta.config.vocab_size, (b, n), generator=g).to(run.device) for b, n in cases}
    agrees, agree_why = attempt(lambda: agreement(ours, theirs, ids[cases[0]], steps), run, why or hf_why)

    def figures(model: nn.Module, why: str | None, ids: Tensor) -> tuple:
        """(ms to the first token, why not; ms per further token (None: lost in the noise), peak GiB, why not)"""
        first, w1 = attempt(lambda: timed(lambda: generate(model, ids, 1), run, reps), run, why)
        more, w2 = attempt(lambda: timed(lambda: generate(model, ids, 1 + steps), run, reps), run, w1)
        step = more and (more[0] - first[0]) / steps
        return first and first[0], w1, step if step and step > 0 else None, more and more[1], w2

    def row(case: tuple[int, int]) -> list[str]:
        (first, w1, step, peak, w2), (hf_first, hf_w1, hf_step, hf_peak, hf_w2) = (
            figures(model, w, ids[case]) for model, w in ((ours, why), (theirs, hf_why)))
        return [*map(str, case), cell(first, w1), cell(hf_first, hf_w1), cell(step, w2), cell(hf_step, hf_w2),
                cell(step and hf_step and hf_step / step, w2 or hf_w2, "x"), cell(peak, w2), cell(hf_peak, hf_w2)]

    hf_path = "SDPA" if kind == "llama" else "mamba_ssm" if importlib.util.find_spec("mamba_ssm") else "PyTorch path"
    size = cell(sum(p.numel() for p in meta.parameters()) / 1e6, suffix="M")
    show(run, "bfloat16 weights", [
        f"ours: {type(meta).__name__}, {size} parameters; transformers: {hf_path}, the same weights",
        agrees or f"agreement with transformers: {agree_why}", f"greedy, {steps} further tokens; speed-up: their "
        "time per token / ours; peak: to 1 + steps tokens"],
        (["batch", "prompt tokens", "ours first token ms", "transformers first token ms", "ours ms/token",
          "transformers ms/token", "speed-up", "our peak GiB", "their peak GiB"], map(row, cases)))


SMOKE_DASS = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))  # a tiny DASS for small and medium


@torch.no_grad()
def bench_dass(run: Run) -> None:
    frames = [256, 600, 1200] if run.smoke else [1024, 6000, 60000, 360000]
    window, reps = (512, 2) if run.smoke else (dass.WINDOW, 3)
    ast = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if run.smoke else {}
    small = dass.DASSConfig(**SMOKE_DASS) if run.smoke else dass.DASSConfig.small()
    encoders = [  # (name, build for n frames, forward, lengths)
        (f"DASS-small, {window}-frame windows", lambda n: dass.DASS(small), lambda m, x: m.features(x, window), frames),
        ("DASS-small, one pass", lambda n: dass.DASS(small), lambda m, x: m.features(x, None), frames),
        ("AST", lambda n: transformers.ASTModel(transformers.ASTConfig(max_length=n, **ast)),
         lambda m, x: m(x).last_hidden_state, frames[:3])]
    inputs = {n: torch.randn(1, n, 128, generator=torch.Generator().manual_seed(n)).to(run.device) for n in frames}

    def rows():
        for name, build, forward, lengths in encoders:
            for n in lengths:
                with torch.device(run.device):
                    model, why = attempt(lambda: build(n).eval(), run)
                with torch.autocast(run.device.type, dtype=BF16):
                    result, w = attempt(lambda: timed(lambda: forward(model, inputs[n]), run, reps), run, why)
                ms, peak = result or (None, None)
                yield [name, cell(model and sum(p.numel() for p in model.parameters()) / 1e6, suffix="M"), str(n),
                       f"{n / 100:g} s", cell(ms, w), cell(ms and n * 10 / ms, w), cell(peak, w)]
                model = None  # frees it before the next is built
    show(run, "bfloat16 autocast, fp32 weights (as in training); batch 1", [
        f"windows: DASS.features' default for long audio ({window} frames); one pass: window=None; AST: transformers' "
        "ASTModel, time growing with the square of the length (to 10 min here); x real time: audio s per second"],
        (["model", "params", "frames", "audio", "forward ms", "x real time", "peak GiB"], rows()))


def build_sslalm(llm: str, size: str, run: Run) -> SSLALM:
    """A variant as training runs it; every prompt the same 24 tokens, no EOS (answers run to the end)."""
    lm = build_lm(llm, run.device, run.smoke)
    config = SSLALMConfig.paper(size, llm, llm_config=asdict(lm.config), dass=SMOKE_DASS if run.smoke else {})
    ids = list(range(100, 124))
    with torch.device(run.device):
        model = SSLALM(config, llm=lm, tokenizer=SimpleNamespace(encode=lambda text: list(ids), eos_token_id=-1))
    model.set_trainable(SSLALM.PARTS)
    return model.train()


def train_step(model: SSLALM, micro: int, run: Run) -> list[float | None]:
    """train.py's step (bf16 autocast, clipping, AdamW): ms, samples/s, peak GiB, GiB per sample beyond the state."""
    frames, text = (128, 12) if run.smoke else (1024, 100)  # 32 audio tokens; about LTU's 108-token text cutoff
    g = torch.Generator().manual_seed(micro)
    ids = torch.randint(0, model.llm.config.vocab_size, (micro, text), generator=g).to(run.device)
    fbank = torch.randn(micro, frames, 128, generator=g).to(run.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

    def step():
        with torch.autocast(run.device.type, dtype=BF16):
            loss = model(fbank, ids, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # allocates the optimizer state
    static = torch.cuda.memory_allocated(run.device) / 2**30 if run.cuda else None
    ms, peak = timed(step, run, reps=2 if run.smoke else 3)
    return [ms, micro / ms * 1e3, peak, peak and (peak - static) / micro]


@torch.no_grad()
def answer(model: SSLALM, frames: int, new_tokens: int, run: Run) -> list[float | None]:
    """Answering about one clip (batch 1, greedy): ms to the first token, to new_tokens, per further token; peak GiB."""
    model.eval()
    clip = [torch.randn(frames, 128, generator=torch.Generator().manual_seed(0)).to(run.device)]
    (first, _), (ms, peak) = (timed(lambda: model.generate(clip, ["?"], max_new_tokens=n, greedy=True), run,
                                    2 if run.smoke else 3) for n in (1, new_tokens))
    per_token = (ms - first) / (new_tokens - 1)
    return [first, ms, per_token if per_token > 0 else None, peak]  # None: lost in the noise


def bench_sslalm(run: Run) -> None:
    """The four variants: a training step, and answering about a clip."""
    micro = 4 if run.smoke else 16  # the paper's micro-batch
    frames, new_tokens = (100, 8) if run.smoke else (998, 32)  # 998 frames: a 10 s clip

    def rows():
        for llm, size in [(llm, size) for llm in ("mamba", "llama") for size in ("small", "medium")]:
            model, why = attempt(lambda: build_sslalm(llm, size, run), run)
            trained, w1 = attempt(lambda: train_step(model, micro, run), run, why)
            answered, w2 = attempt(lambda: answer(model, frames, new_tokens, run), run, why)
            model = None  # frees it before the next is built
            yield [f"{'ssLALM' if llm == 'mamba' else 'hybrid'} {size}", *(cell(x, w1) for x in trained or [None] * 4),
                   *(cell(x, w2) for x in answered or [None] * 4)]
    show(run, "the LLM bf16, frozen; DASS, projector, LoRA fp32 (under bf16 autocast in training)", [
        f"training: train.py's step, micro-batch {micro}; per sample: (peak - weights and optimizer state) / {micro}; "
        f"answering: a {frames / 100:g} s clip, batch 1, greedy, {new_tokens} tokens"],
        (["model", "step ms", "samples/s", "training peak GiB", "GiB per sample", "first token ms",
          f"{new_tokens} tokens ms", "ms per further token", "answering peak GiB"], rows()))


COMMANDS: dict[str, Callable[[Run], None]] = {
    "scan": bench_scan, "mamba": lambda run: bench_lm("mamba", run), "llama": lambda run: bench_lm("llama", run),
    "dass": bench_dass, "sslalm": bench_sslalm}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commands", nargs="+", choices=[*COMMANDS, "all"])
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models and inputs, few repetitions")
    parser.add_argument("--budget", type=float, default=math.inf, help="seconds for the whole run")
    args = parser.parse_args(argv)
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)  # Triton launches, CUDA-graph capture and timing events use the current one
    elif args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels on CPU tensors (before their import)
    deadline = time.monotonic() + args.budget
    names = list(COMMANDS) if "all" in args.commands else args.commands
    for i, name in enumerate(names):  # each with its share of the budget left
        print(f"## {name}\n", flush=True)
        t0 = time.monotonic()
        if t0 >= deadline:
            print("skipped: 0 s of the budget left\n", flush=True)
            continue
        COMMANDS[name](Run(args.device, args.smoke, t0 + (deadline - t0) / (len(names) - i)))
        print(f"({name}: {time.monotonic() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
