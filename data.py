"""The data the recipe trains on and Table I evaluates on: OpenAQA's JSON entries, label CSVs, where the audio is.

Glossary (code name -> meaning):
    entry        one OpenAQA question-answer pair: {instruction, input, audio_id, dataset, task, output}
    audio_id     the entry's audio file as its JSON names it: relative, or absolute on the machine it was made on
    root         a folder relative audio_ids are looked up in (--audio-root, then the JSON's own folder)
    prefix       a rewrite OLD=NEW applied to the start of an audio_id (--audio-prefix): LTU's absolute paths
    label CSV    one row per class, header index,mid,display_name (AudioSet's and LTU's eval/labels/ files)
    Clip         one evaluation entry with its audio found (or not) on this machine
    BadEntry     an entry training cannot use: its audio is missing or cannot be decoded, or no token of its text
                 is labelled (the text cutoff falls before the part the loss is on); training raises it, or skips it
    labelled     a text position with a loss: positions 1.. (the first token is given, not predicted) whose label
                 is not IGNORE_INDEX
    fingerprint  sha256 over the entries training reads (audio_id, instruction, input, output, in order): a resumed
                 run refuses other data of the same length

Every reader fails loudly on bad data, naming the file and the entry, before any model is built or run.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

import audio
from sslalm import IGNORE_INDEX

OPENAQA_KEYS = ("instruction", "input", "audio_id", "dataset", "task", "output")
# LTU's closed-ended classification question: asked of every classification clip in Table I (evaluate.PROMPTS), and
# the question of the demo's classification pairs.
CLASSIFY_PROMPT = "Close-ended question: Write an audio caption describing the sound."


class DataError(ValueError):
    """Bad data: a malformed JSON entry or label CSV, a missing or unreadable audio file."""


# ----------------------------------------------------------------------------------------------------------------
# OpenAQA JSON files
# ----------------------------------------------------------------------------------------------------------------

def read_entries(path: str | Path, what: str) -> list:
    """The non-empty JSON list in `path`; `what` says what the file should be, for the error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {what}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); JSON files are UTF-8") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of entries, got "
                        f"{'an empty list' if data == [] else 'a ' + type(data).__name__}")
    return data


def load_openaqa(path: str | Path) -> list[dict]:
    """Read and validate an OpenAQA training file: a list of objects with the six string keys `OPENAQA_KEYS`.

    Raises DataError naming the file, the entry index and the problem for the first malformed entry, so a bad
    file fails before any training starts. Extra keys are allowed (and ignored).
    """
    data = read_entries(path, f"an OpenAQA JSON file (a list of objects with the keys {', '.join(OPENAQA_KEYS)})")
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise DataError(f"{path}: entry {i} is a {type(e).__name__}, not an object with keys {OPENAQA_KEYS}")
        where = f"{path}: entry {i}" + (f" (audio_id {e['audio_id']!r})" if isinstance(e.get("audio_id"), str) else "")
        missing = [k for k in OPENAQA_KEYS if k not in e]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}; an OpenAQA entry has {list(OPENAQA_KEYS)}")
        for k in OPENAQA_KEYS:
            if not isinstance(e[k], str):
                raise DataError(f"{where}: {k!r} must be a string, got {type(e[k]).__name__}")
        for k in ("instruction", "audio_id", "output"):
            if not e[k].strip():
                raise DataError(f"{where}: {k!r} is empty")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Where the audio is
# ----------------------------------------------------------------------------------------------------------------

def parse_prefixes(specs: Sequence[str]) -> list[tuple[str, str]]:
    """['OLD=NEW', ...] -> [(OLD, NEW), ...] for `resolve_audio`."""
    out = []
    for s in specs:
        if "=" not in s:
            raise DataError(f"--audio-prefix expects OLD=NEW, got {s!r}")
        old, new = s.split("=", 1)
        out.append((old, new))
    return out


