"""bench.py end to end at --smoke size on CPU: every command prints its tables with the expected rows and columns,
positive finite figures that agree with each other, and skips what the time budget, the time cap or an OOM rule
out. (The figures themselves are measured on a GPU, not asserted here.)"""
import contextlib
import io
import math
import re
import time
from types import SimpleNamespace

import pytest
import torch

import bench

CPU = ["--smoke", "--device", "cpu", "--threads", "1"]


def run(argv: list[str]) -> str:
    """bench.main(argv) in this process; its stdout. Restores torch's thread count (--threads changes it)."""
    threads, out, err = torch.get_num_threads(), io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert "error" not in out.getvalue(), err.getvalue()[-3000:]
    return out.getvalue()


def tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables in text, each as a list of rows {column: cell}."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip("|").split("|")]
                assert len(cells) == len(header), row
                rows.append(dict(zip(header, cells)))
            found.append(rows)
    return found


def num(cell: str) -> float:
    """A positive finite number from a cell such as '1,234', '0.85x' or '2.56 s'."""
    value = float(re.fullmatch(r"([0-9.,e+-]+)\s*(x|s)?", cell)[1].replace(",", ""))
    assert math.isfinite(value) and value > 0, cell
    return value


def close(a: float, b: float, rel: float = 0.02) -> bool:
    """Equal up to the rounding of the printed figures (at least 3 significant digits each)."""
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.fixture(scope="module")
def sections() -> dict[str, str]:
    """One `all --smoke` run on CPU, split at its '## command' headings."""
    out = run(["all", *CPU])
    parts = re.split(r"^## (\w+)\n", out, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def check_note(text: str, dtype: str):
    assert f"device: cpu, 1 threads; torch {torch.__version__}" in text
    assert f"dtype: {dtype}" in text


def test_all_runs_every_command_in_order(sections):
    assert list(sections) == list(bench.ALL_ORDER)
    assert "skipped: on CPU the scan table takes minutes" in sections["scan"]


@pytest.mark.parametrize("kind", ["mamba", "llama"])
def test_language_model_tables(sections, kind):
    text = sections[kind]
    check_note(text, "bfloat16 weights")
    prefill, decode = tables(text)
    ours, theirs = ("mamba.MambaLM", "transformers MambaForCausalLM") if kind == "mamba" else \
        ("llama.LlamaLM", "transformers LlamaForCausalLM (SDPA)")
    assert [(r["model"], r["prompt tokens"]) for r in prefill] == [(m, n) for m in (ours, theirs) for n in ("16", "64")]
    for r in prefill:
        assert close(num(r["tokens/s"]), int(r["prompt tokens"]) / num(r["prefill ms"]) * 1e3), r
        assert r["peak GiB"] == "n/a"  # no allocator statistics on CPU
        if r["model"] == ours:
            assert num(r["vs transformers"])
    batches = ("1", "2") if kind == "mamba" else ("1",)
    assert [(r["model"], r["batch"], r["prefix"]) for r in decode] == \
        [(m, b, p) for m in (ours, theirs) for b in batches for p in ("16", "64")]
    roof = {}
    for r in decode:
        b = int(r["batch"])
        assert close(num(r["tokens/s"]), b / num(r["ms/step"]) * 1e3), r
        assert close(num(r["% of roofline"]), 100 * num(r["tokens/s"]) / num(r["roofline tokens/s"])), r
        roof[b, int(r["prefix"])] = num(r["roofline tokens/s"])
        if r["model"] == ours:
            assert num(r["vs transformers"])
    if kind == "mamba":  # a constant-size state: the roofline does not depend on the prefix; batch 2 reads the
        assert roof[1, 16] == roof[1, 64] and roof[2, 16] == roof[2, 64]  # weights once for two tokens
        assert 1.5 < roof[2, 16] / roof[1, 16] < 2
    else:  # the key/value cache grows with the prefix
        assert roof[1, 64] < roof[1, 16]


def test_dass_table(sections):
    text = sections["dass"]
    check_note(text, "bfloat16 autocast, fp32 weights")
    (rows,) = tables(text)
    names = ["DASS-small, 512-frame windows", "DASS-small, one pass", "AST-style, 2 × 32"]
    assert [(r["model"], r["frames"]) for r in rows] == [(m, n) for m in names for n in ("256", "600", "2400")]
    for r in rows:
        frames = int(r["frames"])
        assert num(r["audio"]) == frames / 100
        assert close(num(r["x real time"]), frames * 10 / num(r["forward ms"])), r
        assert r["peak GiB"] == "n/a"
    dass_params = {r["params"] for r in rows if r["model"].startswith("DASS")}
    assert len(dass_params) == 1  # the same model with and without windows


def test_sslalm_tables(sections):
    text = sections["sslalm"]
    check_note(text, "the frozen LLM in bfloat16 weights")
    steps, answers = tables(text)
    assert [(r["model"], r["micro-batch"]) for r in steps] == \
        [("ssLALM small", "4"), ("ssLALM small", "2"), ("hybrid small", "2")]
    for r in steps:
        assert close(num(r["samples/s"]), int(r["micro-batch"]) / num(r["step ms"]) * 1e3), r
        assert r["peak GiB"] == r["GiB per sample"] == "n/a"
    assert [r["model"] for r in answers] == ["ssLALM small", "hybrid small"]
    for r in answers:
        assert num(r["first token ms"]) and num(r["8 tokens ms"]) and num(r["ms per further token"])


def test_train_table(sections):
    text = sections["train"]
    assert "the largest of 4, 2, 1 that fits" in text
    (rows,) = tables(text)
    assert [r["model"] for r in rows] == ["ssLALM small", "ssLALM medium", "hybrid small", "hybrid medium"]
    for r in rows:
        assert r["micro-batch"] == "4"  # nothing runs out of memory on the host at smoke size
        assert close(num(r["samples/s"]), 4 / num(r["step ms"]) * 1e3), r


def test_budget_spent_skips_everything():
    out = run(["all", *CPU, "--budget", "0"])
    assert re.findall(r"^## (\w+)$", out, flags=re.M) == list(bench.ALL_ORDER)
    assert out.count("skipped: 0 s of the 0 s budget left") == len(bench.ALL_ORDER) - 1  # and scan: CPU
    # inside a command (started alone), every case past the budget is skipped
    out = run(["llama", *CPU, "--budget", "0"])
    for rows in tables(out):
        assert all(r["ms/step" if "ms/step" in r else "prefill ms"] == "skipped (time budget)" for r in rows)


def test_cases_skip_after_oom_and_over_the_time_cap():
    cases = bench.Cases(SimpleNamespace(cap=1.0, deadline=None), power=2.0)
    assert cases(1, lambda: time.sleep(0.05) or "ran") == ("ran", None)
    result, why = cases(10, lambda: "ran")  # about 0.05 s x 10**2 = 5 s > 1 s
    assert result is None and re.fullmatch(r"skipped \(≈[56] s > 1 s cap\)", why)
    assert cases(2, lambda: "ran")[1] == why  # once skipped, the rest of the model's inputs too

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")
    cases = bench.Cases(SimpleNamespace(cap=100.0, deadline=None))
    assert cases(1, oom) == (None, "OOM")
    assert cases(2, lambda: "ran") == (None, "skipped (OOM before)")
    assert bench.Cases(SimpleNamespace(cap=100.0, deadline=time.monotonic() - 1))(1, lambda: "ran") == \
        (None, "skipped (time budget)")


def test_largest_fitting_micro_batch():
    def step(micro):
        if micro > 4:
            raise torch.OutOfMemoryError(f"micro-batch {micro}")
        return f"ran {micro}"
    assert bench.largest_fitting((16, 8, 4, 2, 1), step) == (4, "ran 4", None)
    assert bench.largest_fitting((16, 8), step) == (None, None, "OOM")

    def broken(micro):
        raise ValueError("not a memory problem")
    with contextlib.redirect_stderr(io.StringIO()):
        assert bench.largest_fitting((16, 8), broken) == (16, None, "error: ValueError")


def test_ast_patches_as_ast():
    """16×16 patches with stride 10 over 128 mel bins × 1024 frames: AST's 12 × 101 = 1212 patches."""
    ast = bench.ASTEncoder(width=16, depth=1, heads=2)
    assert ast(torch.randn(1, 1024, 128)).shape == (1, 1212, 16)
    assert ast(torch.randn(2, 6000, 128)).shape == (2, 12 * 599, 16)
