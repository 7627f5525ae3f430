"""train.py, the command line: clean errors for bad input, `--demo` handled by demo.py with its errors reported by
train.py's main, and the application modules' imports flowing one way."""
import ast
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import demo
import train
import trainer

ROOT = Path(train.__file__).parent
APP = ("data.py", "trainer.py", "train.py", "metrics.py", "textenc.py", "evaluate.py", "demo.py")


def entry(audio_id="a.wav", **kw):
    e = dict(instruction="What can you hear?", input="", audio_id=audio_id, dataset="d", task="open-ended question",
             output="A tone.")
    e.update(kw)
    return e


def run_train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_missing_weights_or_bad_data_is_a_clean_error(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([entry("a.wav")]))
    r = run_train("--size", "small", "--llm", "mamba", "--stage", "1", "--data", data, "--dass-weights",
                  tmp_path / "DASS_small.pth", "--llm-weights", tmp_path / "mamba-2.8b-hf", "--output-dir",
                  tmp_path / "run")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "error:" in r.stderr
    assert "state-spaces/mamba-2.8b" in r.stderr and "download" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([entry("a.wav"), {"instruction": "x"}]))
    r = run_train("--data", bad, "--output-dir", tmp_path / "run")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "entry 1" in r.stderr


def test_errors_raised_in_the_demo_reach_train_main(tmp_path, monkeypatch, capsys):
    """`python train.py --demo` runs train.py as __main__ and the demo in demo.py: an error the demo raises (here
    trainer.NonFiniteLoss, not a ValueError) is the very class main catches, so it ends in one clean line."""
    def diverge(*args, **kwargs):
        raise trainer.NonFiniteLoss("step 3: loss nan")

    monkeypatch.setattr(demo, "run_demo", diverge)
    monkeypatch.setattr(sys, "argv", ["train.py", "--demo", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    assert exit.value.code == 1 and "error: step 3: loss nan" in capsys.readouterr().err


def test_one_stage_flags_or_the_curriculum():
    args = train.parse_args(["--output-dir", "x", "--data", "d.json", "--stage", "3"])
    assert (args.stage, args.resume, args.overwrite, args.audio_prefix) == (3, None, False, [])
    assert train.parse_args(["--output-dir", "x", "--data", "d.json", "--resume"]).resume == "latest"
    assert train.parse_args(["--data", "d.json"]).stage == 1  # a stage's flag: stage 1
    assert train.parse_args(["--output-dir", "x"]).stage is None  # no stage's flag: the four stages in turn


def imports_of(path: Path) -> tuple[set[str], list[int]]:
    """(project modules imported at the top level, lines of imports inside functions or classes)."""
    tree = ast.parse(path.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    inner = [n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.ClassDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return top & {p.stem for p in ROOT.glob("*.py")}, inner


def test_application_imports_flow_one_way_and_sit_at_the_top():
    imported = {}
    for name in APP:
        top, inner = imports_of(ROOT / name)
        assert not inner, f"{name}: imports inside functions on lines {inner}"
        imported[Path(name).stem] = top
    assert "train" not in imported["demo"] and "demo" in imported["train"]
    assert imported["metrics"] == set() and "evaluate" not in imported["demo"]
    for module, uses in imported.items():  # no circle among the application modules
        for other in uses & set(imported):
            assert module not in imported[other], f"{module} and {other} import each other"