def audio_candidates(audio_id: str, roots: Sequence[str | Path],
                     prefixes: Sequence[tuple[str, str]] = ()) -> list[Path]:
    """The files an audio_id may name, in the order they are tried:
    the first matching prefix rewrite OLD -> NEW is applied; an absolute path is tried as it is; then under each
    root, the path (a leading '/' dropped) and its file name alone (LTU's absolute paths from another machine);
    last, a relative path as it is (relative to the working directory)."""
    for old, new in prefixes:
        if audio_id.startswith(old):
            audio_id = new + audio_id[len(old):]
            break
    given = Path(audio_id)
    out = [given] if given.is_absolute() else []
    for root in roots:
        out += [Path(root) / audio_id.lstrip("/"), Path(root) / given.name]
    if not given.is_absolute():
        out.append(given)
    return list(dict.fromkeys(out))  # each once, in order


def resolve_audio(audio_id: str, roots: Sequence[str | Path],
                  prefixes: Sequence[tuple[str, str]] = ()) -> Path | None:
    """The first existing file among `audio_candidates`, or None."""
    return next((p for p in audio_candidates(audio_id, roots, prefixes) if p.is_file()), None)


# ----------------------------------------------------------------------------------------------------------------
# Label CSVs
# ----------------------------------------------------------------------------------------------------------------

def read_labels(path: str | Path) -> list[str]:
    """Class names by index from a label CSV with the header index,mid,display_name (AudioSet's
    class_labels_indices.csv, LTU's eval/labels/ files). Names lose surrounding quotes: LTU's files quote some
    names with " and some with ' (the csv module removes the first kind only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label CSV not found: {path}. Expected a CSV with the header index,mid,display_name "
                                "and one row per class (e.g. LTU's eval/labels/class_labels_indices_*.csv)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise DataError(f"{path}: expected the header index,mid,display_name and at least one row")
    names = {}
    for n, r in enumerate(rows, start=2):
        try:
            names[int(r["index"])] = unquote(r["display_name"])
        except (TypeError, ValueError):
            raise DataError(f"{path}: line {n}: index {r['index']!r} is not an integer") from None
    if sorted(names) != list(range(len(rows))):
        raise DataError(f"{path}: the indices are not 0..{len(rows) - 1}, each once")
    return [names[i] for i in range(len(names))]


def unquote(name: str) -> str:
    """A name without the matching quotes around it ("Dog" or 'Dog' -> Dog)."""
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"":
        name = name[1:-1]
    return name


# ----------------------------------------------------------------------------------------------------------------
# Evaluation sets
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    """One eval entry. `key` (its position in the eval list) identifies it in the predictions JSONL."""
    key: str
    audio_id: str       # as written in the eval data
    reference: str      # the 'output' field: label name(s) or a reference caption
    instruction: str    # the entry's own instruction (the demo task asks it)
    path: str | None    # the audio file found on this machine, None where it is missing


def load_eval_json(path: str | Path, audio_root: str | Path | None = None,
                   prefixes: Sequence[tuple[str, str]] = (), need_instruction: bool = False) -> list[Clip]:
    """LTU's eval JSON: a list of OpenAQA objects. audio_id (a non-empty string) and output (a string) are required,
    and a non-empty instruction with need_instruction (a task that asks each entry its own question). Every entry is
    checked before any is used; the first bad one is a DataError naming the file and the entry. The audio is looked
    up under --audio-root, then next to the JSON (see `audio_candidates`)."""
    data = read_entries(path, "LTU's eval data: a JSON list of objects with the keys "
                              f"{', '.join(OPENAQA_KEYS)} (e.g. esc50.json from LTU's eval set)")
    roots = [r for r in (audio_root, Path(path).resolve().parent) if r]
    required = ("audio_id", "output", "instruction") if need_instruction else ("audio_id", "output")
    clips = []
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise DataError(f"{path}: entry {i} is a {type(e).__name__}, not an object with the keys {OPENAQA_KEYS}")
        missing = [k for k in required if k not in e]
        if missing:
            raise DataError(f"{path}: entry {i} lacks the key(s) {missing}; expected the OpenAQA keys {OPENAQA_KEYS}")
        for k in ("audio_id", "output", "instruction"):
            if k in e and not isinstance(e[k], str):
                raise DataError(f"{path}: entry {i}: {k!r} must be a string, got {json.dumps(e[k])[:60]}")
        for k in ("audio_id", "instruction") if need_instruction else ("audio_id",):
            if not e[k].strip():
                raise DataError(f"{path}: entry {i}: {k!r} is empty")
        found = resolve_audio(e["audio_id"], roots, prefixes)
        clips.append(Clip(str(i), e["audio_id"], e["output"], e.get("instruction", ""),
                          None if found is None else str(found)))
    return clips


def load_esc50(root: str | Path) -> tuple[list[Clip], list[str]]:
    """ESC-50's own layout: root/meta/esc50.csv (filename,fold,target,category,...) and root/audio/*.wav.
    Returns the clips and the class names by target index."""
    root = Path(root)
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"ESC-50 metadata not found: {meta}. Expected ESC-50's layout "
                                "(github.com/karolpiczak/ESC-50): ROOT/meta/esc50.csv and ROOT/audio/*.wav")
    if not (root / "audio").is_dir():
        raise FileNotFoundError(f"{root / 'audio'} not found: ESC-50's clips belong in ROOT/audio/")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"filename", "target", "category"} <= set(rows[0]):
        raise DataError(f"{meta}: expected the columns filename,fold,target,category,...")
    names = {int(r["target"]): r["category"] for r in rows}
    clips = []
    for i, r in enumerate(rows):
        path = root / "audio" / r["filename"]
        clips.append(Clip(str(i), r["filename"], r["category"], CLASSIFY_PROMPT,
                          str(path) if path.is_file() else None))
    return clips, [names[i] for i in range(len(names))]


# ----------------------------------------------------------------------------------------------------------------
# Training examples
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class BadEntry:
    index: int
    file: str
    reason: str

    def __str__(self) -> str:
        return f"entry {self.index}" + (f" ({self.file})" if self.file else "") + f": {self.reason}"


NO_LABEL = "no labelled token: the text cutoff falls before the part of its text the loss is on"


def labelled_tokens(labels: Sequence[int]) -> int:
    """How many positions of an example's labels have a loss (see the glossary: position 0 is never predicted)."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


