"""Model benchmarks: `python bench.py COMMAND [--smoke] [--device D] [--threads N] [--cap S] [--budget S]`.

    mamba   Mamba-2.8B (bf16) prefill and greedy decoding beside transformers' MambaForCausalLM, same weights
    llama   the same for LLaMA-7B (Vicuna-7B's shape) beside transformers' LlamaForCausalLM (SDPA)
    dass    DASS-small over 10 s to 60 min of audio beside an AST-style transformer encoder
    sslalm  ssLALM and the hybrid LALM (Fig. 1, four sizes): training step throughput, answering about a 10 s clip
    all     each of the above within a time budget (--budget, default 420 s)

Random weights, made on the device; --smoke: tiny models and inputs (seconds on a CPU). Times: after warm-up,
each call between two CUDA events on the current stream, the median (CPU: perf_counter, the minimum). Memory:
torch.cuda.max_memory_allocated (n/a on CPU). Cells read OOM, or "error: <type>" (traceback on stderr), or why skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import transformers  # the baseline of the mamba and llama tables (requirements-test.txt)
from torch import Tensor, nn

import dass
import weights
from llama import LlamaConfig, LlamaLM
from mamba import MambaConfig, MambaLM
from sslalm import SSLALM, SSLALMConfig

BF16 = torch.bfloat16
OOM = "OOM"


# ---- the harness: timing, memory, budgets, table cells ---------------------------------------------------------

@dataclass
class Run:
    """One invocation: the device (made current by main), tiny or full size, and the time allowed."""
    device: torch.device
    smoke: bool = False
    cap: float = 30.0           # seconds per case (see Cases)
    deadline: float = math.inf  # time.monotonic() when the --budget is spent

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def timed(fn: Callable[[], object], run: Run, reps: int, warmup: int = 1) -> tuple[float, float | None]:
    """(ms per call of fn, peak GiB allocated meanwhile; None on CPU). Fewer timed calls (at least one) when the
    warm-up shows that `reps` would take more than a quarter of the cap."""
    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    if run.cuda:
        torch.cuda.synchronize(run.device)
    if warmup:
        reps = max(1, min(reps, int(run.cap / 4 * warmup / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        if run.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(run.device))
            fn()
            end.record(torch.cuda.current_stream(run.device))
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    if not run.cuda:
        return min(times), None  # other processes only ever add time
    return statistics.median(times), torch.cuda.max_memory_allocated(run.device) / 2**30


def attempt(fn: Callable[[], object], run: Run, why: str | None = None) -> tuple[object, str | None]:
    """(fn(), None), or (None, why not): `why` if given, the budget spent, OOM, or "error: <type>"."""
    if why is not None or time.monotonic() >= run.deadline:
        return None, why or "skipped (time budget)"
    try:
        return fn(), None
    except torch.OutOfMemoryError:
        why = OOM
    except Exception as e:  # noqa: BLE001  one failing case must not end the run
        traceback.print_exc(file=sys.stderr)
        why = f"error: {type(e).__name__}"
    if run.cuda:
        torch.cuda.empty_cache()
    return None, why


class Cases:
    """attempt() for the cases of one model in increasing size: after an OOM the rest are skipped, and so is every
    case from the first whose time, extrapolated from the last as size**power, would exceed the cap."""

    def __init__(self, run: Run, power: float = 1.0):
        self.run, self.power = run, power
        self.stopped, self.last = None, None  # why the rest are skipped; (size, seconds) of the last case run

    def __call__(self, size: float, fn: Callable[[], object], why: str | None = None) -> tuple[object, str | None]:
        if self.last and not self.stopped:
            estimate = self.last[1] * (size / self.last[0]) ** self.power
            if estimate > self.run.cap:
                self.stopped = f"skipped (≈{estimate:.0f} s > {self.run.cap:g} s cap)"
        if why or self.stopped:
            return None, why or self.stopped
        t0 = time.perf_counter()
        result, why = attempt(fn, self.run)
        self.last, self.stopped = (size, time.perf_counter() - t0), "skipped (OOM before)" if why == OOM else None
        return result, why


def cell(value: float | None, why: str | None = None, suffix: str = "") -> str:
    """Why there is no number (OOM, skipped, error), n/a, or the number with at least 3 significant digits."""
    if why is not None or value is None:
        return why or "n/a"
    return f"{value:,.{max(0, 2 - math.floor(math.log10(abs(value)))) if value else 0}f}{suffix}"


def show(run: Run, dtype: str, lines: list[str], *tables: tuple[list[str], list[list[str]]]) -> None:
    """Print the note (device, torch version, dtype, then `lines`) and each (header, rows) as a markdown table."""
    name = torch.cuda.get_device_name(run.device) if run.cuda else f"cpu, {torch.get_num_threads()} threads"
    print("\n".join(s + "  " for s in (f"device: {name}; torch {torch.__version__}; dtype: {dtype}", *lines)))
    for header, rows in tables:
        print("\n| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|")
        print("\n".join("| " + " | ".join(row) + " |" for row in rows))


def params(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:,.2f}M"


def make(cls: type, config, device: torch.device | str) -> nn.Module:
    """cls(config) made on `device` in bf16, never in fp32 or on the host (MambaLM keeps A_log and D fp32 itself)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(BF16)
    try:
        with torch.device(device):
            return cls(config).eval()
    finally:
        torch.set_default_dtype(old)


