"""The data the recipe trains on and Table I evaluates on: OpenAQA's JSON entries, label CSVs, where the audio is.
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
CLASSIFY_PROMPT = "Close-ended question: Write an audio caption describing the sound."  # LTU's, Table I's, the demo's


class DataError(ValueError):
    """Bad data: a malformed JSON entry or label CSV, a missing or unreadable audio file."""


# ---- OpenAQA JSON files ------------------------------------------------------------------------------------------
def read_entries(path: str | Path, what: str, required: tuple[str, ...], nonempty: tuple[str, ...]) -> list[dict]:
    """The non-empty JSON list of objects in `path` (`what` it should be), each with the string keys `required` (and a
    string instruction, if any), its keys `nonempty` not blank; an error names the file and the first bad entry."""
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
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise DataError(f"{path}: entry {i} is a {type(e).__name__}, not an object with the keys {OPENAQA_KEYS}")
        named = f" (audio_id {e['audio_id']!r})" if isinstance(e.get("audio_id"), str) else ""
        if missing := [k for k in required if k not in e]:
            raise DataError(f"{path}: entry {i} lacks the key(s) {missing}{named}; an OpenAQA entry has "
                            f"{list(OPENAQA_KEYS)}")
        for k in dict.fromkeys(required + ("instruction",)):
            if k in e and not isinstance(e[k], str):
                raise DataError(f"{path}: entry {i}: {k!r} must be a string, got {json.dumps(e[k])[:60]}{named}")
        for k in nonempty:
            if not e[k].strip():
                raise DataError(f"{path}: entry {i}: {k!r} is empty{named}")
    return data


def load_openaqa(path: str | Path) -> list[dict]:
    """An OpenAQA training file: a list of question-answer pairs, objects with the six string keys `OPENAQA_KEYS`."""
    return read_entries(path, f"an OpenAQA JSON file (a list of objects with the keys {', '.join(OPENAQA_KEYS)})",
                        OPENAQA_KEYS, ("instruction", "audio_id", "output"))


# ---- Where the audio is ------------------------------------------------------------------------------------------
def parse_prefixes(specs: Sequence[str]) -> list[tuple[str, str]]:
    """['OLD=NEW', ...] -> [(OLD, NEW), ...] for `resolve_audio`."""
    if bad := [s for s in specs if "=" not in s]:
        raise DataError(f"--audio-prefix expects OLD=NEW, got {bad[0]!r}")
    return [tuple(s.split("=", 1)) for s in specs]


def audio_candidates(audio_id: str, roots: Sequence[str | Path],
                     prefixes: Sequence[tuple[str, str]] = ()) -> list[Path]:
    """The files an audio_id may name, in the order tried: after the first matching prefix rewrite OLD -> NEW, an
    absolute path as it is; under each root (--audio-root, the JSON's folder) the path (a leading '/' dropped) and
    its file name alone (LTU's absolute paths from another machine); last, a relative path from the working folder."""
    audio_id = next((new + audio_id[len(old):] for old, new in prefixes if audio_id.startswith(old)), audio_id)
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


# ---- Label CSVs --------------------------------------------------------------------------------------------------
def read_labels(path: str | Path) -> list[str]:
    """Class names by index from a label CSV, header index,mid,display_name (AudioSet's, LTU's eval/labels/)."""
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
    """A name without matching quotes around it ("Dog" or 'Dog' -> Dog: LTU's CSVs have both; csv removes only ")."""
    name = name.strip()
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"" else name


# ---- Evaluation sets ---------------------------------------------------------------------------------------------
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
    """LTU's eval JSON: OpenAQA objects with an audio_id, an output, and with need_instruction (a task asking each
    entry its own question) an instruction. The audio is looked for under audio_root, then next to the JSON."""
    asked = ("instruction",) if need_instruction else ()
    data = read_entries(path, f"LTU's eval data: a JSON list of objects with the keys {', '.join(OPENAQA_KEYS)} "
                        "(e.g. esc50.json from LTU's eval set)", ("audio_id", "output") + asked, ("audio_id",) + asked)
    roots = [r for r in (audio_root, Path(path).resolve().parent) if r]
    found = [resolve_audio(e["audio_id"], roots, prefixes) for e in data]
    return [Clip(str(i), e["audio_id"], e["output"], e.get("instruction", ""), None if f is None else str(f))
            for i, (e, f) in enumerate(zip(data, found))]


def load_esc50(root: str | Path) -> tuple[list[Clip], list[str]]:
    """ESC-50's own layout (root/meta/esc50.csv, root/audio/*.wav) -> its clips and class names by target index."""
    root = Path(root)
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file() or not (root / "audio").is_dir():
        raise FileNotFoundError(f"ESC-50 not found in {root}: expected its layout (github.com/karolpiczak/ESC-50), "
                                "ROOT/meta/esc50.csv and ROOT/audio/*.wav")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"filename", "target", "category"} <= set(rows[0]):
        raise DataError(f"{meta}: expected the columns filename,fold,target,category,...")
    names = {int(r["target"]): r["category"] for r in rows}
    files = [root / "audio" / r["filename"] for r in rows]
    return ([Clip(str(i), r["filename"], r["category"], CLASSIFY_PROMPT, str(f) if f.is_file() else None)
             for i, (r, f) in enumerate(zip(rows, files))], [names[i] for i in range(len(names))])


# ---- Training examples -------------------------------------------------------------------------------------------
@dataclass
class BadEntry:
    """An entry training cannot use: its audio is missing or undecodable, or no token of its text is labelled."""
    index: int
    file: str
    reason: str

    def __str__(self) -> str:
        return f"entry {self.index}" + (f" ({self.file})" if self.file else "") + f": {self.reason}"


NO_LABEL = "no labelled token: the text cutoff falls before the part of its text the loss is on"


def labelled_tokens(labels: Sequence[int]) -> int:
    """How many positions of an example's labels have a loss (position 0 is never predicted)."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


class OpenAQADataset(torch.utils.data.Dataset):
    """OpenAQA entries -> examples {"fbank": (T, 128), "input_ids": list, "labels": list, "index": int, "file": str}.
    encode(instruction, output, input) -> (input_ids, labels): the prompt format (`SSLALM.encode_example`). The audio
    (`resolve_audio`) becomes the DASS input (`audio_frames` frames, all when None) unless `cache` (path -> input)
    has it. A missing or undecodable file gives a `BadEntry`, which training raises or, with skip_bad, skips;
    `check_files` and `check_labels` find bad entries up front, naming `source` (the JSON file)."""

    def __init__(self, entries: list[dict], encode: Callable[[str, str, str], tuple[list[int], list[int]]],
                 roots: Sequence[str | Path] = (), prefixes: Sequence[tuple[str, str]] = (),
                 audio_frames: int | None = audio.DASS_FRAMES, cache: dict | None = None,
                 source: str | Path | None = None):
        self.entries, self.encode, self.audio_frames, self.cache = entries, encode, audio_frames, cache or {}
        self.roots, self.prefixes = list(roots), list(prefixes)
        self.source = None if source is None else str(source)
        found = {a: resolve_audio(a, self.roots, self.prefixes) for a in {e["audio_id"] for e in entries}}
        self.paths = [found[e["audio_id"]] for e in entries]
        self.index = list(range(len(entries)))  # dataset position -> entry index in the JSON file

    def check_files(self, skip_bad: bool) -> list[BadEntry]:
        """Entries without an audio file: a DataError naming them and the files looked for, or dropped with skip_bad."""
        missing = [i for i, p in zip(self.index, self.paths) if p is None]
        looked = [audio_candidates(self.entries[i]["audio_id"], self.roots, self.prefixes) for i in missing]
        bad = [BadEntry(i, " or ".join(map(str, c)), "no such audio file") for i, c in zip(missing, looked)]
        return self._drop(bad, skip_bad, "no audio file", "Set --audio-root (relative paths) or --audio-prefix "
                                                          "OLD=NEW (absolute paths)")

    def check_labels(self, skip_bad: bool) -> list[BadEntry]:
        """Entries without a labelled token: a DataError naming them, or dropped (and returned) with skip_bad."""
        texts = ((i, self.entries[i]) for i in self.index)
        bad = [BadEntry(i, e["audio_id"], NO_LABEL) for i, e in texts
               if not labelled_tokens(self.encode(e["instruction"], e["output"], e["input"])[1])]
        return self._drop(bad, skip_bad, NO_LABEL, "Shorten their text")

    def _drop(self, bad: list[BadEntry], skip_bad: bool, problem: str, fix: str) -> list[BadEntry]:
        if bad and not skip_bad:
            names = "; ".join(f"entry {b.index} ({b.file})" for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
            raise DataError(f"{self.source or 'the data'}: {len(bad)} entr{'y has' if len(bad) == 1 else 'ies have'} "
                            f"{problem}: {names}. {fix}, or pass --skip-bad to skip such entries")
        gone = {b.index for b in bad}
        keep = [k for k, i in enumerate(self.index) if i not in gone]
        self.index, self.paths = [self.index[k] for k in keep], [self.paths[k] for k in keep]
        return bad

    def fingerprint(self) -> str:
        """sha256 over the dataset's entries (audio_id, instruction, input, output), in order: a resumed run's data."""
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
        try:
            fb = self.cache[path] if path in self.cache else audio.dass_input_from_file(path, self.audio_frames)
        except (OSError, ValueError) as err:
            return BadEntry(i, str(path), str(err))
        input_ids, labels = self.encode(e["instruction"], e["output"], e["input"])
        return {"fbank": fb, "input_ids": input_ids, "labels": labels, "index": i, "file": str(path)}


def collate_checked(items: list, collate: Callable[[list[dict], int], dict], pad_id: int) -> dict:
    """The model's collate on the good items; the bad ones (BadEntry, or an example without a labelled token, whose
    loss would be 0/0) travel along in batch["bad"], and batch["n"] counts the good ones."""
    bad = [x if isinstance(x, BadEntry) else BadEntry(x["index"], x.get("file", ""), NO_LABEL)
           for x in items if isinstance(x, BadEntry) or not labelled_tokens(x["labels"])]
    good = [{k: v for k, v in x.items() if k not in ("index", "file")} for x in items
            if not isinstance(x, BadEntry) and labelled_tokens(x["labels"])]
    return {**(collate(good, pad_id) if good else {}), "bad": bad, "n": len(good)}


# ---- Numbers on the command line (train.py, evaluate.py) ---------------------------------------------------------
def at_least(low: float, kind: type = int, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite `kind` >= low (> low with strict), else "argument --x: must be an integer >= 1"."""
    def parse(text: str):
        value = kind(text)  # ValueError: argparse's "invalid <name> value"
        if not math.isfinite(value) or value < low or strict and value == low:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} {'>' if strict else '>='} {low:g}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse
