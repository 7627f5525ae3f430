"""Table I, offline: the protocol of LTU's eval scripts (inference_batch.py, eval/eval_*.py), which the paper follows.

  1. Each entry gets one fixed question (PROMPTS) and one answer sampled with the paper's settings (the model's
     defaults, sampling.PAPER_SAMPLING), its clip cut or padded to the training length, 10.24 s.
  2. Classification: the answer and each label are embedded as 'sound of <text>' by a sentence encoder; the label
     most similar (cosine) is the prediction -> accuracy (micro-F1 for DCASE); multi-label: the similarities -> mAP.
  3. Captioning: each clip is answered once per reference caption (one entry each). Trial t scores every clip's
     t-th answer against all of its references; the metrics are averaged over trials.
Unlike LTU: a local BERT (textenc) stands in for OpenAI's text-embedding-ada-002 (numbers close to Table I's, not
equal); captions are split on whitespace, not by coco-caption's Java PTB tokenizer; SPICE needs Java (--spice-jar).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import string
import sys
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple, Sequence

try:
    import fcntl
except ImportError:  # not POSIX (Windows): a second writer on one --output goes undetected
    fcntl = None

import numpy as np
import torch
import torch.nn.functional as F

import audio
import checkpoint
import layout
import sampling
from data import CLASSIFY_PROMPT, Clip, at_least, load_esc50, load_eval_json, parse_prefixes, read_labels, unquote
from metrics import accuracy, bleu, cider_d, mean_average_precision, micro_f1, spice
from textenc import TextEncoder

PROMPTS = {
    **{t: CLASSIFY_PROMPT for t in ("esc50", "dcase", "vs", "tut", "bjo", "vgg", "fsd", "audioset")},
    "audiocaps": "Close-ended question: Write an audio caption describing the sound, in AudioCaps style.",
    "clotho": "Close-ended question: Create a caption for audio, in Clotho style.",
    "demo": None,  # each entry's own instruction
}
Task = NamedTuple("Task", [("column", str), ("kind", str), ("metric", str)])  # kind: single, multi or caption
TASKS = {  # --task: Table I's column, and the eval set
    "esc50": Task("ESC50 (Acc)", "single", "accuracy"),  # ESC-50: 2,000 clips, 50 classes
    "dcase": Task("DCASE (Mi-F1)", "single", "micro_f1"),  # DCASE 2017 task 4: 17 classes, one per entry
    "vs": Task("VS (Acc)", "single", "accuracy"),  # VocalSound: 6 classes
    "tut": Task("TUT (Acc)", "single", "accuracy"),  # TUT acoustic scenes 2017: 15 classes
    "bjo": Task("BJO (Acc)", "single", "accuracy"),  # Beijing Opera percussion: 4 classes
    "vgg": Task("VGG (Acc)", "single", "accuracy"),  # VGGSound: 309 classes
    "fsd": Task("FSD (mAP)", "multi", "mAP"),  # FSD50K eval: 200 classes, labels joined by '; '
    "audioset": Task("AudioSet (mAP)", "multi", "mAP"),  # AudioSet eval: 527 classes, labels joined by '; '
    "audiocaps": Task("AudioCaps (SPICE)", "caption", "spice"),  # AudioCaps test; CIDEr-D and BLEU-4 too
    "clotho": Task("Clotho (SPICE)", "caption", "spice"),  # Clotho evaluation split; CIDEr-D and BLEU-4 too
    "demo": Task("Demo (Acc)", "single", "accuracy"),  # the held-out clips of `train.py --demo`
}
AnswerFn = Callable[[list, list], list]  # (audio paths, instructions) -> answers


def label_prompt(name: str, task: str) -> str:
    """What a label is embedded as: 'sound of <label lowercased>'; '_' reads ', ' for VGGSound, ' ' elsewhere."""
    return "sound of " + name.replace("_", ", " if task == "vgg" else " ").lower()


def answer_prompt(answer: str, task: str) -> str:
    """What an answer is embedded as: 'sound of <text after 'Audio caption' (FSD/AudioSet/VGG) or the last ':'>'."""
    if task in ("fsd", "audioset", "vgg"):
        text = answer.replace('"', "").split("Audio caption")[-1].lstrip(":")
    else:
        text = answer.split(":")[-1]
    return "sound of " + text.strip().lower()  # LTU cuts 1 or 2 characters, assuming ': '; we strip whitespace


def label_key(name: str) -> str:
    """Matching form of a label name: LTU compares names after dropping ',', soft hyphens and '_' (VGG, DCASE, BJO)."""
    name = unquote(name).replace("\xad", "").replace(",", " ").replace("_", " ")
    return " ".join(name.lower().split())


def caption_text(text: str) -> str:
    """LTU's caption clean-up (text after the last ':', punctuation deleted, lowercased), whitespace-tokenised."""
    return " ".join(text.split(":")[-1].translate(str.maketrans("", "", string.punctuation)).lower().split())