# ---- mamba, llama: the language models beside transformers' on the same weights --------------------------------

def build_lm(kind: str, device: torch.device | str, smoke: bool) -> nn.Module:
    """Mamba-2.8B or LLaMA-7B (Vicuna-7B's shape; tiny with smoke) in bf16 on the device. On a GPU, MambaLM's
    decode steps must replay a CUDA graph: cuda_graph = "require" makes a failed capture raise, not step eagerly."""
    if kind == "llama":  # max_position_embeddings only bounds the positions: room to decode after 4096 tokens
        tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512)
        return make(LlamaLM, LlamaConfig(**(tiny if smoke else {}), max_position_embeddings=8192), device)
    model = make(MambaLM, MambaConfig(d_model=64, n_layer=2, vocab_size=512) if smoke else MambaConfig(), device)
    model.cuda_graph = "require" if torch.device(device).type == "cuda" else False
    return model


def build_hf(kind: str, ours: nn.Module, device: torch.device) -> nn.Module:
    """transformers' MambaForCausalLM (its PyTorch path unless mamba_ssm is installed) or LlamaForCausalLM (SDPA)
    holding ours' very weight tensors (assigned, not copied: the same weights in no more memory)."""
    d = weights.mamba_hf_config(ours.config) if kind == "mamba" else weights.llama_hf_config(ours.config)
    d = {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
    if kind == "mamba":
        config, cls = transformers.MambaConfig(**d, use_mambapy=False), transformers.MambaForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**d), transformers.LlamaForCausalLM
        config._attn_implementation = "sdpa"
    model, state = make(cls, config, device), ours.state_dict()
    if kind == "mamba":
        state["lm_head.weight"] = state["backbone.embeddings.weight"]  # tied
    model.load_state_dict(state, assign=True)  # strict: ours have exactly transformers' keys
    return model


def prefill(model: nn.Module, ids: Tensor) -> Callable[[], object]:
    """Ours: to the last logits and the cache; transformers': forward without a cache (last logits where it can)."""
    if isinstance(model, (MambaLM, LlamaLM)):
        return lambda: model.prefill(model.embed(ids), None, ids.shape[1])
    kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    return lambda: model(input_ids=ids, use_cache=False, **kw)


def hf_generate(model: nn.Module, ids: Tensor, n: int) -> Tensor:
    """transformers' greedy generate: exactly n new tokens (B, n)."""
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)[:, ids.shape[1]:]


def decode(model: nn.Module, ids: Tensor, steps: int, reps: int, run: Run) -> tuple[float | None, float | None]:
    """(ms per greedy decode step after the prompt ids (B, P), peak GiB). Ours: a first step (recording MambaLM's
    CUDA graph on a GPU) before the timing, so the timed steps are replays alone. transformers': (time of generate
    to 1 + steps new tokens - time to 1) / steps, None if lost in the noise, peak of the whole call."""
    if not isinstance(model, (MambaLM, LlamaLM)):
        one, _ = timed(lambda: hf_generate(model, ids, 1), run, reps)
        ms, peak = timed(lambda: hf_generate(model, ids, 1 + steps), run, reps)
        return ((ms - one) / steps if ms > one else None), peak
    logits, cache = model.prefill(model.embed(ids), None, ids.shape[1] + 1 + (reps + 1) * steps)
    tokens = [model.decode_step(logits.argmax(-1), cache).argmax(-1)]

    def decode_steps():
        for _ in range(steps):
            tokens.append(model.decode_step(tokens[-1], cache).argmax(-1))
    ms, peak = timed(decode_steps, run, reps)
    return ms / steps, peak


