"""What README.md's "What is guaranteed" promises, one test (or a few) per promise, each able to fail:

    nothing unpickles arbitrary objects           test_every_torch_load_reads_plain_data_only,
                                                  test_a_crafted_pickle_in_a_checkpoint_is_refused_and_runs_nothing
    a new run never mixes with an old one         test_a_new_run_refuses_a_folder_holding_another_run,
                                                  test_the_curriculum_resumes_or_restarts_its_own_stage_folders
    no labelled token never means NaN             test_entries_without_a_labelled_token_are_named_or_skipped
    --resume trains on the same data              test_resume_refuses_other_data_of_the_same_length
    a corrupt checkpoint names its file           test_resume_falls_back_over_a_corrupt_checkpoint_exactly
    a rewound run replaces its continuation       test_resuming_an_earlier_checkpoint_deletes_the_later_ones
    evaluate.py checks before it infers           test_eval_json_is_checked_before_any_inference,
                                                  test_unreadable_clips_stop_the_run_or_are_skipped_and_counted
    one --output, one writer, one checkpoint      test_two_runs_on_one_output_never_answer_the_same_entry,
                                                  test_answers_of_another_checkpoint_are_not_reused
    numbers on the command line are checked       test_bad_numbers_are_refused_by_the_parsers
Exact resume (bit-identical losses, one log line per step): test_trainer.test_resume_continues_exactly; atomic
checkpoints: test_trainer.test_checkpoint_write_is_atomic; bounded audio memory: test_audio.py.
"""
import ast
import builtins
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import audio
import checkpoint
import data
import evaluate as ev
import train
import trainer
from test_evaluate import VS, ToneAnswers, write_ltu_set
from test_trainer import MemoryData, StandIn, byte_encode, entry, pad_collate, params_of, small_cfg, write_clips

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def stand_in_saves_itself(monkeypatch):
    """The stand-in model has no ssLALM config or base LLM: checkpoints hold its weights and an empty config."""
    monkeypatch.setattr(trainer.checkpoint, "save_checkpoint", lambda model, d: model.save_checkpoint(d))


class Crash(Exception):
    pass


def crash_at(step):
    def on_step(s, loss):
        if s == step:
            raise Crash()
    return on_step


