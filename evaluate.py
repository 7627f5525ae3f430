"""Table I of the paper: LTU's closed-ended evaluation, offline.

    python evaluate.py --task esc50         # the newest model under runs/ on data/ESC-50-master (layout.py)
    python evaluate.py --task esc50 --checkpoint runs/small --data esc50.json --labels esc50_labels.csv
    python evaluate.py --task esc50 --checkpoint runs/small --esc50-root ESC-50-master
    python evaluate.py --task audiocaps --checkpoint runs/small --data audiocaps_test.json --spice-jar spice-1.0.jar

The protocol is the one of LTU's public eval scripts (inference_batch.py, eval/eval_*.py), which the paper follows:
  1. Every entry of the eval JSON gets one fixed question (PROMPTS) and one answer sampled with the paper's settings
     (sampling.PAPER_SAMPLING, the model's default: temperature 0.1, top-k 500, top-p 0.95, repetition penalty 1.1,
     at most 400 new tokens).
  2. Classification: the answer is cut to the text after its last ':' (after 'Audio caption' for FSD, AudioSet and
     VGG, as LTU does), prefixed 'sound of ' and lowercased; each label becomes 'sound of <label lowercased>'.
     Both are embedded with a sentence encoder (textenc.TextEncoder) and compared by cosine similarity.
     Single-label sets: the most similar label is the prediction -> accuracy (micro-F1 for DCASE).
     Multi-label sets: the similarities are the class scores -> mAP (mean over classes of average precision).
     The ground truth is the eval JSON's 'output' field: a label name; several joined by '; ' for FSD / AudioSet.
  3. Captioning: the eval JSON holds one entry per (clip, reference caption), so each clip is answered once per
     reference (5 times for AudioCaps and Clotho). Trial t scores every clip's t-th answer against all of the
     clip's references; the reported number is the mean over trials. Text is lowercased and stripped of punctuation.

Glossary (Table I column: --task, metric, dataset):
  ESC50      esc50      accuracy   ESC-50 (2,000 clips, 50 classes); LTU JSON or the native layout (--esc50-root;
                                   its 44.1 kHz clips are resampled to 16 kHz by the model's audio loader)
  DCASE      dcase      micro-F1   DCASE 2017 task 4 (17 classes; one label per entry, so micro-F1 = accuracy)
  VS         vs         accuracy   VocalSound (6 classes)
  TUT        tut        accuracy   TUT acoustic scenes 2017 (15 classes)
  BJO        bjo        accuracy   Beijing Opera percussion (4 classes)
  VGG        vgg        accuracy   VGGSound (309 classes)
  FSD        fsd        mAP        FSD50K eval (200 classes, multi-label)
  AudioSet   audioset   mAP        AudioSet eval (527 classes, multi-label)
  AudioCaps  audiocaps  SPICE      AudioCaps test; CIDEr-D and BLEU-4 are reported too
  Clotho     clotho     SPICE      Clotho evaluation split; CIDEr-D and BLEU-4 too
  (demo)     demo       accuracy   held-out split written by `train.py --demo` (demo_eval.json + demo_labels.csv)

Where this differs from LTU's scripts:
  - Text encoder: LTU embedded with OpenAI's remote text-embedding-ada-002. Here a local BERT sentence encoder
    (all-MiniLM-L6-v2 by default) stands in, so numbers are close to, not identical with, Table I's.
  - LTU cuts a fixed number of characters after the split ([1:] or [2:]), which assumes a ': ' or a space there;
    we strip whitespace instead (the same text when LTU's assumption holds, no lost first letter when it does not).
  - LTU's single-label scores start at 0 and keep max(0, similarity), so when every similarity is <= 0 it picks
    class 0; we take the argmax of the similarities themselves.
  - Captions: coco-caption's Java PTB tokenizer is replaced by lowercasing, deleting punctuation and splitting on
    whitespace. LTU has already deleted punctuation and lowercased, so the tokens agree except where the PTB
    tokenizer splits a word further ('cannot' -> 'can not'). BLEU and CIDEr-D are coco-caption's (closest reference
    length and 1e-15/1e-9 smoothing for BLEU; sigma 6, clipping, length penalty, x10 for CIDEr-D). SPICE runs
    coco-caption's jar (--spice-jar; it needs Java and the Stanford CoreNLP jars in the jar's lib/) or is reported
    as not computed.
  - The demo task asks each entry's own instruction (the model was trained on those), not the fixed prompt.
As in LTU, each clip is cut (or padded) to the training length (1024 frames, 10.24 s) before the model hears it;
--whole-clips keeps long clips whole instead (more audio tokens; the model was not trained on those).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import string
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import audio
import checkpoint
import layout
from data import CLASSIFY_PROMPT, Clip, at_least, load_esc50, load_eval_json, parse_prefixes, read_labels, unquote
from metrics import accuracy, bleu, cider_d, mean_average_precision, micro_f1, spice
from textenc import TextEncoder
from trainer import check_model_files

PROMPTS = {
    **{t: CLASSIFY_PROMPT for t in ("esc50", "dcase", "vs", "tut", "bjo", "vgg", "fsd", "audioset")},
    "audiocaps": "Close-ended question: Write an audio caption describing the sound, in AudioCaps style.",
    "clotho": "Close-ended question: Create a caption for audio, in Clotho style.",
    "demo": None,  # each entry's own instruction
}


@dataclass(frozen=True)
class Task:
    column: str  # Table I's column
    kind: str  # 'single', 'multi' or 'caption'
    metric: str  # the key of the Table I number in the metrics dict


TASKS = {
    "esc50": Task("ESC50", "single", "accuracy"),
    "dcase": Task("DCASE", "single", "micro_f1"),
    "vs": Task("VS", "single", "accuracy"),
    "tut": Task("TUT", "single", "accuracy"),
    "bjo": Task("BJO", "single", "accuracy"),
    "vgg": Task("VGG", "single", "accuracy"),
    "fsd": Task("FSD", "multi", "mAP"),
    "audioset": Task("AudioSet", "multi", "mAP"),
    "audiocaps": Task("AudioCaps", "caption", "spice"),
    "clotho": Task("Clotho", "caption", "spice"),
    "demo": Task("Demo", "single", "accuracy"),
}
METRIC_NAMES = {"accuracy": "Acc", "micro_f1": "Mi-F1", "mAP": "mAP", "spice": "SPICE"}
# LTU's FSD50K, AudioSet and VGGSound scripts look for 'Audio caption' in the answer; the others split at ':'.
AUDIO_CAPTION_PARSE = ("fsd", "audioset", "vgg")

AnswerFn = Callable[[list, list], list]  # (audio paths, instructions) -> answers


# ----------------------------------------------------------------------------------------------------------------
# LTU's text handling
# ----------------------------------------------------------------------------------------------------------------

def label_prompt(name: str, task: str) -> str:
    """What a label is embedded as: 'sound of <label lowercased>'; '_' reads ', ' for VGGSound, ' ' elsewhere."""
    return "sound of " + name.replace("_", ", " if task == "vgg" else " ").lower()


def answer_text(answer: str, task: str) -> str:
    """The part of the model's answer that LTU scores: after 'Audio caption' (FSD/AudioSet/VGG) or the last ':'."""
    if task in AUDIO_CAPTION_PARSE:
        return answer.replace('"', "").split("Audio caption")[-1].lstrip(":").strip()
    return answer.split(":")[-1].strip()