def agreement(ours: nn.Module, theirs: nn.Module, ids: Tensor, n: int) -> str:
    """How far transformers' outputs are from ours on the same weights and prompt ids (1, P)."""
    first = ours.prefill(ours.embed(ids), None, ids.shape[1])[0]
    want = theirs(input_ids=ids).logits[:, -1].float()
    diff = 100 * ((first - want).abs().max() / want.abs().max()).item()
    same = int((ours.generate(ids, max_new_tokens=n) == hf_generate(theirs, ids, n)).sum())
    return (f"agreement with transformers (same weights, {ids.shape[1]}-token prompt): last logits differ by "
            f"{cell(diff)}% of their largest; {same} of {n} greedy tokens equal")


def lm_cases(run: Run, model: nn.Module | None, why: str | None, ids: dict[tuple, Tensor], lengths: list[int],
             decode_cases: list[tuple[int, int]], steps: int, reps: int) -> dict:
    """One model's figures, (ms, peak GiB, why not) by case: (0, n) the prefill of ids[1, n], (b, p) a decode step
    after ids[b, p], skipped when the prefill of its prefix was."""
    _, why = attempt(lambda: prefill(model, ids[1, lengths[0]])(), run, why)  # warm-up: kernels compile here
    out, cases = {}, Cases(run)
    for n in lengths:
        res, w = cases(n, lambda: timed(prefill(model, ids[1, n]), run, reps), why)
        out[0, n] = (*(res or (None, None)), w)
    by_batch = {b: Cases(run) for b, _ in decode_cases}  # after an OOM, no longer prefix
    for b, p in decode_cases:
        w = why or ("skipped (as its prefill)" if out[0, p][2] else None)
        res, w = by_batch[b](p, lambda: decode(model, ids[b, p], steps, reps, run), w)
        out[b, p] = (*(res or (None, None)), w)
    return out


@torch.no_grad()
def bench_lm(kind: str, run: Run) -> None:
    """Prefill and decode of one language model ('mamba' or 'llama'), ours beside transformers' on its weights."""
    lengths = [16, 64] if run.smoke else [256, 1024, 4096, 8192] if kind == "mamba" else [256, 4096]
    batches = (1,) if kind == "llama" else (1, 2) if run.smoke else (1, 16)
    decode_cases = [(b, p) for b in batches for p in ((16, 64) if run.smoke else (256, 4096))]
    steps, reps = (4, 2) if run.smoke else (32, 3)
    meta = build_lm(kind, "meta", run.smoke)  # shapes only
    ours, why = attempt(lambda: build_lm(kind, run.device, run.smoke), run)
    g = torch.Generator().manual_seed(0)
    ids = {(b, n): torch.randint(0, meta.config.vocab_size, (b, n), generator=g).to(run.device)
           for b, n in [(1, n) for n in lengths] + decode_cases}
    mine = lm_cases(run, ours, why, ids, lengths, decode_cases, steps, reps)
    theirs, why = attempt(lambda: build_hf(kind, ours, run.device), run, why)
    hf = lm_cases(run, theirs, why, ids, lengths, decode_cases, steps, reps)
    agrees, why = attempt(lambda: agreement(ours, theirs, ids[1, lengths[0]], steps), run, why)

    def row(key: tuple[int, int], tokens: int) -> list[str]:
        (ms, peak, w), (hf_ms, hf_peak, hf_w) = mine[key], hf[key]
        return [cell(ms, w), cell(hf_ms, hf_w), cell(ms and hf_ms and hf_ms / ms, w or hf_w, "x"),
                cell(ms and tokens / ms * 1e3, w), cell(peak, w), cell(hf_peak, hf_w)]

    hf_path = ("with mamba_ssm's CUDA kernels" if importlib.util.find_spec("mamba_ssm") else
               "its PyTorch path (mamba_ssm not installed)") if kind == "mamba" else "SDPA, its dynamic cache"
    show(run, "bfloat16 weights", [
        f"ours: {type(meta).__name__}, {params(meta)} parameters, random; transformers: {hf_path}, the same weight "
        "tensors", agrees or f"agreement with transformers: {why}",
        "prefill: batch 1, to the prompt's last logits; decode: greedy steps after a first one (which records "
        "MambaLM's CUDA graph on a GPU); peak: ours while decoding, theirs of the whole generate call; speed-up: "
        "transformers' time over ours"],
        (["prompt tokens", "ours ms", "transformers ms", "speed-up", "our tokens/s", "our peak GiB",
          "their peak GiB"], [[str(n), *row((0, n), n)] for n in lengths]),
        (["batch", "prefix", "ours ms/step", "transformers ms/step", "speed-up", "our tokens/s",
          "our decode peak GiB", "their peak GiB"], [[str(b), str(p), *row((b, p), b)] for b, p in decode_cases]))