class OpenAQADataset(torch.utils.data.Dataset):
    """OpenAQA entries -> training examples {"fbank": (T, 128), "input_ids": list, "labels": list, "index": int,
    "file": str}.

    encode(instruction, output, input) -> (input_ids, labels) tokenizes an entry (the model's prompt format and text
    cutoff: `SSLALM.encode_example`). The audio is found with `resolve_audio` (under `roots`, after the `prefixes`
    rewrites), read and turned into the DASS input (`audio.dass_input_from_file`: `audio_frames`
    frames, or all of them when None). A file that is missing or cannot be decoded gives a `BadEntry` instead of an
    example; the training loop raises it as a DataError or, with skip_bad, skips and counts it. Missing files are
    found up front by `check_files`, entries without a labelled token by `check_labels`. `source` is the JSON file
    the entries came from (named in messages; `fingerprint` identifies its content).
    """

    def __init__(self, entries: list[dict], encode: Callable[[str, str, str], tuple[list[int], list[int]]],
                 roots: Sequence[str | Path] = (), prefixes: Sequence[tuple[str, str]] = (),
                 audio_frames: int | None = audio.DASS_FRAMES, cache: bool = False, source: str | Path | None = None):
        self.entries, self.encode, self.audio_frames = entries, encode, audio_frames
        self.roots, self.prefixes = list(roots), list(prefixes)
        self.source = None if source is None else str(source)
        self.cache = {} if cache else None  # path -> DASS input; in this process only (use with num_workers=0)
        found: dict[str, Path | None] = {}  # audio_id -> file: entries share clips
        for e in entries:
            if e["audio_id"] not in found:
                found[e["audio_id"]] = resolve_audio(e["audio_id"], self.roots, self.prefixes)
        self.paths = [found[e["audio_id"]] for e in entries]
        self.index = list(range(len(entries)))  # dataset position -> entry index in the JSON file

    def check_files(self, skip_bad: bool) -> list[BadEntry]:
        """Entries whose audio file was not found raise DataError naming the entry and the files looked for, or
        with skip_bad are dropped from the dataset; returns the dropped entries."""
        bad = []
        for i, p in zip(self.index, self.paths):
            if p is not None:
                continue
            looked = [str(c) for c in audio_candidates(self.entries[i]["audio_id"], self.roots, self.prefixes)]
            bad.append(BadEntry(i, looked[0], "no such audio file"))
            if not skip_bad:
                raise DataError(f"entry {i} (audio_id {self.entries[i]['audio_id']!r}): no audio file; looked for "
                                f"{', '.join(looked)}. Set --audio-root (relative paths) or --audio-prefix OLD=NEW "
                                "(absolute paths), or pass --skip-bad to skip such entries")
        self._keep([k for k, p in enumerate(self.paths) if p is not None])
        return bad

    def check_labels(self, skip_bad: bool) -> list[BadEntry]:
        """Tokenize every entry: those without a labelled token raise one DataError naming them (the first 10), or
        with skip_bad are dropped from the dataset; returns the dropped entries."""
        keep, bad = [], []
        for k, i in enumerate(self.index):
            e = self.entries[i]
            if labelled_tokens(self.encode(e["instruction"], e["output"], e["input"])[1]):
                keep.append(k)
            else:
                bad.append(BadEntry(i, e["audio_id"], NO_LABEL))
        if bad and not skip_bad:
            names = "; ".join(f"entry {b.index} ({b.file})" for b in bad[:10])
            raise DataError(f"{self.source or 'the data'}: {len(bad)} entr{'y has' if len(bad) == 1 else 'ies have'} "
                            f"{NO_LABEL}: {names}{' ...' if len(bad) > 10 else ''}. Shorten their text, or pass "
                            "--skip-bad to skip such entries")
        self._keep(keep)
        return bad

    def _keep(self, positions: list[int]) -> None:
        self.index = [self.index[k] for k in positions]
        self.paths = [self.paths[k] for k in positions]

    def fingerprint(self) -> str:
        """sha256 over the entries in the dataset, in order: what a resumed run must train on again."""
        h = hashlib.sha256()
        for i in self.index:
            e = self.entries[i]
            h.update("\x1f".join((e["audio_id"], e["instruction"], e["input"], e["output"])).encode() + b"\x1e")
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict | BadEntry:
        i, path = self.index[k], self.paths[k]
        e = self.entries[i]
        if path is None:
            return BadEntry(i, e["audio_id"], "no such audio file")
        fb = self.cache.get(path) if self.cache is not None else None
        if fb is None:
            try:
                fb = audio.dass_input_from_file(path, self.audio_frames)  # (T, 128)
            except (OSError, ValueError) as err:
                return BadEntry(i, str(path), str(err))
            if self.cache is not None:
                self.cache[path] = fb
        input_ids, labels = self.encode(e["instruction"], e["output"], e["input"])
        return {"fbank": fb, "input_ids": input_ids, "labels": labels, "index": i, "file": str(path)}