def steps_logged(folder):
    return [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Nothing unpickles arbitrary objects
# ----------------------------------------------------------------------------------------------------------------

def test_every_torch_load_reads_plain_data_only():
    """Every torch.load in the project (tests and tools included) passes weights_only=True, and nothing calls
    pickle.load(s)."""
    loads = 0
    for file in [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("tools/*.py")]:
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            if (owner, node.func.attr) == ("torch", "load"):
                loads += 1
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{file.name}:{node.lineno}"
            assert (owner, node.func.attr) not in {("pickle", "load"), ("pickle", "loads")}, \
                f"{file.name}:{node.lineno}"
    assert loads >= 5


class RunsCode:
    """What a crafted checkpoint holds: unpickling it would call open(marker, "w"), creating the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.parametrize("name", ["trainer.pt", "rng-rank0.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path, name):
    ds = MemoryData(8)
    cfg = small_cfg(epochs=1, save_every=1)
    with pytest.raises(Crash):
        trainer.train(StandIn(), ds, pad_collate, 0, cfg, tmp_path, on_step=crash_at(2))
    ckpt = trainer.list_checkpoints(tmp_path)[-1]
    marker = tmp_path / "code-ran"
    good = torch.load(ckpt / name, weights_only=True)
    torch.save({**good, "extra": RunsCode(marker)}, ckpt / name)
    with pytest.raises(checkpoint.CorruptCheckpoint) as err:
        trainer.train(StandIn(), ds, pad_collate, 0, cfg, tmp_path, resume=ckpt)
    assert str(ckpt / name) in str(err.value) and "refused unread" in str(err.value)
    assert "weights_only=False" not in str(err.value)  # no advice to unpickle it after all
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Output folders and the curriculum
# ----------------------------------------------------------------------------------------------------------------

def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path, capsys):
    ds = MemoryData(12)
    trainer.train(StandIn(), ds, pad_collate, 0, small_cfg(keep=2), tmp_path)  # 6 steps: step-4, step-6 kept
    with pytest.raises(trainer.OutputInUse) as err:
        trainer.train(StandIn(), ds, pad_collate, 0, small_cfg(max_steps=2), tmp_path)
    assert str(tmp_path) in str(err.value) and "--resume" in str(err.value) and "--overwrite" in str(err.value)
    assert "checkpoints" in str(err.value) and "log.jsonl" in str(err.value)
    res = trainer.train(StandIn(), ds, pad_collate, 0, small_cfg(max_steps=2, keep=2), tmp_path, overwrite=True)
    # the old run's higher-numbered checkpoints no longer outrank (and rotate away) the new run's
    assert [p.name for p in trainer.list_checkpoints(tmp_path)] == ["step-0000002"] == [res.checkpoint.name]
    assert steps_logged(tmp_path) == [1, 2]
    assert "--overwrite: deleting checkpoints, log.jsonl" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pass one"):
        trainer.train(StandIn(), ds, pad_collate, 0, small_cfg(), tmp_path, resume="latest", overwrite=True)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "log.jsonl").write_text("")  # a run that stopped before its first step: nothing to keep
    trainer.train(StandIn(), ds, pad_collate, 0, small_cfg(max_steps=1), fresh)


def test_the_curriculum_resumes_or_restarts_its_own_stage_folders(tmp_path, monkeypatch):
    """An unfinished stage with a checkpoint resumes from it; one stopped before its first checkpoint (a log only)
    starts afresh, its log deleted, instead of being refused."""
    calls = []
    monkeypatch.setattr(train, "run_stage", lambda args: calls.append((args.resume, args.overwrite)))
    args = train.parse_args(["--output-dir", str(tmp_path)])
    with_ckpt, log_only = tmp_path / "stage1", tmp_path / "stage2"
    (with_ckpt / "checkpoints" / "step-0000003").mkdir(parents=True)
    (with_ckpt / "checkpoints" / "step-0000003" / "trainer.pt").write_bytes(b"")
    log_only.mkdir()
    (log_only / "log.jsonl").write_text('{"step": 1}\n')
    train.curriculum_stage(args, 1, with_ckpt, None)
    train.curriculum_stage(args, 2, log_only, with_ckpt)
    assert calls == [("latest", False), (None, True)]
    with pytest.raises(SystemExit):
        train.parse_args(["--overwrite"])  # the curriculum has no one folder to overwrite


# ----------------------------------------------------------------------------------------------------------------
# Entries without a labelled token
# ----------------------------------------------------------------------------------------------------------------

class Unlabelled(MemoryData):
    """MemoryData whose entry `index` has no labelled token (its answer lies past a text cutoff)."""

    def __init__(self, n, index):
        super().__init__(n)
        item = self.items[index]
        item["labels"] = [-100] * len(item["labels"])


def test_entries_without_a_labelled_token_are_named_or_skipped(tmp_path):
    # when the data is loaded: every entry tokenized, the unlabelled ones named
    files = write_clips(tmp_path, 4)
    entries = [entry(f) for f in files]
    entries[2]["instruction"] = "a very long instruction " * 4

    def cut_before_the_answer(instruction, output, input=""):  # response-only labels after a 20-token cutoff
        ids, _ = byte_encode(instruction, output, input)
        prompt = len((instruction + input).encode())
        return ids, [-100 if k < prompt else t for k, t in enumerate(ids)]

    ds = data.OpenAQADataset(entries, cut_before_the_answer, [tmp_path], source="stage.json")
    with pytest.raises(data.DataError) as err:
        ds.check_labels(skip_bad=False)
    assert "stage.json: 1 entry has no labelled token" in str(err.value) and "entry 2 (clip2.wav)" in str(err.value)
    assert [b.index for b in ds.check_labels(skip_bad=True)] == [2] and len(ds) == 3

    # met in training (a dataset not checked up front): an error naming the entry, never a NaN loss
    cfg = small_cfg(epochs=1, batch_size=4, micro_batch=1, save_every=0)
    with pytest.raises(data.DataError, match="entry 1: no labelled token"):
        trainer.train(StandIn(dropout=0.0), Unlabelled(4, 1), pad_collate, 0, cfg, tmp_path / "a")
    # skipped: the step is the mean over the other micro-batches, exactly as for an entry skipped for its audio
    cfg.skip_bad = True
    skipped, unreadable = StandIn(dropout=0.0), StandIn(dropout=0.0)
    res = trainer.train(skipped, Unlabelled(4, 1), pad_collate, 0, cfg, tmp_path / "b")
    ref = trainer.train(unreadable, MemoryData(4, bad=(1,)), pad_collate, 0, cfg, tmp_path / "c")
    assert all(np.isfinite(res.losses)) and res.losses == ref.losses and [b.index for b in res.bad] == [1]
    assert "no labelled token" in res.bad[0].reason
    a, b = params_of(skipped), params_of(unreadable)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# Resume: the same data, and a corrupt checkpoint passed over
# ----------------------------------------------------------------------------------------------------------------

def test_resume_refuses_other_data_of_the_same_length(tmp_path):
    files = write_clips(tmp_path, 4)
    first = [entry(f) for f in files]
    other = [dict(e) for e in first]
    other[3]["output"] = "Another answer."
    make = lambda entries, name: data.OpenAQADataset(entries, byte_encode, [tmp_path], audio_frames=None, source=name)
    cfg = small_cfg(epochs=2, batch_size=2, micro_batch=2, save_every=1)
    with pytest.raises(Crash):
        trainer.train(StandIn(), make(first, "first.json"), pad_collate, 0, cfg, tmp_path / "run",
                      on_step=crash_at(2))
    with pytest.raises(data.DataError) as err:
        trainer.train(StandIn(), make(other, "other.json"), pad_collate, 0, cfg, tmp_path / "run", resume="latest")
    msg = str(err.value)
    assert "step-0000002/trainer.pt" in msg and "first.json" in msg and "other.json" in msg and "same length" in msg
    res = trainer.train(StandIn(), make(first, "first.json"), pad_collate, 0, cfg, tmp_path / "run", resume="latest")
    assert res.steps == 4


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """(the losses of an uninterrupted 6-step run, the folder of the same run stopped after step 5)."""
    root = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer.checkpoint, "save_checkpoint", lambda model, d: model.save_checkpoint(d))
        full = trainer.train(StandIn(), MemoryData(11), pad_collate, 0, small_cfg(), root / "full")
        with pytest.raises(Crash):
            trainer.train(StandIn(), MemoryData(11), pad_collate, 0, small_cfg(save_every=1), root / "cut",
                          on_step=crash_at(5))
    return full.losses, root / "cut"


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.pt", "rng-rank0.pt", "config.json"])
def test_resume_falls_back_over_a_corrupt_checkpoint_exactly(stopped_run, tmp_path, name, capsys):
    full, stopped = stopped_run
    run = shutil.copytree(stopped, tmp_path / "run")
    newest = trainer.list_checkpoints(run)[-1]
    assert newest.name == "step-0000005"
    file = newest / name
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])  # a copy cut short
    with pytest.raises(checkpoint.CorruptCheckpoint) as err:  # named explicitly: an error naming the file
        trainer.train(StandIn(), MemoryData(11), pad_collate, 0, small_cfg(save_every=1), run, resume=newest)
    assert str(file) in str(err.value) and "truncated or corrupt" in str(err.value)
    res = trainer.train(StandIn(seed=9), MemoryData(11), pad_collate, 0, small_cfg(save_every=1), run,
                        resume="latest")
    err = capsys.readouterr().err
    assert f"warning: {file}" in err and "falling back to the checkpoint before it" in err
    assert "resumed from" in err and "step-0000004 at step 4" in err
    assert res.losses == full[4:]                     # exactly the uninterrupted run from there
    assert steps_logged(run) == list(range(1, 7))     # and one log line per step


def test_resuming_an_earlier_checkpoint_deletes_the_later_ones(stopped_run, tmp_path, capsys):
    """Rewinding to step 2 replaces the continuation: its checkpoints 3-5 would otherwise outrank the new run's in
    the rotation and in "latest" (here the new run saves every 2 steps, so none of them is overwritten)."""
    full, stopped = stopped_run
    run = shutil.copytree(stopped, tmp_path / "run")
    res = trainer.train(StandIn(), MemoryData(11), pad_collate, 0, small_cfg(save_every=2), run,
                        resume=run / "checkpoints" / "step-0000002")
    assert res.losses == full[2:]
    assert [p.name for p in trainer.list_checkpoints(run)] == [f"step-000000{s}" for s in (1, 2, 4, 6)]
    assert "the later step-0000003, step-0000004, step-0000005 are deleted" in capsys.readouterr().err
    assert steps_logged(run) == list(range(1, 7))


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py
# ----------------------------------------------------------------------------------------------------------------

class Listener(ToneAnswers):
    """ToneAnswers that fails the test if it is asked anything."""

    def __call__(self, paths, instructions):
        raise AssertionError("inference ran before the data was checked")


class Hears(ToneAnswers):
    """ToneAnswers that first reads each clip as the model does (its errors name the file)."""

    def __call__(self, paths, instructions):
        for p in paths:
            audio.dass_input_from_file(p, target_length=None)
        return super().__call__(paths, instructions)


class WordCounts:
    """A stand-in sentence encoder: word counts hashed into 4096 dimensions (same words -> same vector)."""

    def encode(self, texts):
        out = np.zeros((len(texts), 4096))
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, zlib.crc32(word.encode()) % 4096] += 1
        return out


@pytest.mark.parametrize("change, message", [
    ({"audio_id": 3}, "entry 1: 'audio_id' must be a string, got 3"),
    ({"audio_id": None}, "entry 1: 'audio_id' must be a string, got null"),
    ({"output": None}, "entry 1: 'output' must be a string, got null"),
    ({"output": ["Sigh", "Cough"]}, "entry 1: 'output' must be a string, got [\"Sigh\", \"Cough\"]"),
    ({"instruction": None}, "entry 1 lacks the key(s) ['instruction']"),
    ({"instruction": " "}, "entry 1: 'instruction' is empty"),
    ({"output": "Giggle"}, "entry 1 (/elsewhere/clip1.wav): its output 'Giggle' names no class"),
])
def test_eval_json_is_checked_before_any_inference(tmp_path, change, message):
    path, labels_csv, root = write_ltu_set(tmp_path, VS, VS[:3], [0, 1, 2])
    entries = json.loads(Path(path).read_text())
    entries[1].update(change)
    if entries[1]["instruction"] is None:
        del entries[1]["instruction"]
    Path(path).write_text(json.dumps(entries))
    with pytest.raises(ValueError) as err:  # DataError is a ValueError
        clips = data.load_eval_json(path, root, need_instruction=True)  # the demo task asks each entry's question
        ev.evaluate("vs", clips, Listener(VS), str(tmp_path / "p.jsonl"), labels=data.read_labels(labels_csv),
                    encoder=WordCounts(), progress=False)
    assert message in str(err.value)
    assert path in str(err.value) or "names no class" in message


def test_eval_files_that_are_not_utf8_or_limits_below_one_are_errors(tmp_path, capsys):
    path, labels_csv, root = write_ltu_set(tmp_path, VS, VS[:2], [0, 1])
    Path(path).write_bytes(Path(path).read_bytes().replace(b"Sigh", b"Sigh \xff"))
    with pytest.raises(data.DataError, match=f"{path}: not UTF-8"):
        data.load_eval_json(path, root)
    Path(labels_csv).write_bytes(b"index,mid,display_name\n0,/m/0,Caf\xe9\n")  # Latin-1
    with pytest.raises(data.DataError, match=f"{labels_csv}: not UTF-8"):
        data.read_labels(labels_csv)
    clips = [data.Clip("0", "a.wav", "Sigh", "", None)]
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        ev.evaluate("vs", clips, Listener(VS), str(tmp_path / "p.jsonl"), labels=VS, limit=0)


def test_unreadable_clips_stop_the_run_or_are_skipped_and_counted(tmp_path):
    path, labels_csv, root = write_ltu_set(tmp_path, VS, VS * 2, list(range(6)) * 2)
    (Path(root) / "clip3.wav").write_bytes(b"RIFF, but not audio")
    (Path(root) / "clip7.wav").unlink()
    clips, labels = data.load_eval_json(path, root), data.read_labels(labels_csv)
    run = lambda out, **kw: ev.evaluate("vs", clips, Hears(VS, "{}"), str(tmp_path / out), labels=labels,
                                       encoder=WordCounts(), progress=False, **kw)
    with pytest.raises(FileNotFoundError, match="--skip-bad"):
        run("a.jsonl")
    clips[7] = data.Clip("7", clips[7].audio_id, clips[7].reference, "", str(Path(root) / "clip0.wav"))
    with pytest.raises(ValueError, match="clip3.wav"):
        run("b.jsonl")
    clips[7] = data.Clip("7", clips[7].audio_id, clips[7].reference, "", None)
    m = run("c.jsonl", skip_bad=True)
    assert m["skipped"] == 2 and m["n"] == 10 and m["accuracy"] == 1.0
    assert "2 entries skipped" in ev.table_row(m)
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 10


def test_two_runs_on_one_output_never_answer_the_same_entry(tmp_path):
    path, labels_csv, root = write_ltu_set(tmp_path, VS, VS, list(range(6)))
    clips, labels = data.load_eval_json(path, root), data.read_labels(labels_csv)
    out = str(tmp_path / "p.jsonl")
    run = lambda answer: ev.evaluate("vs", clips, answer, out, labels=labels, encoder=WordCounts(), progress=False)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)", out],
                              stdout=subprocess.PIPE, text=True)  # another run, answering into p.jsonl
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ev.OutputBusy, match=f"{out} is being written by another evaluate.py"):
            run(Listener(VS))
    finally:
        holder.kill()  # killed with -9: its lock ends with it
        holder.wait()
    assert run(ToneAnswers(VS, "{}"))["accuracy"] == 1.0
    assert run(Listener(VS))["n"] == 6  # the lock is released after each run; nothing is asked twice


def test_answers_of_another_checkpoint_are_not_reused(tmp_path):
    path, labels_csv, root = write_ltu_set(tmp_path, VS, VS, list(range(6)))
    clips, labels = data.load_eval_json(path, root), data.read_labels(labels_csv)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    StandIn().save_checkpoint(ckpt)
    first = ev.checkpoint_identity(str(ckpt))
    out = str(tmp_path / "p.jsonl")
    run = lambda answer, who: ev.evaluate("vs", clips, answer, out, labels=labels, encoder=WordCounts(),
                                          progress=False, checkpoint_id=who, limit=3)
    run(ToneAnswers(VS, "{}"), first)
    save_file({"w": torch.ones(2)}, str(ckpt / "model.safetensors"))  # trained further: other weights
    second = ev.checkpoint_identity(str(ckpt))
    assert second != first
    with pytest.raises(ValueError, match=f"{out}: line 1 was answered by another checkpoint"):
        run(Listener(VS), second)
    assert run(Listener(VS), first)["n"] == 3  # the same checkpoint: nothing is asked again
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:20])
    with pytest.raises(checkpoint.CorruptCheckpoint, match=f"{ckpt / 'model.safetensors'}: truncated or corrupt"):
        ev.checkpoint_identity(str(ckpt))


# ----------------------------------------------------------------------------------------------------------------
# Numbers on the command line
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--batch-size", "-8"], "argument --batch-size: must be an integer >= 1, got -8"),
    (["--max-steps", "-1"], "argument --max-steps: must be an integer >= 1, got -1"),
    (["--micro-batch", "0"], "argument --micro-batch: must be an integer >= 1"),
    (["--epochs", "0"], "argument --epochs: must be an integer >= 1"),
    (["--lr", "0"], "argument --lr: must be a number > 0, got 0"),
    (["--lr", "nan"], "argument --lr: must be a number > 0, got nan"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: must be an integer >= 0"),
    (["--keep", "0"], "argument --keep: must be an integer >= 1"),
    (["--grad-clip", "0"], "argument --grad-clip: must be a number > 0"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
])
def test_bad_numbers_are_refused_by_the_parsers(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        train.parse_args(["--stage", "1", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_bad_numbers_are_refused_by_evaluate_and_the_config(capsys):
    for argv in (["--limit", "0"], ["--batch-size", "0"], ["--max-new-tokens", "-3"]):
        with pytest.raises(SystemExit):
            ev.parse_args(["--task", "demo", "--checkpoint", "c", *argv])
        assert f"argument {argv[0]}: must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1; got 0"):
        trainer.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0; got -0.1"):
        trainer.TrainConfig(lr=-0.1)