# ---- dass: DASS-small over long audio beside an AST-style transformer --------------------------------------------

class ASTEncoder(nn.Module):
    """AST-style, the comparison for DASS: 16×16 patches of the (128 mel × T) fbank with stride 10 in both axes, as
    AST's (12 × ((T - 16) // 10 + 1) patches, 1212 for 1024 frames), `depth` pre-norm ViT blocks (SDPA attention), a
    LayerNorm. No class tokens or positional embedding (AST's table covers 1212 patches; neither costs much)."""

    def __init__(self, width: int = 768, depth: int = 12, heads: int = 12):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, width, kernel_size=16, stride=10)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)

    def forward(self, fbank: Tensor) -> Tensor:
        """fbank (B, T, 128) -> patch features (B, n_patches, width)."""
        return self.blocks(self.patch_embed(fbank.transpose(1, 2)[:, None]).flatten(2).transpose(1, 2))


SMOKE_DASS = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))  # a tiny DASS for small and medium


@torch.no_grad()
def bench_dass(run: Run) -> None:
    frames = [256, 600, 1200] if run.smoke else [1024, 6000, 60000, 360000]
    window, reps = (512, 2) if run.smoke else (dass.WINDOW, 3)
    ast = dict(width=32, depth=2, heads=2) if run.smoke else dict(width=768, depth=12, heads=12)
    small = dass.DASSConfig(**SMOKE_DASS) if run.smoke else dass.DASSConfig.small()
    encoders = [  # (name, build, forward, how its time grows with the input)
        (f"DASS-small, {window}-frame windows", lambda: dass.DASS(small), lambda m, x: m.features(x, window), 1.0),
        ("DASS-small, one pass", lambda: dass.DASS(small), lambda m, x: m.features(x, None), 1.0),
        ("AST-style, {depth} × {width}".format(**ast), lambda: ASTEncoder(**ast), lambda m, x: m(x), 2.0)]
    g = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(1, n, 128, generator=g).to(run.device) for n in frames}
    rows = []
    for name, build, forward, power in encoders:
        with torch.device(run.device):
            model, why = attempt(lambda: build().eval(), run)
        with torch.autocast(run.device.type, dtype=BF16):
            _, why = attempt(lambda: forward(model, inputs[frames[0]]), run, why)  # warm-up: kernels compile
            cases = Cases(run, power)
            for n in frames:
                res, w = cases(n, lambda: timed(lambda: forward(model, inputs[n]), run, reps), why)
                ms, peak = res or (None, None)
                rows.append([name, params(model) if model else "n/a", str(n), f"{n / 100:g} s", cell(ms, w),
                             cell(ms and n * 10 / ms, w), cell(peak, w)])
        model = None  # frees it before the next is built
    show(run, "bfloat16 autocast, fp32 weights (as in training); batch 1; random weights and input", [
        f"DASS with windows: DASS.features' default for long audio ({window}-frame windows); one pass: window=None; "
        "the AST-style encoder's time grows with the square of the length; x real time: audio seconds per second"],
        (["model", "params", "frames", "audio", "forward ms", "x real time", "peak GiB"], rows))


# ---- sslalm: the full model of Fig. 1 in training and answering ------------------------------------------------

def build_sslalm(llm: str, size: str, run: Run) -> SSLALM:
    """A variant (tiny with smoke), random weights, as training runs it: the LLM bf16 and frozen; DASS, projector and
    LoRA fp32 and trainable. Every prompt is the same random ids; the EOS never comes: answers run to the end."""
    lm = build_lm(llm, run.device, run.smoke)
    config = SSLALMConfig.paper(size, llm, llm_config=asdict(lm.config), dass=SMOKE_DASS if run.smoke else {})
    g = torch.Generator().manual_seed(0)  # on the host, as are the ids, whatever the default device
    ids = torch.randint(0, lm.config.vocab_size, (24,), generator=g, device="cpu").tolist()
    with torch.device(run.device):
        model = SSLALM(config, llm=lm, tokenizer=SimpleNamespace(encode=lambda text: list(ids), eos_token_id=-1))
    model.set_trainable(SSLALM.PARTS)
    return model.train()