def collate_checked(items: list, collate: Callable[[list[dict], int], dict], pad_id: int) -> dict:
    """The model's collate on the good items; bad ones travel along in batch["bad"] (a list of BadEntry), and
    batch["n"] counts the good ones. An example without a labelled token is bad (its loss would be 0/0 = NaN), so
    a batch holds at least one labelled token whenever n > 0."""
    good, bad = [], []
    for x in items:
        if isinstance(x, BadEntry):
            bad.append(x)
        elif labelled_tokens(x["labels"]):
            good.append(x)
        else:
            bad.append(BadEntry(x["index"], x.get("file", ""), NO_LABEL))
    batch = collate([{k: v for k, v in x.items() if k not in ("index", "file")} for x in good], pad_id) if good else {}
    batch["bad"] = bad
    batch["n"] = len(good)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Numbers on the command line (train.py, evaluate.py)
# ----------------------------------------------------------------------------------------------------------------

def at_least(low: float, kind: type = int, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` >= low (> low with strict); argparse names the option in its
    error ("argument --batch-size: must be an integer >= 1, got 0")."""
    def parse(text: str):
        value = kind(text)  # ValueError: argparse's "invalid <name> value"
        if not math.isfinite(value) or value < low or strict and value == low:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} {'>' if strict else '>='} {low:g}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse
