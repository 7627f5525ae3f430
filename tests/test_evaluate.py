"""evaluate.py: Table I's protocol on tiny generated eval sets whose audio says which label it carries (a tone):
LTU's prompts and text handling, accuracy / micro-F1 / mAP against scikit-learn, captioning trials, resumable
answering, the command line with a stand-in model, and once end to end with a tiny real checkpoint."""
import inspect
import json
import os
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file
from sklearn.metrics import average_precision_score

import checkpoint
import data
import evaluate as ev
import metrics
import sampling
import sslalm
from textenc import TextEncoder
from tiny import sslalm_config

SR = 16000


# ---------------------------------------------------------------------------------------------------------------
# Helpers: tiny eval sets whose audio says which label it carries (a tone), and an answer function that listens

def tone_index(path: str) -> int:
    wav, sr = sf.read(path)
    f = np.argmax(np.abs(np.fft.rfft(wav))) * sr / len(wav)
    return int(round((f - 300) / 100))


def write_tone(path: str, k: int) -> None:
    t = np.arange(SR // 4) / SR
    sf.write(path, 0.5 * np.sin(2 * np.pi * (300 + 100 * k) * t), SR)


class ToneAnswers:
    """Answers 'Audio caption: <label of the tone it hears>' and records every clip it was asked about."""

    def __init__(self, labels, template="Audio caption: {}"):
        self.labels, self.template, self.asked, self.instructions = labels, template, [], []

    def __call__(self, paths, instructions):
        self.asked += list(paths)
        self.instructions += list(instructions)
        return [self.template.format(self.labels[tone_index(p)]) for p in paths]


def write_ltu_set(tmp_path, labels, refs, tones, csv_quote='"', task="cla_label"):
    """LTU's eval JSON (relative audio ids, resolved through --audio-root) and its label CSV."""
    audio = tmp_path / "audio"
    audio.mkdir(exist_ok=True)
    entries = []
    for i, (ref, k) in enumerate(zip(refs, tones)):
        write_tone(str(audio / f"clip{i}.wav"), k)
        entries.append({"instruction": "What is the sound?", "input": "", "audio_id": f"/elsewhere/clip{i}.wav",
                        "dataset": "test", "task": task, "output": ref})
    (tmp_path / "eval.json").write_text(json.dumps(entries))
    rows = ["index,mid,display_name"] + [f"{i},/m/{i},{csv_quote}{n}{csv_quote}" for i, n in enumerate(labels)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "eval.json"), str(tmp_path / "labels.csv"), str(audio)


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# LTU's text handling

def test_label_phrasing_and_answer_parsing_like_ltu():
    assert ev.label_prompt("Fire_engine_fire_truck_(siren)", "fsd") == "sound of fire engine fire truck (siren)"
    assert ev.label_prompt("bird chirping_ tweeting", "vgg") == "sound of bird chirping,  tweeting"
    assert ev.answer_prompt("Audio caption: A Dog barks.", "esc50") == "sound of a dog barks."
    assert ev.answer_prompt('"Audio caption": Dogs: barking', "fsd") == "sound of dogs: barking"
    assert ev.answer_prompt("Dog barking", "audioset") == "sound of dog barking"
    assert ev.caption_text("Audio caption: A man speaks, then a DOG barks!") == "a man speaks then a dog barks"
    labels = ["'Air horn truck horn'", "Clapper\xad-drum", "Bark", "Male_speech_and_man_speaking",
              "bird chirping_ tweeting"]
    refs = ["Air horn, truck horn", "Clapper-drum", "Labels: Bark; Male speech and man speaking",
            "bird chirping, tweeting"]
    clips = [data.Clip(str(i), f"{i}.wav", r, "", None) for i, r in enumerate(refs)]
    targets = ev.class_targets("fsd", clips, labels)
    assert [list(np.flatnonzero(row)) for row in targets] == [[0], [1], [2, 3], [4]]
    assert ev.class_targets("vs", clips[:1] + clips[3:], labels).argmax(1).tolist() == [0, 4]
    with pytest.raises(ValueError, match="entry 0 \\(x.wav\\): its output 'Bark; Cat' names no class"):
        ev.class_targets("fsd", [data.Clip("0", "x.wav", "Bark; Cat", "", None)], labels)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline on tiny generated eval sets

VS = ["Laughter", "Sigh", "Cough", "Throat clearing", "Sneeze", "Sniff"]


def test_single_label_ltu_json_accuracy_by_construction(tmp_path, encoder):
    refs = [VS[i % 6] for i in range(10)]
    tones = [i % 6 for i in range(10)]
    tones[2], tones[7] = 5, 0  # two clips sound like another class
    eval_json, labels_csv, root = write_ltu_set(tmp_path, VS, refs, tones)
    answer = ToneAnswers(VS, "Label: {}")
    m = ev.evaluate("vs", data.load_eval_json(eval_json, root), answer, str(tmp_path / "p.jsonl"),
                    labels=data.read_labels(labels_csv), encoder=encoder, batch_size=4, progress=False)
    assert m["accuracy"] == pytest.approx(8 / 10) and m["n"] == 10
    assert set(answer.instructions) == {ev.PROMPTS["vs"]}  # the fixed prompt, not the entries' instruction
    assert "| VS (Acc) |" in ev.table_row(m) and "| 80.0 |" in ev.table_row(m)


def test_dcase_micro_f1_with_single_quoted_labels(tmp_path, encoder):
    names = ["Train horn", "Air horn truck horn", "Car alarm", "Ambulance (siren)"]
    refs = ["Train horn", "Air horn, truck horn", "Car alarm", "Ambulance (siren)", "Air horn, truck horn"]
    eval_json, labels_csv, root = write_ltu_set(tmp_path, names, refs, [0, 1, 2, 0, 1], csv_quote="'")
    m = ev.evaluate("dcase", data.load_eval_json(eval_json, root), ToneAnswers(names, "{}"), str(tmp_path / "p.jsonl"),
                    labels=data.read_labels(labels_csv), encoder=encoder, progress=False)
    assert m["micro_f1"] == pytest.approx(4 / 5) == m["accuracy"]


def test_multi_label_map_against_sklearn(tmp_path, encoder):
    names = ["Bark", "Dog", "Male_speech_and_man_speaking", "Rain", "Water"]
    refs = ["Bark; Dog", "Dog", "Male speech and man speaking", "Rain; Water", "Water", "Bark"]
    tones = [0, 1, 2, 3, 4, 0]
    eval_json, labels_csv, root = write_ltu_set(tmp_path, names, refs, tones, csv_quote="")
    clips, labels = data.load_eval_json(eval_json, root), data.read_labels(labels_csv)
    answer = ToneAnswers([n.replace("_", " ") for n in names])
    m = ev.evaluate("fsd", clips, answer, str(tmp_path / "p.jsonl"), labels=labels, encoder=encoder,
                    progress=False)
    # the same numbers from scratch: LTU's strings, cosine of unit vectors, sklearn's macro AP
    label_text = ["sound of bark", "sound of dog", "sound of male speech and man speaking", "sound of rain",
                  "sound of water"]
    answer_text = ["sound of " + names[k].replace("_", " ").lower() for k in tones]
    sims = (encoder.encode(answer_text) @ encoder.encode(label_text).T).numpy()
    targets = np.array([[1, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1],
                        [1, 0, 0, 0, 0]])
    assert m["mAP"] == pytest.approx(average_precision_score(targets, sims, average="macro"), abs=1e-6)
    assert m["mAP"] < 1.0
    # every clip answered with its only label ranks it first: mAP 1
    one = [r.split(";")[0] for r in refs]
    eval_json, _, _ = write_ltu_set(tmp_path, names, one, tones, csv_quote="")
    m1 = ev.evaluate("fsd", data.load_eval_json(eval_json, root), answer, str(tmp_path / "p1.jsonl"), labels=labels,
                     encoder=encoder, progress=False)
    assert m1["mAP"] == pytest.approx(1.0)


def write_esc50(root, categories, tones):
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i, k in enumerate(tones):
        name = f"{i % 5 + 1}-{1000 + i}-A-{i % len(categories)}.wav"
        write_tone(str(root / "audio" / name), k)
        rows.append(f"{name},{i % 5 + 1},{i % len(categories)},{categories[i % len(categories)]},False,{1000 + i},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")


class FakeModel:
    """Plays the trained model's interface: .answer(audio, instructions, **settings); records the settings."""
    calls = []

    def __init__(self, labels):
        self.listen = ToneAnswers(labels, "{}")

    def answer(self, audio, instructions, **settings):
        FakeModel.calls.append(dict(n=len(audio), **settings))
        return self.listen(audio, instructions)


def fake_sslalm(monkeypatch, labels):
    FakeModel.calls = []
    model = FakeModel(labels)
    monkeypatch.setattr(ev.checkpoint, "load_checkpoint", lambda path, device=None, dtype=None, llm_weights=None: model)
    return model


def fake_checkpoint(folder):
    """A checkpoint folder's files (what evaluate.py fingerprints); the model is FakeModel."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))


def test_answers_are_sampled_with_the_papers_settings():
    """evaluate.py passes no sampling settings: the model's defaults, which are the paper's (§III-D)."""
    defaults = {k: p.default for k, p in inspect.signature(sslalm.SSLALM.generate).parameters.items()}
    assert defaults["greedy"] is False and defaults["max_new_tokens"] == 400
    assert sampling.PAPER_SAMPLING == dict(do_sample=True, temperature=0.1, top_k=500, top_p=0.95,
                                           repetition_penalty=1.1)


def test_cli_esc50_native_layout(tmp_path, monkeypatch, capsys):
    cats = ["dog", "rooster", "chirping_birds", "door_wood_knock"]
    tones = [0, 1, 2, 3, 0, 1, 2, 3]
    tones[5] = 3  # one wrong
    write_esc50(tmp_path / "ESC-50", cats, tones)
    fake_sslalm(monkeypatch, [c.replace("_", " ") for c in cats])
    fake_checkpoint(tmp_path / "ckpt")
    m = ev.main(["--task", "esc50", "--checkpoint", str(tmp_path / "ckpt"), "--esc50-root",
                 str(tmp_path / "ESC-50"), "--batch-size", "3", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["accuracy"] == pytest.approx(7 / 8) == m["accuracy"]
    assert "| ESC50 (Acc) |" in "\n".join(out) and "| 87.5 |" in "\n".join(out)
    assert [c["n"] for c in FakeModel.calls] == [3, 3, 2]
    assert FakeModel.calls[0] == dict(n=3, greedy=False, crop=True, max_new_tokens=400)  # the paper's sampling, 10.24 s
    assert len((tmp_path / "ckpt" / "eval_esc50.jsonl").read_text().splitlines()) == 8


def test_cli_demo_uses_checkpoint_files_and_entry_instructions(tmp_path, monkeypatch, capsys):
    names = ["Dog", "Cat", "Rain"]
    ckpt = tmp_path / "demo_out"
    fake_checkpoint(ckpt)
    eval_json, labels_csv, _ = write_ltu_set(ckpt, names, ["Dog", "Cat", "Rain", "Dog"], [0, 1, 2, 1])
    os.rename(eval_json, ckpt / "demo_eval.json")
    os.rename(labels_csv, ckpt / "demo_labels.csv")
    # demo_eval.json names its audio relative to itself
    entries = json.loads((ckpt / "demo_eval.json").read_text())
    for e in entries:
        e["audio_id"] = "audio/" + os.path.basename(e["audio_id"])
    (ckpt / "demo_eval.json").write_text(json.dumps(entries))
    model = fake_sslalm(monkeypatch, names)
    ev.main(["--task", "demo", "--checkpoint", str(ckpt), "--json", "--greedy"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == pytest.approx(0.75)
    assert model.listen.instructions == ["What is the sound?"] * 4 and FakeModel.calls[0]["greedy"]
    ev.main(["--task", "demo", "--checkpoint", str(ckpt), "--json", "--whole-clips", "--output",
             str(tmp_path / "whole.jsonl")])
    assert FakeModel.calls[-1]["crop"] is False
    # an intermediate checkpoint of the run (OUT/checkpoints/step-N) finds the run's files too
    step = ckpt / "checkpoints" / "step-0000010"
    fake_checkpoint(step)
    ev.main(["--task", "demo", "--checkpoint", str(step), "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == pytest.approx(0.75)
    assert (step / "eval_demo.jsonl").is_file()


def test_cli_audio_prefix_rewrites_ltus_absolute_paths(tmp_path, monkeypatch, capsys):
    eval_json, labels_csv, root = write_ltu_set(tmp_path, VS, VS, list(range(6)))  # audio_id /elsewhere/clipN.wav
    fake_sslalm(monkeypatch, VS)
    fake_checkpoint(tmp_path / "ckpt")
    argv = ["--task", "vs", "--checkpoint", str(tmp_path / "ckpt"), "--data", eval_json, "--labels", labels_csv]
    with pytest.raises(FileNotFoundError, match="6 audio file\\(s\\) not found"):  # /elsewhere/ is not here
        ev.main(argv)
    ev.main([*argv, "--audio-prefix", f"/elsewhere/={root}/", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == 1.0
    assert FakeModel.calls[0]["n"] == 6


def test_resume_answers_each_clip_once_and_matches_uninterrupted(tmp_path, encoder):
    refs = [VS[i % 6] for i in range(11)]
    tones = [(i * 5) % 6 if i % 3 == 0 else i % 6 for i in range(11)]
    eval_json, labels_csv, root = write_ltu_set(tmp_path, VS, refs, tones)
    clips, labels = data.load_eval_json(eval_json, root), data.read_labels(labels_csv)
    run = lambda answer, out, **kw: ev.evaluate("vs", clips, answer, str(out), labels=labels, encoder=encoder,
                                               batch_size=3, progress=False, **kw)
    whole = run(ToneAnswers(VS), tmp_path / "whole.jsonl")

    out = tmp_path / "resumed.jsonl"
    answer = ToneAnswers(VS)
    first = run(answer, out, limit=4)
    assert first["n"] == 4 and len(answer.asked) == 4

    class Stop(ToneAnswers):  # the process is stopped during the second batch of this run
        def __call__(self, paths, instructions):
            if self.asked:
                raise KeyboardInterrupt
            return super().__call__(paths, instructions)

    stopper = Stop(VS)
    with pytest.raises(KeyboardInterrupt):
        run(stopper, out)
    with open(out, "a") as f:
        f.write('{"key": "7", "audio_id": "/elsewhere/cl')  # torn line of a killed write
    final = run(answer, out)
    asked = answer.asked + stopper.asked
    assert sorted(asked) == sorted(c.path for c in clips)  # every clip answered exactly once over all runs
    assert final == whole
    assert len(out.read_text().splitlines()) == 11

    # nothing left to answer: scoring needs no model
    assert run(None, out) == whole
    # the JSONL of another eval set is refused
    other = [data.Clip(c.key, "other.wav", c.reference, c.instruction, c.path) for c in clips]
    with pytest.raises(ValueError, match="another eval set"):
        ev.evaluate("vs", other, None, str(out), labels=labels, encoder=encoder)


def test_captioning_trials_and_spice_not_computed(tmp_path):
    refs = {"a.wav": ["A dog barks.", "A dog is barking loudly"], "b.wav": ["Rain falls on a roof", "Heavy rain"],
            "c.wav": ["A man speaks", "Someone talks, then silence"]}
    entries = []
    for clip, rs in refs.items():
        sf.write(str(tmp_path / clip), np.zeros(1600), SR)
        entries += [{"instruction": "", "input": "", "audio_id": clip, "dataset": "audiocaps", "task": "cap",
                     "output": r} for r in rs]
    (tmp_path / "caps.json").write_text(json.dumps(entries))
    said = Counter()

    def answer(paths, instructions):
        assert set(instructions) == {ev.PROMPTS["audiocaps"]}
        out = []
        for p in paths:
            name = os.path.basename(p)
            out.append(f"Audio caption: {refs[name][said[name] % 2].upper()} {'again' * said[name]}")
            said[name] += 1
        return out

    m = ev.evaluate("audiocaps", data.load_eval_json(str(tmp_path / "caps.json")), answer,
                    str(tmp_path / "p.jsonl"), batch_size=4, progress=False)
    assert m["trials"] == 2 and m["clips"] == 3 and m["n"] == 6
    cleaned = {c: [" ".join(r.lower().replace(".", "").replace(",", "").split()) for r in rs]
               for c, rs in refs.items()}
    trial = [[cleaned[c][t] + (" again" if t else "") for c in refs] for t in range(2)]
    R = [cleaned[c] for c in refs]
    assert m["cider_d"] == pytest.approx(np.mean([metrics.cider_d(h, R) for h in trial]))
    assert m["bleu_4"] == pytest.approx(np.mean([metrics.bleu(h, R)[3] for h in trial]))
    assert m["spice"] is None and "SPICE was not computed" in ev.table_row(m)
    assert "| AudioCaps (SPICE) | CIDEr-D | BLEU-4 |" in ev.table_row(m) and "| n/c |" in ev.table_row(m)


def test_missing_inputs_say_what_is_expected(tmp_path, encoder):
    eval_json, labels_csv, _ = write_ltu_set(tmp_path, VS, VS[:2], [0, 1])
    clips = data.load_eval_json(eval_json)  # no --audio-root: '/elsewhere/clip0.wav' is nowhere
    with pytest.raises(FileNotFoundError, match="--audio-root"):
        ev.evaluate("vs", clips, ToneAnswers(VS), str(tmp_path / "p.jsonl"), labels=VS, encoder=encoder)
    bad = [data.Clip("0", "x.wav", "Giggle", "", None)]
    (tmp_path / "p2.jsonl").write_text(json.dumps({"key": "0", "audio_id": "x.wav", "prediction": "Sigh"}) + "\n")
    with pytest.raises(ValueError, match="'Giggle' names no class"):
        ev.evaluate("vs", bad, None, str(tmp_path / "p2.jsonl"), labels=VS, encoder=encoder)


def test_cli_scores_a_real_checkpoint_without_stand_ins(bases, tmp_path, capsys):
    """The whole path with no stand-in: a tiny ssLALM checkpoint, ESC-50's layout, generation, the sentence
    encoder, the metric. The answers written are the model's own greedy answers to LTU's classification prompt."""
    cats = ["dog", "rooster", "chirping_birds"]
    write_esc50(tmp_path / "ESC-50", cats, [0, 1, 2, 0, 1])
    torch.manual_seed(0)
    checkpoint.save_checkpoint(checkpoint.build(sslalm_config(bases, "small", "mamba")), tmp_path / "ckpt")
    m = ev.main(["--task", "esc50", "--checkpoint", str(tmp_path / "ckpt"), "--esc50-root", str(tmp_path / "ESC-50"),
                 "--greedy", "--max-new-tokens", "6", "--batch-size", "2", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == m
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "eval_esc50.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {r["instruction"] for r in rows} == {ev.PROMPTS["esc50"]}
    model = checkpoint.load_checkpoint(tmp_path / "ckpt")
    clips = [str(tmp_path / "ESC-50" / "audio" / r["audio_id"]) for r in rows]
    assert [r["prediction"] for r in rows] == model.answer(clips, [ev.PROMPTS["esc50"]] * 5, greedy=True,
                                                           max_new_tokens=6)
    encoder = TextEncoder()
    labels = encoder.encode([ev.label_prompt(c, "esc50") for c in cats])
    guesses = (encoder.encode([ev.answer_prompt(r["prediction"], "esc50") for r in rows]) @ labels.T).argmax(1)
    truth = [cats.index(r["reference"]) for r in rows]
    assert m["accuracy"] == pytest.approx(float(np.mean(np.asarray(guesses) == np.asarray(truth))))


@pytest.mark.parametrize("argv, message", [
    (["--task", "demo"], "pass --data EVAL_JSON"),
    (["--task", "demo", "--data", "e.json"], "--task demo needs --labels"),
    (["--task", "demo", "--data", "e.json", "--labels", "l.csv"], "pass --output PREDICTIONS_JSONL (or --checkpoint)"),
    (["--task", "vs", "--esc50-root", "E", "--checkpoint", "c"], "--esc50-root goes with --task esc50"),
])
def test_cli_says_what_is_missing(argv, message, capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(argv)
    assert message in capsys.readouterr().err


def test_cli_without_the_default_layout_lists_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:  # layout.MissingFiles
        ev.parse_args(["--task", "vs", "--checkpoint", "c"])
    for path in ("data/vocalsound/vocalsound_test.json", "data/vocalsound/class_labels_indices_vs.csv"):
        assert path in str(e.value)