def answer_prompt(answer: str, task: str) -> str:
    """What an answer is embedded as: 'sound of <answer text lowercased>'."""
    return "sound of " + answer_text(answer, task).lower()


def label_key(name: str) -> str:
    """Matching form of a label name: LTU compares names after dropping ',', soft hyphens and '_' (VGG, DCASE, BJO)."""
    name = unquote(name).replace("\xad", "").replace(",", " ").replace("_", " ")
    return " ".join(name.lower().split())


def reference_labels(reference: str, keys: dict[str, int], multi: bool) -> list[int] | None:
    """Class indices named by an eval entry's 'output' ('dog', 'Label: dog', 'Bark; Dog'), or None."""
    for text in (reference, reference.split(":")[-1]):
        parts = text.split(";") if multi else [text]
        idx = [keys.get(label_key(p)) for p in parts]
        if parts and None not in idx:
            return idx
    return None


def caption_text(text: str) -> str:
    """LTU's caption clean-up (text after the last ':', punctuation deleted, lowercased), whitespace-tokenised."""
    text = text.split(":")[-1].translate(str.maketrans("", "", string.punctuation)).lower()
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------------------------
# Scoring, and the protocol end to end
# ----------------------------------------------------------------------------------------------------------------

def class_targets(task: str, clips: Sequence[Clip], labels: Sequence[str]) -> np.ndarray:
    """(n, C) 0/1: the classes each clip's reference names. Raises ValueError naming the first entry whose output
    names no class of the label CSV (checked before any inference)."""
    keys = {}
    for i, name in enumerate(labels):
        if label_key(name) in keys:
            raise ValueError(f"labels {labels[keys[label_key(name)]]!r} and {name!r} read the same")
        keys[label_key(name)] = i
    targets = np.zeros((len(clips), len(labels)))
    for row, clip in enumerate(clips):
        idx = reference_labels(clip.reference, keys, multi=TASKS[task].kind == "multi")
        if idx is None:
            raise ValueError(f"entry {clip.key} ({clip.audio_id}): its output {clip.reference!r} names no class of "
                             f"the label CSV ({len(labels)} classes, e.g. {labels[0]!r})")
        targets[row, idx] = 1
    return targets


