"""The main job, end to end, exactly as the README gives it: its demo commands run in a fresh folder (train.py
--demo, evaluate.py --task demo, sslalm.py ask), the demo trains on the CPU in minutes, and its checkpoint answers
the held-out clips it never saw with more than 90% accuracy under the paper's sampling (scored as Table I)."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_demo_commands() -> list[list[str]]:
    """The `python ...` lines of the README's set-up section that involve the demo, as argument lists."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up, run the demo, test", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("python ") and "demo" in line]


def test_the_readme_demo_trains_and_answers(tmp_path):
    commands = readme_demo_commands()
    assert [c[1] for c in commands] == ["train.py", "evaluate.py", "sslalm.py"]
    outputs = []
    for cmd in commands:
        argv = [sys.executable, str(ROOT / cmd[1]), *cmd[2:]]
        if cmd[1] == "evaluate.py":
            argv.append("--json")  # the metrics as one JSON object on the last line
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
        assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}"
        outputs.append(run)
    train_log, evaluation, ask = outputs
    assert "[6/6]" in train_log.stderr and (tmp_path / "demo" / "model.safetensors").is_file()
    metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert metrics["accuracy"] > 0.90, metrics
    answers = [json.loads(x) for x in (tmp_path / "demo" / "eval_demo.jsonl").read_text().splitlines()]
    assert len(answers) == 120
    assert "tone" in ask.stdout.lower(), ask.stdout  # the README asks about an amplitude-modulated tone