def class_targets(task: str, clips: Sequence[Clip], labels: Sequence[str]) -> np.ndarray:
    """(n, C) 0/1: the classes each reference names ('dog', 'Label: dog', 'Bark; Dog'), else a ValueError."""
    keys = {label_key(name): i for i, name in enumerate(labels)}
    targets = np.zeros((len(clips), len(labels)))
    for row, clip in enumerate(clips):
        for text in (clip.reference, clip.reference.split(":")[-1]):
            idx = [keys.get(label_key(p)) for p in (text.split(";") if TASKS[task].kind == "multi" else [text])]
            if None not in idx:
                targets[row, idx] = 1
                break
        else:
            raise ValueError(f"entry {clip.key} ({clip.audio_id}): its output {clip.reference!r} names no class of "
                             f"the label CSV ({len(labels)} classes, e.g. {labels[0]!r})")
    return targets


def score_classification(task: str, clips: Sequence[Clip], predictions: dict[str, str], labels: Sequence[str],
                         encoder) -> dict:
    """Embed answers and labels, match them by cosine similarity, and compute the task's metric."""
    targets = class_targets(task, clips, labels)  # (n, C)
    texts = [answer_prompt(predictions[c.key], task) for c in clips], [label_prompt(n, task) for n in labels]
    answers, names = (F.normalize(torch.as_tensor(encoder.encode(t), dtype=torch.float64), dim=-1) for t in texts)
    sims = (answers @ names.T).numpy()  # (n, C) cosine similarities
    if TASKS[task].kind == "multi":
        return {"task": task, "n": len(clips), "mAP": mean_average_precision(sims, targets)}
    pred = sims.argmax(1)  # LTU scores max(0, similarity), which picks class 0 when all are <= 0
    metrics = {"task": task, "n": len(clips), "accuracy": accuracy(pred, targets.argmax(1))}
    if task == "dcase":
        metrics["micro_f1"] = micro_f1(np.eye(len(labels))[pred], targets)
    return metrics


def score_captioning(task: str, clips: Sequence[Clip], predictions: dict[str, str],
                     spice_jar: str | None = None) -> dict:
    """LTU's trials, as many as the clip with the fewest entries allows; metrics are averaged over trials."""
    answers, references = defaultdict(list), defaultdict(list)
    for c in clips:
        answers[c.audio_id].append(caption_text(predictions[c.key]))
        references[c.audio_id].append(caption_text(c.reference))
    refs, hyps = list(references.values()), list(zip(*answers.values()))  # hyps[t]: trial t, one answer per clip
    b = np.mean([bleu(h, refs) for h in hyps], axis=0)
    metrics = {"task": task, "n": len(clips), "clips": len(refs), "trials": len(hyps),
               **{f"bleu_{k + 1}": float(b[k]) for k in range(4)},
               "cider_d": float(np.mean([cider_d(h, refs) for h in hyps])), "spice": None}
    try:
        metrics["spice"] = float(np.mean(spice([a for h in hyps for a in h], refs * len(hyps), spice_jar)))
    except (OSError, RuntimeError) as e:
        metrics["spice_note"] = f"SPICE was not computed: {e}"
    return metrics


def evaluate(task: str, clips: Sequence[Clip], answer_fn: AnswerFn | None, output: str, *,
             labels: Sequence[str] | None = None, encoder=None, batch_size: int = 8, limit: int | None = None,
             spice_jar: str | None = None, progress: bool = True, skip_bad: bool = False,
             checkpoint_id: str | None = None) -> dict:
    """Answer (or resume answering) the first `limit` clips into `output` (see collect_predictions) and score them;
    encoder.encode(texts) -> (n, d). Returns the metrics; Table I's number under TASKS[task].metric."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    clips = list(clips)[:limit]
    if TASKS[task].kind != "caption":
        class_targets(task, clips, labels)  # every reference names a class, before any inference
    instructions = [PROMPTS[task] or c.instruction for c in clips]
    predictions = collect_predictions(clips, instructions, answer_fn, output, batch_size, progress,
                                      skip_bad=skip_bad, checkpoint_id=checkpoint_id)
    answered = [c for c in clips if c.key in predictions]
    if not answered:
        raise ValueError(f"no clip of the {len(clips)} could be read (--skip-bad skipped them all)")
    if TASKS[task].kind == "caption":
        metrics = score_captioning(task, answered, predictions, spice_jar)
    else:
        metrics = score_classification(task, answered, predictions, labels, encoder or TextEncoder())
    return {**metrics, "skipped": len(clips) - len(answered)}


def table_row(metrics: dict, name: str = "model") -> str:
    """The result as a row of Table I (markdown, percent with one decimal), notes below it."""
    task = TASKS[metrics["task"]]
    cols = {task.column: task.metric, **({"CIDEr-D": "cider_d", "BLEU-4": "bleu_4"} if task.kind == "caption" else {})}
    cells = ["n/c" if metrics[k] is None else f"{100 * metrics[k]:.1f}" for k in cols.values()]
    lines = [f"| Model | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|", f"| {name} | {' | '.join(cells)} |",
             "", f"{metrics['n']} entries."]
    if metrics.get("skipped"):
        lines.append(f"{metrics['skipped']} entries skipped: their audio could not be read (--skip-bad).")
    if metrics.get("spice_note"):
        lines.append(metrics["spice_note"] + ".")
    return "\n".join(lines)


class OutputBusy(ValueError):
    """Another evaluate.py is answering into the same predictions file."""


def read_predictions(f: BinaryIO, output: str, clips: Sequence[Clip],
                     checkpoint_id: str | None = None) -> dict[str, str]:
    """The answers in `output` (open as f) by clip key. A torn last line (a run stopped mid-write) is cut off;
    answers for another eval set, or (given a checkpoint_id) of another checkpoint, are refused."""
    f.seek(0)
    lines = f.read().split(b"\n")
    if lines[-1]:  # no newline at the end: a torn record, cut off and answered again
        f.truncate(f.tell() - len(lines[-1]))
    audio_ids, done = {c.key: c.audio_id for c in clips}, {}
    for n, line in enumerate(lines[:-1], 1):
        try:
            rec = json.loads(line)
            key, audio_id, done[rec["key"]] = rec["key"], rec["audio_id"], rec["prediction"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{output}: line {n} is not a prediction record (key, audio_id, prediction)") from None
        if audio_ids.get(key, audio_id) != audio_id or checkpoint_id not in (None, rec.get("checkpoint")):
            raise ValueError(f"{output}: line {n} was answered by another checkpoint or for another eval set "
                             f"({rec.get('checkpoint')}, {audio_id!r}; here {checkpoint_id}, {audio_ids.get(key)!r}); "
                             "pass another --output, or delete the file to answer again")
    return done


def readable(clip: Clip) -> bool:
    """Whether the model can hear `clip` (a file that audio.dass_input_from_file takes); if not, says why."""
    try:
        if clip.path is None:
            raise FileNotFoundError("no audio file found")
        audio.dass_input_from_file(clip.path, target_length=None)
        return True
    except (OSError, ValueError) as e:
        print(f"skipped entry {clip.key} ({clip.audio_id}), its audio is unreadable (--skip-bad): {e}", file=sys.stderr)
        return False


def collect_predictions(clips: Sequence[Clip], instructions: Sequence[str], answer_fn: AnswerFn | None,
                        output: str, batch_size: int = 8, progress: bool = True, *, skip_bad: bool = False,
                        checkpoint_id: str | None = None) -> dict[str, str]:
    """Answers by clip key: those in `output` (JSONL) are kept, the rest are asked of answer_fn in batches and
    appended, one flushed line per clip tagged with checkpoint_id, so that a stopped run resumes where it stopped.
    skip_bad: clips whose audio cannot be read are left unanswered."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "a+b") as f:  # created if missing
        try:  # one writer per file: the flock is freed when its process ends, however it ends
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(f"{output} is being written by another evaluate.py: wait for it, or pass another "
                             "--output") from None
        done = read_predictions(f, output, clips, checkpoint_id)
        todo = [(c, q) for c, q in zip(clips, instructions, strict=True) if c.key not in done]
        if todo and answer_fn is None:
            raise ValueError(f"{len(todo)} clip(s) have no answer in {output}: pass --checkpoint to run the model")
        if progress:
            print(f"{output}: {len(done)} of {len(clips)} clips answered, {len(todo)} to ask", file=sys.stderr)
        if skip_bad:
            todo = [(c, q) for c, q in todo if readable(c)]
        elif missing := [c for c, _ in todo if c.path is None]:
            raise FileNotFoundError(f"{len(missing)} audio file(s) not found, e.g. {missing[0].audio_id!r}: pass "
                                    "--audio-root DIR, the folder holding the dataset's audio files (or --skip-bad)")
        for s in range(0, len(todo), batch_size):
            batch = todo[s:s + batch_size]
            answers = answer_fn([c.path for c, _ in batch], [q for _, q in batch])
            for (c, q), a in zip(batch, answers, strict=True):
                f.write(json.dumps({"key": c.key, "audio_id": c.audio_id, "instruction": q, "prediction": a,
                                    "reference": c.reference, "checkpoint": checkpoint_id}).encode() + b"\n")
                done[c.key] = a
            f.flush()
            if progress:
                print(f"{min(s + batch_size, len(todo))}/{len(todo)} clips answered", file=sys.stderr)
    return done