def score_classification(task: str, clips: Sequence[Clip], predictions: dict[str, str], labels: Sequence[str],
                         encoder) -> dict:
    """Embed answers and labels, compare by cosine similarity, and compute the task's metric (see the top)."""
    kind = TASKS[task].kind
    targets = class_targets(task, clips, labels)
    label_emb = torch.as_tensor(encoder.encode([label_prompt(n, task) for n in labels]), dtype=torch.float64)
    answer_emb = torch.as_tensor(encoder.encode([answer_prompt(predictions[c.key], task) for c in clips]),
                                 dtype=torch.float64)
    sims = (F.normalize(answer_emb, dim=-1) @ F.normalize(label_emb, dim=-1).T).numpy()  # (n, C) cosine
    metrics = {"task": task, "n": len(clips)}
    if kind == "multi":
        metrics["mAP"] = mean_average_precision(sims, targets)
        return metrics
    pred = sims.argmax(1)
    metrics["accuracy"] = accuracy(pred, targets.argmax(1))
    if task == "dcase":
        metrics["micro_f1"] = micro_f1(np.eye(len(labels))[pred], targets)
    return metrics


def score_captioning(task: str, clips: Sequence[Clip], predictions: dict[str, str],
                     spice_jar: str | None = None) -> dict:
    """LTU's trials: trial t takes every clip's t-th answer against all of its references; metrics are averaged
    over trials (as many as the clip with the fewest entries allows)."""
    answers, references = defaultdict(list), defaultdict(list)
    for c in clips:
        answers[c.audio_id].append(caption_text(predictions[c.key]))
        references[c.audio_id].append(caption_text(c.reference))
    ids = list(answers)
    trials = min(len(answers[i]) for i in ids)
    refs = [references[i] for i in ids]
    hyps = [[answers[i][t] for i in ids] for t in range(trials)]
    b = np.mean([bleu(h, refs) for h in hyps], axis=0)
    metrics = {"task": task, "n": len(clips), "clips": len(ids), "trials": trials,
               **{f"bleu_{k + 1}": float(b[k]) for k in range(4)},
               "cider_d": float(np.mean([cider_d(h, refs) for h in hyps])), "spice": None}
    if spice_jar is None:
        metrics["spice_note"] = "SPICE was not computed: pass --spice-jar (coco-caption's spice-1.0.jar; needs Java)"
        return metrics
    try:
        per_clip = spice([a for h in hyps for a in h], refs * trials, spice_jar)
        metrics["spice"] = float(np.mean(per_clip))
    except (OSError, RuntimeError) as e:
        metrics["spice_note"] = f"SPICE was not computed: {e}"
    return metrics


