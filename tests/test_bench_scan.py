"""tools/gpu_check.sh, the one command of a GPU slot, run whole on CPU (--smoke): every step runs and writes its file,
and `bench.py scan` prints the scan table for every tiny shape, mamba_ssm's column n/a."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"env.txt", "mamba_build.log", "test_scan.log", "scan.md",
                                                    "bench.md", "bench.err"}
    assert "exit status 0" in (tmp_path / "test_scan.log").read_text()
    table = (tmp_path / "scan.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| (") and "batch" not in line]
    expected = ["| (1, 32, 4, 6)", "| (1, 32, 1, 6)", "| (1, 32, 4, 6), B, C contiguous",  # the kernels,
                "| (1, 8, 1, 6)", "| (1, 8, 4, 6)"]                                                # the CPU table
    assert [r.split(" | ")[0] for r in rows] == expected
    assert all(r.split(" | ")[4] == "n/a" for r in rows[:3])             # no mamba_ssm on CPU
    bench = (tmp_path / "bench.md").read_text()
    assert bench.count("skipped: 0 s of the budget left") == 4 and "== done in" in run.stdout
