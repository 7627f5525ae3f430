"""bench.py at --smoke size on CPU: our language models agree with transformers' on the same weights in the same run,
every case yields a figure (or says why not: a failure reads as an error, a spent budget skips), and the CUDA-only
paths (the current device, timing events on its stream, decode timing after the CUDA-graph capture, prompt ids made
where their generator is) are checked with intercepted calls."""
import contextlib
import io
import re
import time

import pytest
import torch

import bench
from llama import LlamaLM
from mamba import MambaLM

CPU = ["--smoke", "--device", "cpu", "--threads", "1"]


def run(argv: list[str], errors_expected: bool = False) -> str:
    """bench.main(argv) in this process; its stdout. Restores torch's thread count (--threads changes it)."""
    threads, out, err = torch.get_num_threads(), io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert errors_expected or "error" not in out.getvalue(), err.getvalue()[-3000:]
    return out.getvalue()


def tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables in text, each as a list of rows {column: cell}."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            header, rows = [c.strip() for c in line.strip("|").split("|")], []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip("|").split("|")]
                assert len(cells) == len(header), row
                rows.append(dict(zip(header, cells)))
            found.append(rows)
    return found


def positive(cell: str) -> float:
    """A positive finite number from a cell such as '1,234', '0.659x' or '2.56 s'."""
    value = float(re.fullmatch(r"([0-9.,]+)\s*(x|s|M)?", cell)[1].replace(",", ""))
    assert 0 < value < float("inf"), cell
    return value