def evaluate(task: str, clips: Sequence[Clip], answer_fn: AnswerFn | None, output: str, *,
             labels: Sequence[str] | None = None, encoder=None, batch_size: int = 8, limit: int | None = None,
             spice_jar: str | None = None, progress: bool = True, skip_bad: bool = False,
             checkpoint_id: str | None = None) -> dict:
    """Run (or resume) the model over the first `limit` clips and score them as Table I does.

    answer_fn(audio_paths, instructions) -> answers; output: the predictions JSONL; labels: class names (the
    classification tasks); encoder: anything with .encode(list[str]) -> (n, d), by default TextEncoder().
    skip_bad: clips whose audio is missing or cannot be read are left out of the answers and the score, and counted
    (metrics["skipped"]); checkpoint_id: recorded with each answer (see `collect_predictions`).
    Returns the metrics dict (fractions in [0, 1]; the Table I number is under TASKS[task].metric).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    clips = list(clips)[:limit]
    if TASKS[task].kind != "caption":
        if not labels:
            raise ValueError(f"task {task} needs its label CSV (--labels)")
        class_targets(task, clips, labels)  # every reference names a class, before any inference
    instructions = [PROMPTS[task] or c.instruction for c in clips]
    predictions, skipped = collect_predictions(clips, instructions, answer_fn, output, batch_size, progress,
                                               skip_bad=skip_bad, checkpoint_id=checkpoint_id)
    clips = [c for c in clips if c.key in predictions]
    if not clips:
        raise ValueError(f"no clip of the {len(skipped)} could be read (--skip-bad skipped them all)")
    if TASKS[task].kind == "caption":
        metrics = score_captioning(task, clips, predictions, spice_jar)
    else:
        metrics = score_classification(task, clips, predictions, labels, encoder or TextEncoder())
    return {**metrics, "skipped": len(skipped)}


def table_row(metrics: dict, name: str = "model") -> str:
    """The result as a row of Table I (markdown, percent with one decimal); notes follow the table."""
    task = TASKS[metrics["task"]]
    cols = [f"{task.column} ({METRIC_NAMES[task.metric]})"]
    vals = [metrics[task.metric]]
    if task.kind == "caption":
        cols += ["CIDEr-D", "BLEU-4"]
        vals += [metrics["cider_d"], metrics["bleu_4"]]
    cells = ["n/c" if v is None else f"{100 * v:.1f}" for v in vals]
    lines = ["| Model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             f"| {name} | " + " | ".join(cells) + " |", "", f"{metrics['n']} entries."]
    if metrics.get("skipped"):
        lines.append(f"{metrics['skipped']} entries skipped: their audio could not be read (--skip-bad).")
    if metrics.get("spice_note"):
        lines.append(metrics["spice_note"] + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Asking the model: batched, resumable (one JSONL line per answer)
# ----------------------------------------------------------------------------------------------------------------

class OutputBusy(ValueError):
    """Another evaluate.py is answering into the same predictions file."""


@contextmanager
def output_lock(output: str):
    """Hold <output>.lock (created with O_EXCL, holding "host pid") while `output` is read and appended to, so two
    runs never answer the same entries into one file. A lock left by a process of this host that has ended (killed
    with -9) is taken over, saying so; any other is OutputBusy."""
    lock = output + ".lock"
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = Path(lock).read_text(errors="replace").split()
            if attempt or not _ended(holder):
                raise OutputBusy(f"{output} is being written by another evaluate.py ({lock} holds "
                                 f"{' '.join(holder) or 'nothing'}); wait for it or pass another --output, or delete "
                                 f"{lock} if that run is gone") from None
            print(f"note: {lock} was left by process {holder[1]}, which has ended; taking it over", file=sys.stderr)
            os.unlink(lock)
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield
    finally:
        os.unlink(lock)


def _ended(holder: list[str]) -> bool:
    """Whether a lock's holder ["host", "pid"] was a process of this host that no longer exists."""
    if len(holder) != 2 or holder[0] != socket.gethostname() or not holder[1].isdigit():
        return False
    try:
        os.kill(int(holder[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, owned by another user
        pass
    return False


def read_predictions(output: str, clips: Sequence[Clip], checkpoint_id: str | None = None) -> dict[str, str]:
    """Answers already in the JSONL, by clip key. A torn last line (a run stopped mid-write) is cut off. With a
    checkpoint_id, an answer recorded by another checkpoint (or by none) is refused, naming the file."""
    if not os.path.isfile(output):
        return {}
    by_key = {c.key: c for c in clips}
    try:
        with open(output, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{output}: not UTF-8 text (byte {e.start}); not a predictions file") from None
    lines = text.split("\n")
    done, good = {}, []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[n + 1:]):
                raise ValueError(f"{output}: line {n + 1} is not JSON") from None
            break  # torn last record: dropped below, it will be answered again
        if not isinstance(rec, dict) or not {"key", "audio_id", "prediction"} <= set(rec):
            raise ValueError(f"{output}: line {n + 1} is not a prediction record (key, audio_id, prediction)")
        clip = by_key.get(rec["key"])
        if clip is not None and clip.audio_id != rec["audio_id"]:
            raise ValueError(f"{output} holds answers for another eval set (entry {rec['key']} is "
                             f"{rec['audio_id']!r} there, {clip.audio_id!r} here); pass another --output")
        if checkpoint_id is not None and rec.get("checkpoint") != checkpoint_id:
            raise ValueError(f"{output}: line {n + 1} was answered by another checkpoint (recorded: "
                             f"{rec.get('checkpoint')}; this one is {checkpoint_id}); pass another --output, or "
                             "delete the file to answer again")
        good.append(line)
        done[rec["key"]] = rec["prediction"]
    clean = "".join(g + "\n" for g in good)
    if clean != text:  # a torn or unterminated last line: rewrite, so that appending starts on a new line
        with open(output, "w", encoding="utf-8") as f:
            f.write(clean)
    return done


def unreadable(clip: Clip) -> str | None:
    """Why the model cannot hear `clip` (its file is missing, or audio.dass_input_from_file refuses it), or None."""
    if clip.path is None:
        return "no audio file found"
    try:
        audio.dass_input_from_file(clip.path, target_length=None)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def collect_predictions(clips: Sequence[Clip], instructions: Sequence[str], answer_fn: AnswerFn | None,
                        output: str, batch_size: int = 8, progress: bool = True, *, skip_bad: bool = False,
                        checkpoint_id: str | None = None) -> tuple[dict[str, str], list[Clip]]:
    """Answers for all clips: those already in `output` (JSONL) are kept, the rest are asked of answer_fn in
    batches and appended, one flushed line per clip (with checkpoint_id), so a stopped run resumes where it
    stopped; `output_lock` keeps a second run out meanwhile. skip_bad: each clip's audio is read once first and
    clips that cannot be read are left unanswered. Returns (answers by clip key, the clips skipped)."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with output_lock(output):
        done = read_predictions(output, clips, checkpoint_id)
        todo = [(c, q) for c, q in zip(clips, instructions, strict=True) if c.key not in done]
        if not todo:
            return done, []
        if answer_fn is None:
            raise ValueError(f"{len(todo)} clip(s) have no answer in {output}: pass --checkpoint to run the model")
        missing = [c for c, _ in todo if c.path is None]
        if missing and not skip_bad:
            raise FileNotFoundError(f"{len(missing)} audio file(s) not found, e.g. {missing[0].audio_id!r}: pass "
                                    "--audio-root DIR, the folder holding the dataset's audio files (or --skip-bad)")
        if progress:
            print(f"{len(clips) - len(todo)} of {len(clips)} clips already answered in {output}; "
                  f"asking the model about {len(todo)}", file=sys.stderr)
        start, last_report, skipped = time.time(), 0.0, []
        with open(output, "a", encoding="utf-8") as f:
            for s in range(0, len(todo), batch_size):
                batch = todo[s:s + batch_size]
                if skip_bad:
                    why = [unreadable(c) for c, _ in batch]
                    skipped += [(c, w) for (c, _), w in zip(batch, why) if w is not None]
                    batch = [b for b, w in zip(batch, why) if w is None]
                answers = answer_fn([c.path for c, _ in batch], [q for _, q in batch]) if batch else []
                if len(answers) != len(batch):
                    raise ValueError(f"answer_fn returned {len(answers)} answers for {len(batch)} clips")
                for (c, q), a in zip(batch, answers):
                    f.write(json.dumps({"key": c.key, "audio_id": c.audio_id, "instruction": q, "prediction": a,
                                        "reference": c.reference, "checkpoint": checkpoint_id}) + "\n")
                    done[c.key] = a
                f.flush()
                n, elapsed = min(s + batch_size, len(todo)), time.time() - start
                if progress and (elapsed - last_report > 5 or n == len(todo)):
                    last_report = elapsed
                    eta = elapsed / n * (len(todo) - n)
                    print(f"{n}/{len(todo)} clips done, {n / elapsed:.2f} clips/s, ETA {eta / 60:.1f} min",
                          file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} clip(s) whose audio cannot be read (--skip-bad):", file=sys.stderr)
        for c, why in skipped[:20]:
            print(f"  entry {c.key} ({c.audio_id}): {why}", file=sys.stderr)
    return done, [c for c, _ in skipped]


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def checkpoint_identity(folder: str) -> str:
    """sha256 of a checkpoint's config.json and model.safetensors (16 hex digits), recorded with every answer so
    that answers of another checkpoint are never taken for this one's; both files are checked whole first."""
    path = Path(folder)
    check_model_files(path)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(path / name, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def model_answer_fn(folder: str, device: str | None, dtype: str | None, greedy: bool,
                    max_new_tokens: int | None, llm_weights: str | None = None, whole_clips: bool = False) -> AnswerFn:
    """answer_fn backed by sslalm's model, loaded on the first call (nothing is loaded if every clip is answered).
    It samples with the model's defaults, the paper's settings, unless greedy."""
    model = None
    settings = dict(greedy=greedy, crop=not whole_clips)
    if max_new_tokens is not None:
        settings["max_new_tokens"] = max_new_tokens

    def answer(audio: list, instructions: list) -> list:
        nonlocal model
        if model is None:
            torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[dtype]
            model = checkpoint.load_checkpoint(folder, device=device, dtype=torch_dtype, llm_weights=llm_weights)
        return model.answer(audio, instructions, **settings)

    return answer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Score a trained model on one of Table I's benchmarks, offline.")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--checkpoint", help="trained model directory (default: the newest finished one under runs/)")
    p.add_argument("--llm-weights", help="the base LLM's folder, if it has moved since training")
    p.add_argument("--data", help="LTU eval JSON (demo: demo_eval.json in CHECKPOINT or up to 2 folders above)")
    p.add_argument("--labels", help="label CSV index,mid,display_name (demo: demo_labels.csv beside demo_eval.json)")
    p.add_argument("--audio-root", help="folder holding the audio files the eval JSON names (by relative path or "
                   "by file name)")
    p.add_argument("--audio-prefix", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite audio_id paths starting with OLD (repeatable)")
    p.add_argument("--esc50-root", help="ESC-50 in its own layout (meta/esc50.csv, audio/) instead of --data "
                   "(default: data/ESC-50-master; other tasks: data/FOLDER/ as layout.EVAL_SETS)")
    p.add_argument("--limit", type=at_least(1), help="only the first N entries")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--skip-bad", action="store_true", help="leave out (and count) clips whose audio is missing or "
                   "cannot be read, instead of stopping at the first")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the paper's sampling")
    p.add_argument("--max-new-tokens", type=at_least(1), help="default: the paper's 400")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda if available (in bf16), else cpu (fp32)")
    p.add_argument("--whole-clips", action="store_true", help="long clips whole instead of cut to the training "
                   "length as LTU's evaluation does")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--output", help="predictions JSONL, resumed if present (default: CHECKPOINT/eval_TASK.jsonl)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    p.add_argument("--text-encoder", help="BERT sentence-transformers folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--spice-jar", help="coco-caption's spice-1.0.jar (captioning; needs Java)")
    a = p.parse_args(argv)
    if a.esc50_root and a.task != "esc50":
        p.error("--esc50-root goes with --task esc50")
    if a.task != "demo":
        layout.evaluation_defaults(a)  # the default layout's model and data, or one message naming what is missing
    if not (a.data or a.esc50_root or a.task == "demo" and a.checkpoint):
        p.error("pass --data EVAL_JSON" + (" or --esc50-root DIR" if a.task == "esc50" else ""))
    if not (a.labels or a.esc50_root or a.task == "demo" and a.checkpoint or TASKS[a.task].kind == "caption"):
        p.error(f"--task {a.task} needs --labels (a CSV index,mid,display_name)")
    if not (a.output or a.checkpoint):
        p.error("pass --output PREDICTIONS_JSONL (or --checkpoint)")
    return a


def main(argv: Sequence[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.task == "demo" and a.checkpoint:  # train.py --demo's output dir: the checkpoint or above it
        here = Path(a.checkpoint).resolve()
        run_dir = next((d for d in (here, *here.parents[:2]) if (d / "demo_eval.json").is_file()), here)
        a.data = a.data or str(run_dir / "demo_eval.json")
        a.labels = a.labels or str(run_dir / "demo_labels.csv")
    if a.esc50_root:
        clips, labels = load_esc50(a.esc50_root)
    else:
        clips = load_eval_json(a.data, a.audio_root, parse_prefixes(a.audio_prefix),
                               need_instruction=PROMPTS[a.task] is None)
        labels = read_labels(a.labels) if TASKS[a.task].kind != "caption" else None
    identity = checkpoint_identity(a.checkpoint) if a.checkpoint else None  # and its files checked whole
    output = a.output
    if output is None:
        output = os.path.join(a.checkpoint, f"eval_{a.task}.jsonl") if os.path.isdir(a.checkpoint) \
            else f"{a.checkpoint}.eval_{a.task}.jsonl"
    print(f"answers: {output}", file=sys.stderr)
    torch.manual_seed(a.seed)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device.startswith("cuda"):
        a.dtype = a.dtype or "bf16"
        if torch.device(a.device).index is not None:
            torch.cuda.set_device(a.device)  # kernels, CUDA graphs and streams on the chosen GPU
    answer_fn = (model_answer_fn(a.checkpoint, a.device, a.dtype, a.greedy, a.max_new_tokens, a.llm_weights,
                                 a.whole_clips) if a.checkpoint else None)
    encoder = TextEncoder(a.text_encoder) if TASKS[a.task].kind != "caption" else None
    metrics = evaluate(a.task, clips, answer_fn, output, labels=labels, encoder=encoder, batch_size=a.batch_size,
                       limit=a.limit, spice_jar=a.spice_jar, skip_bad=a.skip_bad, checkpoint_id=identity)
    name = Path(a.checkpoint).name if a.checkpoint else Path(output).stem
    print(table_row(metrics, name))
    if a.json:
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")
