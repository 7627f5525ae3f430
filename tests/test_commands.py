"""The two commands as typed, `python train.py --size small --llm mamba` and `python evaluate.py --task esc50`, in
a fresh folder: first with nothing there (one short message listing every default path), then on tiny stand-ins in
the real formats at the default paths (layout.py): all four stages train on CPU and ESC-50 is scored."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM

import checkpoint
import evaluate
import layout
import train
import weights
from dass import DASS, DASSConfig
from mamba import MambaConfig, MambaLM
from sslalm import PROMPT_TEMPLATE
from tiny import TINY_DASS, mamba_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TRAIN, EVALUATE = str(ROOT / "train.py"), str(ROOT / "evaluate.py")
TONES = {"a low tone": 220.0, "a high tone": 1760.0, "a rising chirp": None, "white noise": 0.0}


def command(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=env)


def sound(kind: str, seconds: float, rate: int, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    if TONES[kind] is None:
        wave = np.sin(2 * np.pi * (200 * t + 1500 * t * t))
    elif TONES[kind] == 0.0:
        wave = np.random.default_rng(seed).uniform(-1, 1, t.size)
    else:
        wave = np.sin(2 * np.pi * TONES[kind] * t)
    return (0.3 * wave).astype(np.float32)


def openaqa_entry(clip: str, kind: str, task: str) -> dict:
    if task == "open-ended question":
        return dict(instruction="What might make this sound?", input="", audio_id=clip, dataset="tones",
                    task=task, output=f"Something that makes {kind}.")
    return dict(instruction="Close-ended question: Write an audio caption describing the sound.", input="",
                audio_id=clip, dataset="tones", task=task, output=f"Audio caption: {kind}.")


def pretrained_mamba(folder: Path) -> None:
    """A tiny Mamba that, like a pretrained one, answers in a few words and stops (so evaluation does not sample
    LTU's 400 tokens): taught prompt -> answer + <|endoftext|>, then written by transformers' MambaForCausalLM."""
    folder.mkdir()
    vocab = mamba_tokenizer(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    answers = [openaqa_entry("", kind, task) for kind in TONES for task in ("cla_label", "open-ended question")]
    texts = [PROMPT_TEMPLATE.format(instruction=e["instruction"]) + e["output"] for e in answers]
    seqs = [tokenizer.encode(t).ids + [0] for t in texts]  # id 0: <|endoftext|>, Mamba's EOS
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    targets = torch.tensor([s[1:] + [-100] * (width - len(s) + 1) for s in seqs])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=vocab, d_state=4))
    opt = torch.optim.Adam(lm.parameters(), lr=3e-2)
    for _ in range(60):
        loss = F.cross_entropy(lm(ids).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    assert loss.item() < 0.2
    hf = MambaForCausalLM(HFMambaConfig(vocab_size=vocab, hidden_size=32, state_size=4, num_hidden_layers=2,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))
    assert hf.load_state_dict(lm.state_dict(), strict=False).missing_keys == ["lm_head.weight"]  # tied
    hf.save_pretrained(str(folder))


def write_stand_ins(folder: Path) -> None:
    """The default layout with tiny parts in the real formats: the official DASS key layout, a transformers Mamba
    saved with save_pretrained + tokenizer.json, OpenAQA stage files over wav files, ESC-50's own layout."""
    (folder / "weights").mkdir()
    torch.manual_seed(0)
    dass = DASS(DASSConfig(**TINY_DASS["small"]))
    torch.save({"module.v." + k: v for k, v in dass.state_dict().items()}, folder / "weights" / "DASS_small.pth")
    pretrained_mamba(folder / "weights" / "mamba-2.8b-hf")

    openaqa = folder / "data" / "openaqa"
    (openaqa / "audio").mkdir(parents=True)
    kinds = list(TONES)
    for i, kind in enumerate(kinds):
        sf.write(openaqa / "audio" / f"clip{i}.wav", sound(kind, 1.0, 16000, i), 16000)
    tasks = {1: ["cla_label"] * 4, 2: ["cla_label"] * 4, 3: ["cla_label_des"] * 4,
             4: ["cla_label", "open-ended question", "cla_label_des", "open-ended question"]}
    for stage, stage_tasks in tasks.items():
        entries = [openaqa_entry(f"audio/clip{i}.wav", kinds[i], t) for i, t in enumerate(stage_tasks)]
        (openaqa / f"stage{stage}.json").write_text(json.dumps(entries, indent=1))

    esc = folder / "data" / "ESC-50-master"
    (esc / "meta").mkdir(parents=True)
    (esc / "audio").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i, kind in enumerate(kinds):
        name = f"1-{100 + i}-A-{i}.wav"
        sf.write(esc / "audio" / name, sound(kind, 0.5, 44100, 10 + i), 44100)  # ESC-50's rate
        rows.append(f"{name},1,{i},{kind.replace(' ', '_')},False,{100 + i},A")
    (esc / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")


def test_with_nothing_there_each_command_lists_every_default_path(tmp_path):
    r = command(TRAIN, "--size", "small", "--llm", "mamba", cwd=tmp_path)
    assert r.returncode != 0 and "usage:" not in r.stderr and "Traceback" not in r.stderr
    for path in ["weights/DASS_small.pth", "weights/mamba-2.8b-hf/", "weights/mamba-2.8b/",
                 *[f"data/openaqa/stage{s}.json" for s in range(1, 5)]]:
        assert path in r.stderr
    for source in ["closed_ended/combine_cla.json", "closed_ended/all_closed_qa.json", "openaqa_5.6M.json",
                   "state-spaces/mamba-2.8b-hf", "github.com/Saurabhbhati/DASS"]:
        assert source in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 10

    r = command(EVALUATE, "--task", "esc50", cwd=tmp_path)
    assert r.returncode != 0 and "usage:" not in r.stderr and "Traceback" not in r.stderr
    for path in ["runs/", "data/ESC-50-master/meta/esc50.csv", "data/ESC-50-master/audio/", "python train.py"]:
        assert path in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 6

    r = command(EVALUATE, "--task", "vs", cwd=tmp_path)
    assert r.returncode != 0 and "usage:" not in r.stderr
    for path in ["data/vocalsound/vocalsound_test.json", "data/vocalsound/class_labels_indices_vs.csv",
                 "data/vocalsound/audio/"]:
        assert path in r.stderr
    assert not (tmp_path / "runs").exists()


def test_the_two_commands_train_four_stages_and_score_esc50(tmp_path):
    write_stand_ins(tmp_path)
    r = command(TRAIN, "--size", "small", "--llm", "mamba", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "small-mamba"
    for stage in range(1, 5):
        assert layout.finished(run / f"stage{stage}")
        assert f"stage {stage} | step 1/1" in r.stderr or f"stage {stage} | step 2/2" in r.stderr  # progress line
        assert f"stage {stage} of 4: -> runs/small-mamba/stage{stage}" in r.stderr
        log = [json.loads(x) for x in (run / f"stage{stage}" / "log.jsonl").read_text().splitlines()]
        assert len(log) == (2 if stage <= 2 else 1)  # 4 entries, batch 256: one step per epoch; LTU's epochs
        assert log[0]["lr"] == pytest.approx((1e-3 if stage == 1 else 1e-4) / 100)  # first of 100 warm-up steps
    assert "is no DASS of the paper (dims (8, 16, 32, 64)" in r.stderr
    configs = [json.loads((run / f"stage{s}" / "config.json").read_text())["sslalm"] for s in range(1, 5)]
    assert {c["size"] for c in configs} == {"small"} and configs[0]["dass"]["dims"] == [8, 16, 32, 64]
    assert configs[0]["llm_weights"] == str((tmp_path / "weights" / "mamba-2.8b-hf").resolve())

    r = command(EVALUATE, "--task", "esc50", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "model: runs/small-mamba/stage4 (the newest finished model under runs/" in r.stderr
    table = r.stdout.strip().splitlines()
    assert table[0] == "| Model | ESC50 (Acc) |" and table[2].startswith("| stage4 | ") and "4 entries." in table
    assert float(table[2].split("|")[2]) in (0.0, 25.0, 50.0, 75.0, 100.0)  # percent of 4 clips
    answers = [json.loads(x) for x in (run / "stage4" / "eval_esc50.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and {a["instruction"] for a in answers} == {evaluate.PROMPTS["esc50"]}
    assert all(a["prediction"].strip() for a in answers)  # the model's own words, sampled as the paper does

    # stopped during stage 3: its checkpoint is there, its final model is not; stage 4 never started
    stage2 = (run / "stage2" / "config.json").stat().st_mtime_ns
    for name in layout.FINAL_FILES:
        (run / "stage3" / name).unlink()
    shutil.rmtree(run / "stage4")
    r = command(TRAIN, "--size", "small", "--llm", "mamba", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "stage 1 of 4: finished in runs/small-mamba/stage1, skipped" in r.stderr
    assert "stage 2 of 4: finished in runs/small-mamba/stage2, skipped" in r.stderr
    assert "resumed from runs/small-mamba/stage3/checkpoints/step-0000001 at step 1" in r.stderr
    assert (run / "stage2" / "config.json").stat().st_mtime_ns == stage2
    assert len((run / "stage3" / "log.jsonl").read_text().splitlines()) == 1  # no step was trained again
    assert layout.finished(run / "stage3") and layout.finished(run / "stage4")


def test_curriculum_order_skips_finished_stages_and_resumes_the_stopped_one(tmp_path):
    run = tmp_path / "runs" / "small-mamba"
    for stage in (1, 2):
        (run / f"stage{stage}").mkdir(parents=True)
        for name in layout.FINAL_FILES:
            (run / f"stage{stage}" / name).write_text("{}")
    (run / "stage3" / "checkpoints" / "step-0000007").mkdir(parents=True)
    calls = []

    def stage(n, out, init_from):
        calls.append((n, out, init_from))
        for name in layout.FINAL_FILES:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("{}")

    said = []
    assert layout.run_curriculum(stage, run, said.append) == run / "stage4"
    assert calls == [(3, run / "stage3", run / "stage2"), (4, run / "stage4", run / "stage3")]
    assert [line.split(":")[0] for line in said] == [f"stage {s} of 4" for s in range(1, 5)]
    assert "skipped" in said[0] and "skipped" in said[1] and "skipped" not in said[2]

    def broken(n, out, init_from):
        out.mkdir(parents=True, exist_ok=True)
    for name in layout.FINAL_FILES:
        (run / "stage4" / name).unlink()
    with pytest.raises(RuntimeError, match="stage 4 returned without a finished model"):
        layout.run_curriculum(broken, run, said.append)


def test_newest_finished_model_ignores_checkpoints_and_unfinished_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert layout.newest_model() is None
    for i, folder in enumerate(["runs/a/stage1", "runs/b", "runs/a/stage2"]):
        Path(folder).mkdir(parents=True)
        for name in layout.FINAL_FILES:
            Path(folder, name).write_text("{}")
        os.utime(Path(folder, "config.json"), ns=(10**18 + i, 10**18 + i))
    Path("runs/a/stage3/checkpoints/step-0000001").mkdir(parents=True)
    for name in layout.FINAL_FILES:  # a checkpoint is not a finished model, however new
        Path("runs/a/stage3/checkpoints/step-0000001", name).write_text("{}")
    Path("runs/a/stage3/model.safetensors").write_text("")  # no config.json: stopped while writing
    assert layout.newest_model() == Path("runs/a/stage2")


def test_dass_shapes_come_from_the_checkpoint_and_the_paper_sizes_are_recognised(tmp_path):
    """A real DASS_small.pth builds DASS small exactly (no custom fields); a tiny one builds its own shapes with a
    warning; a file of the other paper size is an error."""
    with torch.device("meta"):
        small = DASS(DASSConfig.small())
    torch.save({"module.v." + k: torch.empty(v.shape) for k, v in small.state_dict().items()},
               tmp_path / "DASS_small.pth")  # the official file's keys and shapes
    found = weights.load_dass(tmp_path / "DASS_small.pth").config
    assert checkpoint.dass_fields(found, "small", "DASS_small.pth") == {}
    with pytest.raises(ValueError, match="DASS_small.pth holds DASS small, not DASS medium: pass --size small"):
        checkpoint.dass_fields(DASSConfig.small(), "medium", "DASS_small.pth")
    tiny = DASSConfig(**TINY_DASS["medium"])
    with pytest.warns(UserWarning, match=r"tiny.pth is no DASS of the paper \(dims \(8, 16, 32, 64\)"):
        assert DASSConfig(**checkpoint.dass_fields(tiny, "small", "tiny.pth")) == tiny


def test_one_stage_takes_its_defaults_from_the_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = train.parse_args(["--stage", "3"])
    with pytest.raises(layout.MissingFiles) as e:
        layout.training_defaults(args)
    assert [path for path, _ in e.value.missing] == [
        "weights/DASS_small.pth", "weights/mamba-2.8b-hf/ or weights/mamba-2.8b/", "data/openaqa/stage3.json"]
    assert "closed_ended/all_closed_qa.json" in str(e.value)

    Path("runs/small-llama/stage2").mkdir(parents=True)
    for name in layout.FINAL_FILES:
        Path("runs/small-llama/stage2", name).write_text("{}")
    Path("data/openaqa").mkdir(parents=True)
    Path("data/openaqa/stage3.json").write_text("[]")
    args = train.parse_args(["--stage", "3", "--llm", "llama"])
    layout.training_defaults(args)  # stage 3 starts from stage 2's model: no DASS or LLM file is needed
    assert (args.init_from, args.data, args.output_dir) == (
        "runs/small-llama/stage2", "data/openaqa/stage3.json", "runs/small-llama/stage3")
    assert args.dass_weights is None and args.llm_weights is None

    args = train.parse_args(["--data", "mine.json"])  # one stage's flag: stage 1, as before the curriculum
    layout.training_defaults(args)
    assert args.stage == 1 and args.output_dir == "runs/small-mamba/stage1" and args.data == "mine.json"