@pytest.fixture(scope="module")
def sections() -> dict[str, str]:
    """One `all --smoke` run on CPU, split at its '## command' headings."""
    parts = re.split(r"^## (\w+)\n", run(["all", *CPU]), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_all_runs_every_command_in_order(sections):
    assert list(sections) == list(bench.COMMANDS)


@pytest.mark.parametrize("kind", ["mamba", "llama"])
def test_language_models_agree_with_transformers_in_the_same_run(sections, kind):
    text = sections[kind]
    found = re.search(r"last logits differ by ([0-9.]+)% of their largest; (\d+) of (\d+) greedy tokens equal", text)
    assert found, text
    assert float(found[1]) < 2.0  # bf16 rounding; a wrong weight or a wrong step is far off
    assert found[2] == found[3] == "4"
    prefill, decode = tables(text)
    assert [r["prompt tokens"] for r in prefill] == ["16", "64"]
    assert [(r["batch"], r["prefix"]) for r in decode] == \
        [(b, p) for b in (("1", "2") if kind == "mamba" else ("1",)) for p in ("16", "64")]
    for r in prefill + decode:
        for column in ("ours ms", "transformers ms", "ours ms/step", "transformers ms/step", "our tokens/s"):
            if column in r:
                positive(r[column])
        assert r["our peak GiB" if "our peak GiB" in r else "our decode peak GiB"] == "n/a"  # no statistics on CPU


def test_dass_and_the_ast_style_encoder_run_every_length(sections):
    (rows,) = tables(sections["dass"])
    names = ["DASS-small, 512-frame windows", "DASS-small, one pass", "AST-style, 2 × 32"]
    assert [(r["model"], r["frames"]) for r in rows] == [(m, n) for m in names for n in ("256", "600", "1200")]
    for r in rows:
        for column in ("params", "forward ms", "x real time"):
            positive(r[column])
    assert len({r["params"] for r in rows if r["model"].startswith("DASS")}) == 1  # one model, with and without windows


def test_ast_patches_as_ast():
    """16×16 patches with stride 10 over 128 mel bins × 1024 frames: AST's 12 × 101 = 1212 patches."""
    ast = bench.ASTEncoder(width=16, depth=1, heads=2)
    assert ast(torch.randn(1, 1024, 128)).shape == (1, 1212, 16)
    assert ast(torch.randn(2, 6000, 128)).shape == (2, 12 * 599, 16)


def test_sslalm_trains_and_answers_in_all_four_variants(sections):
    train, answers = tables(sections["sslalm"])
    names = ["ssLALM small", "ssLALM medium", "hybrid small", "hybrid medium"]
    assert [r["model"] for r in train] == [r["model"] for r in answers] == names
    for r in train:
        assert r["micro-batch"] == "4"  # nothing runs out of memory on the host at smoke size
        assert positive(r["step ms"]) and positive(r["samples/s"])
    for r in answers:
        assert positive(r["8 tokens ms"]) > 0.5 * positive(r["first token ms"])


def test_a_spent_budget_skips_every_section_and_case():
    out = run(["all", *CPU, "--budget", "0"])
    assert re.findall(r"^## (\w+)$", out, flags=re.M) == list(bench.COMMANDS)
    assert out.count("skipped: 0 s of the budget left") == len(bench.COMMANDS)
    out = run(["llama", *CPU, "--budget", "0"])  # inside a command started alone: every case
    assert "agreement with transformers: skipped (time budget)" in out
    for rows in tables(out):
        assert all(v == "skipped (time budget)" for r in rows for k, v in r.items() if "ms" in k), rows


def test_a_failing_case_reads_as_an_error_and_the_run_goes_on(monkeypatch):
    def broken(self, token, cache):
        raise RuntimeError("a broken decode step")
    monkeypatch.setattr(LlamaLM, "decode_step", broken)
    out = run(["llama", *CPU], errors_expected=True)
    prefill, decode = tables(out)
    assert all(positive(r["ours ms"]) and positive(r["transformers ms"]) for r in prefill)
    for r in decode:
        assert r["ours ms/step"] == r["speed-up"] == "error: RuntimeError"
        positive(r["transformers ms/step"])
    assert "agreement with transformers: error: RuntimeError" in out


def test_cases_skip_after_oom_and_over_the_time_cap():
    cases = bench.Cases(bench.Run(torch.device("cpu"), cap=1.0), power=2.0)
    assert cases(1, lambda: time.sleep(0.05) or "ran") == ("ran", None)
    result, why = cases(10, lambda: "ran")  # about 0.05 s x 10**2 = 5 s > 1 s
    assert result is None and re.fullmatch(r"skipped \(≈[5-9] s > 1 s cap\)", why)
    assert cases(2, lambda: "ran") == (None, why)  # once skipped, the rest of the model's inputs too

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")
    cases = bench.Cases(bench.Run(torch.device("cpu")))
    assert cases(1, oom) == (None, "OOM")
    assert cases(2, lambda: "ran") == (None, "skipped (OOM before)")


def test_figures_keep_three_significant_digits():
    assert [bench.cell(x) for x in (0.012345, 4.5678, 78.91, 12345.6, 0)] == ["0.0123", "4.57", "78.9", "12,346", "0"]
    assert bench.cell(1.5, "OOM") == "OOM" and bench.cell(None) == "n/a"


def test_random_ids_are_made_where_their_generator_is(monkeypatch):
    """The prompt ids of the sslalm benchmark come from a CPU generator: made under the device context the model is
    built in (a GPU), torch.randint would get device=cuda and raise. Built here on 'meta' with randint checked."""
    def checked(real):
        def make(*args, generator=None, device=None, **kw):
            where = torch.device(device) if device is not None else torch.get_default_device()
            assert generator is None or where.type == generator.device.type, f"on {where}, generator on the host"
            return real(*args, generator=generator, device=device, **kw)
        return make
    monkeypatch.setattr(torch, "randint", checked(torch.randint))
    monkeypatch.setattr(torch, "randn", checked(torch.randn))
    model = bench.build_sslalm("mamba", "small", bench.Run(torch.device("meta"), smoke=True))
    assert next(model.llm.parameters()).is_meta
    ids = model.tokenizer.encode("anything")
    assert len(ids) == 24 and all(isinstance(i, int) for i in ids)


def test_the_chosen_cuda_device_is_made_current_first(monkeypatch):
    class Current(Exception):
        pass

    def set_device(device):
        raise Current(device)
    built = []
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(bench, "make", lambda *a: built.append(a))
    with pytest.raises(Current) as made:
        bench.main(["mamba", "--smoke", "--device", "cuda:1"])
    assert made.value.args[0] == torch.device("cuda:1") and not built


def test_timing_events_are_recorded_on_the_devices_stream(monkeypatch):
    """On cuda:1, every event, synchronisation and memory statistic of `timed` concerns cuda:1's current stream."""
    cuda1, seen = torch.device("cuda:1"), []

    class Event:
        def __init__(self, enable_timing: bool):
            assert enable_timing
            self.stream = None

        def record(self, stream):
            self.stream = stream

        def synchronize(self):
            assert self.stream == ("stream of", cuda1)

        def elapsed_time(self, end):
            assert self.stream == end.stream == ("stream of", cuda1)
            return 2.5 + len(seen)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: seen.append((name, device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30 if device == cuda1 else 0)
    calls = []
    ms, peak = bench.timed(lambda: calls.append(1), bench.Run(cuda1), reps=3, warmup=1)
    assert len(calls) == 4 and {device for _, device in seen} == {cuda1}
    assert ms == 2.5 + len(seen) and peak == 3.0


def test_mamba_decode_is_timed_after_the_step_that_records_its_cuda_graph(monkeypatch):
    monkeypatch.setattr(bench, "make", lambda cls, config, device: cls(config).eval())  # "on cuda", made here
    assert bench.build_lm("mamba", "cuda:1", smoke=True).cuda_graph == "require"  # a failed capture raises
    model = bench.build_lm("mamba", "cpu", smoke=True)
    events, step = [], MambaLM.decode_step
    monkeypatch.setattr(MambaLM, "decode_step", lambda self, *a: events.append("step") or step(self, *a))
    timed = bench.timed
    monkeypatch.setattr(bench, "timed", lambda fn, *a, **kw: events.append("timed") or timed(fn, *a, **kw))
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        ms, _ = bench.decode(model, ids, steps=3, reps=2, run=bench.Run(torch.device("cpu")))
    assert events[:2] == ["step", "timed"] and events.count("step") == 1 + 3 * (1 + 2) and ms > 0
