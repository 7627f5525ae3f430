"""The embedded demo (demo.py): its synthetic data, a reduced run, determinism, and the main job end to end exactly
as the README gives it: its demo commands run in a fresh folder (train.py --demo, evaluate.py --task demo,
cli.py ask), the demo trains on the CPU in minutes, and its checkpoint answers the held-out clips it never saw
with more than 90% accuracy under the paper's sampling (scored as Table I)."""
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import audio
import checkpoint
import data
import demo
import train

ROOT = Path(__file__).resolve().parents[1]


def readme_demo_commands() -> list[list[str]]:
    """The `python ...` lines of the README's set-up section that involve the demo, as argument lists."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up, run the demo, test", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("python ") and "demo" in line]


def test_the_readme_demo_trains_and_answers(tmp_path):
    commands = readme_demo_commands()
    assert [c[1] for c in commands] == ["train.py", "evaluate.py", "cli.py"]
    outputs = []
    for cmd in commands:
        argv = [sys.executable, str(ROOT / cmd[1]), *cmd[2:]]
        if cmd[1] == "evaluate.py":
            argv.append("--json")  # the metrics as one JSON object on the last line
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=2400)
        assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}"
        outputs.append(run)
    train_log, evaluation, ask = outputs
    assert "[6/6]" in train_log.stderr and (tmp_path / "demo" / "model.safetensors").is_file()
    metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert metrics["accuracy"] > 0.90, metrics
    answers = [json.loads(x) for x in (tmp_path / "demo" / "eval_demo.jsonl").read_text().splitlines()]
    assert len(answers) == 120
    assert "tone" in ask.stdout.lower(), ask.stdout  # the README asks about an amplitude-modulated tone


# ----------------------------------------------------------------------------------------------------------------
# The demo's synthetic data
# ----------------------------------------------------------------------------------------------------------------

def _spectrum(path):
    x = audio.load_audio(path).double().numpy()
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / 16000), mag, x


def test_demo_data_is_valid_openaqa_with_distinguishable_classes(tmp_path):
    paths = demo.make_demo_data(tmp_path, clips_per_class=2, eval_per_class=1, seed=1, verbose=False)
    entries = data.load_openaqa(paths["train"])
    assert len(entries) == 2 * len(demo.DEMO_CLASSES) * 4
    assert all(set(e) == set(data.OPENAQA_KEYS) for e in entries)
    evals = data.load_openaqa(paths["eval"])
    labels = (tmp_path / "demo_labels.csv").read_text().splitlines()
    assert labels[0] == "index,mid,display_name" and len(labels) == len(demo.DEMO_CLASSES) + 1
    names = {line.split(",", 2)[2] for line in labels[1:]}
    assert {e["output"] for e in evals} == names and all(e["instruction"] == data.CLASSIFY_PROMPT for e in evals)
    clips = json.loads(paths["clips"].read_text())
    assert {c["file"] for c in clips if c["split"] == "train"} == {e["audio_id"] for e in entries}
    for c in clips:
        f, mag, x = _spectrum(str(paths["clips"].parent / c["file"]))
        assert 1.0 <= len(x) / 16000 <= 3.0
        rms_db = 10 * np.log10(np.mean(x ** 2))
        cls = c["class"]
        if cls == "silence":
            assert rms_db < -60
            continue
        if cls == "click_train":
            lo, hi = demo.CLICK_PEAK_DB[c["loudness"]]
            assert lo - 0.1 < 20 * np.log10(np.abs(x).max()) < hi + 0.1
        else:
            lo, hi = demo.LEVELS_DB[c["loudness"]]
            assert lo - 0.5 < rms_db < hi + 0.5, (c, rms_db)
        if cls in demo.TONE_BANDS:     # the spectral peak is at the stated pitch, inside its class's band
            peak = f[np.argmax(mag)]
            assert abs(peak - c["freq"]) < 2 and demo.TONE_BANDS[cls][0] <= peak <= demo.TONE_BANDS[cls][1]
        if cls.endswith("_noise"):      # spectral slope (power per octave): white 0, pink -3 dB, brown -6 dB
            band = lambda a, b: np.mean(mag[(f >= a) & (f < b)] ** 2)
            slope = 10 * np.log10(band(2000, 4000) / band(250, 500)) / 3
            assert abs(slope - {"white": 0, "pink": -3, "brown": -6}[cls.split("_")[0]]) < 1.5, (cls, slope)
        if cls.endswith("_chirp"):      # the dominant frequency rises or falls over time
            n = len(x) // 4
            fn = np.fft.rfftfreq(n, 1 / 16000)
            first, last = (fn[np.argmax(np.abs(np.fft.rfft(x[i:i + n])))] for i in (0, 3 * n))
            assert (last > 2 * first) if cls == "rising_chirp" else (first > 2 * last)


# ----------------------------------------------------------------------------------------------------------------
# The demo run, at reduced sizes
# ----------------------------------------------------------------------------------------------------------------

TINY_DEMO = dict(clips_per_class=1, eval_per_class=1, lm_steps=4, dass_steps=3, stage1_epochs=1, stage2_epochs=1,
                 batch_size=8, micro_batch=4, warmup_steps=1, check_clips=2)


def test_small_demo_run_gives_a_loadable_checkpoint_that_trains_further(tmp_path, capsys):
    res = demo.run_demo(tmp_path / "demo", demo.DemoConfig(**TINY_DEMO), seed=0)
    out = Path(res["checkpoint"])
    err = capsys.readouterr().err
    for step in ("[1/6]", "[3/6]", "[4/6]", "stage 1", "stage 2", "[6/6]"):
        assert step in err
    out = out.rename(tmp_path / "moved")  # the demo folder is self-contained: it works wherever it is
    model = checkpoint.load_checkpoint(out)
    assert model.config.audio_frames == demo.DemoConfig.audio_frames
    ev = data.load_openaqa(out / "demo_eval.json")[0]
    answer = model.answer([str(out / ev["audio_id"])], [ev["instruction"]], greedy=True, max_new_tokens=5)[0]
    assert isinstance(answer, str)
    saved = load_file(str(out / "model.safetensors"))
    own = model.trainable_state_dict()
    assert set(saved) == set(own) and all(torch.equal(saved[k], own[k]) for k in saved)
    # the real command line on top of it: stage 3 from the demo's checkpoint, 2 steps, then loadable again
    rc = train.main(["--stage", "3", "--data", str(out / "data" / "demo_cla.json"), "--init-from", str(out),
                     "--output-dir", str(tmp_path / "s3"), "--max-steps", "2", "--batch-size", "4",
                     "--micro-batch", "2", "--num-workers", "0", "--warmup-steps", "1"])
    assert rc == 0
    log = [json.loads(x) for x in (tmp_path / "s3" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    again = checkpoint.load_checkpoint(tmp_path / "s3")
    before = model.trainable_state_dict()
    after = again.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora" in k)


def test_demo_is_deterministic_given_the_seed(tmp_path):
    files = []
    for run in ("a", "b"):
        demo.run_demo(tmp_path / run, demo.DemoConfig(**{**TINY_DEMO, "check_clips": 1}), seed=3)
        files.append([(tmp_path / run / f).read_bytes() for f in ("model.safetensors", "llm/model.safetensors",
                                                                   "llm/tokenizer.json", "data/demo_train.json")])
    a, b = files
    assert [x == y for x, y in zip(a, b)] == [True, True, True, True]