def checkpoint_identity(folder: str) -> str:
    """sha256 of a checkpoint's config.json and model.safetensors (checked whole first), recorded with each answer."""
    checkpoint.check_model_files(Path(folder))
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        h.update((Path(folder) / name).read_bytes())
    return "sha256:" + h.hexdigest()[:16]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Score a trained model on one of Table I's benchmarks, offline.")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--checkpoint", help="trained model folder (default: the newest finished one under runs/)")
    p.add_argument("--llm-weights", help="the base LLM's folder, if it has moved since training")
    p.add_argument("--data", help="LTU eval JSON (default: layout.EVAL_SETS; demo: demo_eval.json by the checkpoint)")
    p.add_argument("--labels", help="label CSV index,mid,display_name (demo: demo_labels.csv by demo_eval.json)")
    p.add_argument("--audio-root", help="folder holding the audio files that the eval JSON names")
    p.add_argument("--audio-prefix", action="append", default=[], metavar="OLD=NEW", help="rewrite an audio_id's start")
    p.add_argument("--esc50-root", help="ESC-50 in its own layout instead of --data (default: data/ESC-50-master)")
    p.add_argument("--limit", type=at_least(1), help="only the first N entries")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--skip-bad", action="store_true", help="leave out (and count) clips whose audio cannot be read")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the paper's sampling")
    p.add_argument("--max-new-tokens", type=at_least(1), default=sampling.MAX_NEW_TOKENS, help="default: LTU's 400")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda if available (in bf16), else cpu (fp32)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--whole-clips", action="store_true", help="hear long clips whole, not cut to 10.24 s as LTU")
    p.add_argument("--output", help="predictions JSONL, resumed if present (default: CHECKPOINT/eval_TASK.jsonl)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    p.add_argument("--text-encoder", help="BERT sentence-transformers folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--spice-jar", help="coco-caption's spice-1.0.jar (captioning; needs Java)")
    a = p.parse_args(argv)
    if a.esc50_root and a.task != "esc50":
        p.error("--esc50-root goes with --task esc50")
    if a.task != "demo":
        layout.evaluation_defaults(a)  # the default layout's model and data, or one message naming what is missing
    elif a.checkpoint:  # train.py --demo's output folder: the checkpoint's, or up to 2 folders above it
        here = Path(a.checkpoint).resolve()
        run_dir = next((d for d in (here, *here.parents[:2]) if (d / "demo_eval.json").is_file()), here)
        a.data = a.data or str(run_dir / "demo_eval.json")
        a.labels = a.labels or str(run_dir / "demo_labels.csv")
    if not (a.data or a.esc50_root):
        p.error("pass --data EVAL_JSON" + (" or --esc50-root DIR" if a.task == "esc50" else ""))
    if not (a.labels or a.esc50_root or TASKS[a.task].kind == "caption"):
        p.error(f"--task {a.task} needs --labels (a CSV index,mid,display_name)")
    if not (a.output or a.checkpoint):
        p.error("pass --output PREDICTIONS_JSONL (or --checkpoint)")
    return a


def main(argv: Sequence[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.esc50_root:
        clips, labels = load_esc50(a.esc50_root)
    else:
        clips = load_eval_json(a.data, a.audio_root, parse_prefixes(a.audio_prefix),
                               need_instruction=PROMPTS[a.task] is None)
        labels = read_labels(a.labels) if TASKS[a.task].kind != "caption" else None
    identity = checkpoint_identity(a.checkpoint) if a.checkpoint else None  # and its files checked whole
    output = a.output or os.path.join(a.checkpoint, f"eval_{a.task}.jsonl")
    torch.manual_seed(a.seed)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # kernels, CUDA graphs and streams on the chosen GPU
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        a.dtype or ("bf16" if device.type == "cuda" else None))
    settings = dict(greedy=a.greedy, crop=not a.whole_clips, max_new_tokens=a.max_new_tokens)  # else the paper's
    model = functools.cache(lambda: checkpoint.load_checkpoint(a.checkpoint, device=device, dtype=dtype,
                                                               llm_weights=a.llm_weights))  # only when needed
    answer_fn = (lambda paths, questions: model().answer(paths, questions, **settings)) if a.checkpoint else None
    metrics = evaluate(a.task, clips, answer_fn, output, labels=labels, batch_size=a.batch_size, limit=a.limit,
                       encoder=TextEncoder(a.text_encoder) if labels else None, spice_jar=a.spice_jar,
                       skip_bad=a.skip_bad, checkpoint_id=identity)
    print(table_row(metrics, Path(a.checkpoint).name if a.checkpoint else Path(output).stem))
    if a.json:
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")