def train_step(model: SSLALM, micro: int, run: Run) -> list[float | None]:
    """A training step as train.py's (forward and backward under bf16 autocast, gradient clipping, AdamW) on clips
    of 1024 frames and 100 text tokens: ms, samples/s, peak GiB, GiB per sample beyond weights and AdamW state."""
    frames, text = (128, 12) if run.smoke else (1024, 100)  # 32 audio tokens; about LTU's 108-token text cutoff
    model.zero_grad(set_to_none=True)  # what a step that ran out of memory left
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
    """ms to the first token, to new_tokens, per further token, and peak GiB, answering about one clip (batch 1,
    greedy). Per further token: (time to new_tokens - time to 2) / (new_tokens - 2): replays of the CUDA graph."""
    model.eval()
    clip = [torch.randn(frames, 128, generator=torch.Generator().manual_seed(0)).to(run.device)]
    ms = {n: timed(lambda: model.generate(clip, ["?"], max_new_tokens=n, greedy=True), run, 2 if run.smoke else 3)
          for n in (1, 2, new_tokens)}
    model.train()
    per_token = (ms[new_tokens][0] - ms[2][0]) / (new_tokens - 2)
    return [ms[1][0], ms[new_tokens][0], per_token if per_token > 0 else None, ms[new_tokens][1]]  # None: noise


def bench_sslalm(run: Run) -> None:
    """The four variants: a training step at the largest micro-batch that fits, and answering about a clip."""
    sizes = (4, 2, 1) if run.smoke else (16, 8, 4, 2, 1)  # 16: the paper's micro-batch
    frames, new_tokens = (100, 8) if run.smoke else (998, 32)  # 998 frames: a 10 s clip
    train_rows, answer_rows = [], []
    for llm, size in [(llm, size) for llm in ("mamba", "llama") for size in ("small", "medium")]:
        name = f"{'ssLALM' if llm == 'mamba' else 'hybrid'} {size}"
        model, why = attempt(lambda: build_sslalm(llm, size, run), run)
        for micro in sizes:
            figures, w = attempt(lambda: train_step(model, micro, run), run, why)
            if w != OOM:
                break
        train_rows.append([name, w or str(micro), *(cell(x, w) for x in figures or [None] * 4)])
        figures, w = attempt(lambda: answer(model, frames, new_tokens, run), run, why)
        answer_rows.append([name, *(cell(x, w) for x in figures or [None] * 4)])
        model = None  # frees it before the next is built
    show(run, "the LLM bf16, frozen; DASS, projector, LoRA fp32 (under bf16 autocast in training)", [
        f"training: train.py's step (forward, backward, clipping, AdamW) at the largest micro-batch of {sizes} that "
        "fits; per sample: (peak - weights and optimizer state) / micro-batch",
        f"answering: a {frames / 100:g} s clip through SSLALM.generate, batch 1, greedy, {new_tokens} new tokens; "
        "per further token: decode steps alone (CUDA-graph replays on a GPU)"],
        (["model", "micro-batch", "step ms", "samples/s", "peak GiB", "GiB per sample"], train_rows),
        (["model", "first token ms", f"{new_tokens} tokens ms", "ms per further token", "peak GiB"], answer_rows))


# ---- all, and the command line ---------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[Run], None], float]] = {  # name: (the benchmark, least budget to start it)
    "mamba": (lambda run: bench_lm("mamba", run), 30),
    "llama": (lambda run: bench_lm("llama", run), 30),
    "dass": (bench_dass, 15),
    "sslalm": (bench_sslalm, 60),
}


def bench_all(run: Run) -> None:
    """Each command under a '## name' heading; one starts only with its least budget left (--smoke: any)."""
    for name, (bench, least) in COMMANDS.items():
        print(f"## {name}\n", flush=True)
        left, t0 = run.deadline - time.monotonic(), time.perf_counter()
        if left <= (0 if run.smoke else least):
            print(f"skipped: {max(left, 0):.0f} s of the budget left\n", flush=True)
            continue
        bench(run)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*COMMANDS, "all"])
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--smoke", action="store_true", help="tiny models and inputs, few repetitions")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--cap", type=float, default=30.0, help="seconds per case (bigger ones are skipped)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: none; all: 420)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # Triton launches, CUDA-graph capture and timing events use the current one
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = 420.0 if args.budget is None and args.command == "all" else args.budget
    run = Run(device, args.smoke, args.cap, math.inf if budget is None else time.monotonic() + budget)
    (bench_all if args.command == "all" else COMMANDS[args.command][0])(run)


if __name__ == "__main__":
    main()
