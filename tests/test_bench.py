"""bench.py at --smoke size on CPU: our language models agree with transformers' on the same weights in the same run,
every case yields a figure (or says why not: a failure reads as an error, a spent budget skips), the scan table runs
the Triton kernels (interpreted) beside pscan, and the CUDA-only paths (the current device, synchronisation and memory
statistics on it, the warm-up call kept out of the timing, prompt ids made where their generator is) are checked with
intercepted calls."""
import contextlib
import io
import re
import time

import pytest
import torch

import bench
from llama import LlamaLM

CPU = ["--smoke", "--device", "cpu"]


def run(argv: list[str], errors_expected: bool = False) -> str:
    """bench.main(argv) in this process; its stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        bench.main(argv)
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


def test_scan_table_runs_the_triton_kernels_beside_pscan_and_the_cpu_fallback(sections):
    device, cpu = tables(sections["scan"])
    assert [(r["(batch, D, N, L)"], r["dtype"]) for r in device] == \
        [("(1, 32, 4, 6)", "float32"), ("(1, 32, 1, 6)", "float32"), ("(1, 32, 4, 6), B, C contiguous", "float32")]
    for r in device:
        for column in ("Triton fwd ms", "Triton fwd+bwd ms", "pscan fwd+bwd ms"):
            positive(r[column])
        assert r["mamba_ssm fwd ms"] == r["fwd speed-up"] == "n/a"  # not built on a CPU
        assert float(r["kept / u fp32"]) == 0.0  # 6 steps: one segment, no state kept beyond the inputs
    assert [r["(batch, D, N, L)"] for r in cpu] == ["(1, 8, 1, 6)", "(1, 8, 4, 6)"]
    for r in cpu:
        for column in ("loop fwd ms", "fallback fwd ms", "fallback fwd+bwd ms"):
            positive(r[column])


@pytest.mark.parametrize("kind", ["mamba", "llama"])
def test_language_models_agree_with_transformers_in_the_same_run(sections, kind):
    text = sections[kind]
    found = re.search(r"last logits differ by ([0-9.]+)% of their largest; (\d+) of (\d+) greedy tokens equal", text)
    assert found, text
    assert float(found[1]) < 2.0  # bf16 rounding; a wrong weight or a wrong step is far off
    assert found[2] == found[3] == "4"
    (rows,) = tables(text)
    assert [(r["batch"], r["prompt tokens"]) for r in rows] == \
        [("1", "16"), ("1", "64")] + ([("2", "16")] if kind == "mamba" else [])
    for r in rows:
        assert positive(r["ours first token ms"]) and positive(r["transformers first token ms"])
        assert r["our peak GiB"] == r["their peak GiB"] == "n/a"  # no statistics on CPU


def test_dass_and_transformers_ast_run_every_length(sections):
    (rows,) = tables(sections["dass"])
    names = ["DASS-small, 512-frame windows", "DASS-small, one pass", "AST"]
    assert [(r["model"], r["frames"]) for r in rows] == [(m, n) for m in names for n in ("256", "600", "1200")]
    for r in rows:
        for column in ("params", "forward ms", "x real time"):
            positive(r[column])
    assert len({r["params"] for r in rows if r["model"].startswith("DASS")}) == 1  # one model, with and without windows


def test_sslalm_trains_and_answers_in_all_four_variants(sections):
    (rows,) = tables(sections["sslalm"])
    assert [r["model"] for r in rows] == ["ssLALM small", "ssLALM medium", "hybrid small", "hybrid medium"]
    for r in rows:  # per further token: n/a where the host's load drowns the difference
        assert positive(r["step ms"]) and positive(r["samples/s"]) and r["training peak GiB"] == "n/a"
        assert positive(r["first token ms"]) and positive(r["8 tokens ms"]) and r["answering peak GiB"] == "n/a"
        assert r["ms per further token"] == "n/a" or positive(r["ms per further token"])


def test_a_spent_budget_skips_every_section_and_case():
    out = run(["all", *CPU, "--budget", "0"])
    assert re.findall(r"^## (\w+)$", out, flags=re.M) == list(bench.COMMANDS)
    assert out.count("skipped: 0 s of the budget left") == len(bench.COMMANDS)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # spent inside a command: every case
        bench.bench_lm("llama", bench.Run(torch.device("cpu"), smoke=True, deadline=time.monotonic() - 1))
    out = out.getvalue()
    assert "agreement with transformers: skipped (time budget)" in out
    for rows in tables(out):
        assert all(v == "skipped (time budget)" for r in rows for k, v in r.items() if "ms" in k), rows


def test_a_failing_case_reads_as_an_error_and_the_run_goes_on(monkeypatch):
    def broken(self, token, cache):
        raise RuntimeError("a broken decode step")
    monkeypatch.setattr(LlamaLM, "decode_step", broken)
    out = run(["llama", *CPU], errors_expected=True)
    (rows,) = tables(out)
    for r in rows:  # the first token needs no decode step; theirs go on
        assert positive(r["ours first token ms"]) and positive(r["transformers first token ms"])
        assert r["ours ms/token"] == r["speed-up"] == "error: RuntimeError"
        assert not r["transformers ms/token"].startswith(("error", "skipped"))
    assert "agreement with transformers: error: RuntimeError" in out


def test_attempt_says_why_there_is_no_figure():
    cpu = bench.Run(torch.device("cpu"))

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert bench.attempt(lambda: 7, cpu) == (7, None)
    assert bench.attempt(oom, cpu) == (None, "OOM")
    assert bench.attempt(lambda: 7, cpu, why="OOM") == (None, "OOM")  # what it needs failed: not run
    spent = bench.Run(torch.device("cpu"), deadline=time.monotonic() - 1)
    assert bench.attempt(lambda: 7, spent) == (None, "skipped (time budget)")


def test_figures_keep_three_significant_digits():
    assert [bench.cell(x) for x in (0.012345, 4.5678, 78.91, 12345.6, 0)] == ["0.0123", "4.57", "78.9", "12,346", "0"]
    assert bench.cell(1.5, "OOM") == "OOM" and bench.cell(None) == "n/a"


def test_random_ids_are_made_where_their_generator_is(monkeypatch):
    """Random tensors drawn with a CPU generator under the device context an ssLALM is built in (a GPU) would get
    device=cuda and raise. Built here on 'meta' with randint and randn checked."""
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


def test_timing_syncs_the_devices_and_leaves_the_warm_up_call_out(monkeypatch):
    """On cuda:1, every synchronisation and memory statistic of `timed` concerns cuda:1; the warm-up call (where
    MambaLM records its CUDA graph, which bench.build_lm requires on a GPU) is not timed."""
    monkeypatch.setattr(bench, "make", lambda cls, config, device: cls(config).eval())  # "on cuda", made here
    assert bench.build_lm("mamba", "cuda:1", smoke=True).cuda_graph == "require"  # a failed capture raises
    cuda1, seen, calls = torch.device("cuda:1"), [], []
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: seen.append((name, device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30 if device == cuda1 else 0)
    ms, peak = bench.timed(lambda: calls.append(1) or time.sleep(0.3 if len(calls) == 1 else 0), bench.Run(cuda1))
    assert len(calls) == 4 and seen.count(("synchronize", cuda1)) == 4 and {d for _, d in seen} == {cuda1}
    assert ms < 150 and peak == 3.0
