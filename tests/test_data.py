"""data.py: OpenAQA files, where the audio is found, label CSVs, eval sets and training examples."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import data


def entry(audio_id="a.wav", **kw):
    e = dict(instruction="What can you hear?", input="", audio_id=audio_id, dataset="d", task="open-ended question",
             output="A tone.")
    e.update(kw)
    return e


def write_clips(folder, n):
    """n clips of 0.2 s of noise, clip0.wav ... in folder; returns their names."""
    noise = 0.1 * np.random.default_rng(0).standard_normal((n, 3200))
    for i, x in enumerate(noise.astype(np.float32)):
        sf.write(str(folder / f"clip{i}.wav"), x, 16000)
    return [f"clip{i}.wav" for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# OpenAQA files
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    ({"drop": "output"}, "lacks the key(s) ['output']"),
    ({"task": 3}, "'task' must be a string"),
    ({"instruction": "  "}, "'instruction' is empty"),
    ({"input": None}, "'input' must be a string"),
])
def test_openaqa_validation_names_entry_and_file(tmp_path, bad, message):
    e = entry("x/clip7.wav")
    if "drop" in bad:
        del e[bad["drop"]]
    else:
        e.update(bad)
    f = tmp_path / "data.json"
    f.write_text(json.dumps([entry(), entry(), e, entry()]))
    with pytest.raises(data.DataError) as err:
        data.load_openaqa(f)
    msg = str(err.value)
    assert str(f) in msg and "entry 2" in msg and message in msg
    if "audio_id" in e:
        assert "x/clip7.wav" in msg


@pytest.mark.parametrize("text, error, message", [
    (None, FileNotFoundError, "no such file; expected an OpenAQA JSON file"),
    ('{"instruction": "x"}', data.DataError, "expected a non-empty JSON list of entries, got a dict"),
    ("[]", data.DataError, "got an empty list"),
    ("[{]", data.DataError, "not valid JSON"),
    (json.dumps([entry(), "oops"]), data.DataError, "entry 1 is a str"),
])
def test_openaqa_validation_whole_file(tmp_path, text, error, message):
    f = tmp_path / "d.json"
    if text is not None:
        f.write_text(text)
    with pytest.raises(error) as err:
        data.load_openaqa(f)
    assert str(f) in str(err.value) and message in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# Where the audio is
# ----------------------------------------------------------------------------------------------------------------

def test_resolve_audio_prefix_roots_file_name_and_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "x").mkdir(parents=True)
    b.mkdir()
    (a / "x" / "1.flac").write_bytes(b"")
    (b / "2.flac").write_bytes(b"")
    prefixes = data.parse_prefixes([f"/data/sls/audioset={a}"])
    # a prefix rewrite gives an absolute path, tried first
    assert data.resolve_audio("/data/sls/audioset/x/1.flac", [b], prefixes) == a / "x" / "1.flac"
    # relative: under the first root that has it
    assert data.resolve_audio("x/1.flac", [b, a]) == a / "x" / "1.flac"
    # an absolute path of another machine: by its file name under a root (LTU's eval JSONs)
    assert data.resolve_audio("/elsewhere/2.flac", [a, b]) == b / "2.flac"
    assert data.resolve_audio("/elsewhere/3.flac", [a, b]) is None
    assert data.audio_candidates("/elsewhere/3.flac", [a]) == [Path("/elsewhere/3.flac"), a / "elsewhere/3.flac",
                                                               a / "3.flac"]
    # a relative path is tried under the roots before the working directory
    monkeypatch.chdir(b)
    (b / "x").mkdir()
    (b / "x" / "1.flac").write_bytes(b"")
    assert data.resolve_audio("x/1.flac", [a]) == a / "x" / "1.flac"
    assert data.resolve_audio("x/1.flac", []) == Path("x/1.flac")
    with pytest.raises(data.DataError, match="OLD=NEW"):
        data.parse_prefixes(["/data/sls"])


# ----------------------------------------------------------------------------------------------------------------
# Label CSVs
# ----------------------------------------------------------------------------------------------------------------

def test_read_labels_by_index_without_ltu_quotes(tmp_path):
    f = tmp_path / "labels.csv"
    # by index, not row order; LTU's quotes (" or ') removed
    f.write_text("index,mid,display_name\n1,/m/b,'Air horn truck horn'\n0,/m/a,\"Dog, bark\"\n2,/m/c, Rain \n")
    assert data.read_labels(f) == ["Dog, bark", "Air horn truck horn", "Rain"]
    with pytest.raises(FileNotFoundError, match="index,mid,display_name"):
        data.read_labels(tmp_path / "nope.csv")


@pytest.mark.parametrize("text, message", [
    ("id,name\n0,Dog\n", "expected the header index,mid,display_name"),
    ("index,mid,display_name\n0,/m/a,Dog\n2,/m/b,Cat\n", "the indices are not 0..1"),
    ("index,mid,display_name\n0,/m/a,Dog\nx,/m/b,Cat\n", "line 3: index 'x' is not an integer"),
])
def test_read_labels_errors_name_file_and_line(tmp_path, text, message):
    f = tmp_path / "labels.csv"
    f.write_text(text)
    with pytest.raises(data.DataError) as err:
        data.read_labels(f)
    assert f"{f}: {message}" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# Eval sets
# ----------------------------------------------------------------------------------------------------------------

def test_load_eval_json_finds_audio_and_says_what_is_expected(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    write_clips(audio, 2)
    f = tmp_path / "eval.json"
    f.write_text(json.dumps([entry("/elsewhere/clip0.wav", output="Dog"), entry("audio/clip1.wav"),
                             entry("/elsewhere/none.wav")]))
    plain, rooted = data.load_eval_json(f), data.load_eval_json(f, audio)
    assert [c.path for c in plain] == [None, str(audio / "clip1.wav"), None]  # relative to the JSON's folder
    assert [c.path for c in rooted] == [str(audio / "clip0.wav"), str(audio / "clip1.wav"), None]
    assert (rooted[0].key, rooted[0].audio_id, rooted[0].reference) == ("0", "/elsewhere/clip0.wav", "Dog")
    with pytest.raises(FileNotFoundError, match="audio_id"):
        data.load_eval_json(tmp_path / "nope.json")
    f.write_text(json.dumps([entry(), {"audio_id": "x.wav"}]))
    with pytest.raises(data.DataError, match=r"entry 1 lacks the key\(s\) \['output'\]"):
        data.load_eval_json(f)
    with pytest.raises(FileNotFoundError, match="meta/esc50.csv"):
        data.load_esc50(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Training examples
# ----------------------------------------------------------------------------------------------------------------

def byte_encode(instruction, output, input=""):
    ids = [1 + b % 39 for b in (instruction + input + output).encode()][:20]
    return ids, ids


def test_missing_audio_is_an_error_or_skipped(tmp_path):
    files = write_clips(tmp_path, 3)
    entries = [entry(files[0]), entry("missing.wav"), entry(files[2])]
    ds = data.OpenAQADataset(entries, byte_encode, roots=[tmp_path], audio_frames=64)
    assert isinstance(ds[1], data.BadEntry) and ds[1].index == 1  # unchecked: a bad entry, not an exception
    with pytest.raises(data.DataError) as err:
        ds.check_files(skip_bad=False)
    assert "entry 1" in str(err.value) and str(tmp_path / "missing.wav") in str(err.value)
    bad = ds.check_files(skip_bad=True)
    assert [b.index for b in bad] == [1] and len(ds) == 2 and ds[1]["index"] == 2
    assert ds[0]["fbank"].shape == (64, 128) and ds[0]["input_ids"] == byte_encode("What can you hear?", "A tone.")[0]


def test_collate_checked_passes_bad_entries_along():
    good = {"fbank": torch.zeros(2, 128), "input_ids": [1, 2], "labels": [1, 2], "index": 0}
    bad = data.BadEntry(3, "x.wav", "unreadable")
    seen = []

    def collate(examples, pad_id):
        seen.append((examples, pad_id))
        return {"input_ids": torch.tensor([e["input_ids"] for e in examples])}

    batch = data.collate_checked([good, bad], collate, pad_id=7)
    assert batch["n"] == 1 and batch["bad"] == [bad] and batch["input_ids"].tolist() == [[1, 2]]
    assert seen[0][1] == 7 and "index" not in seen[0][0][0]
    assert data.collate_checked([bad], collate, 7) == {"bad": [bad], "n": 0} and len(seen) == 1
