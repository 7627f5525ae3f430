"""The metrics of Table I: accuracy, micro-F1 and mAP (classification), BLEU, CIDEr-D and SPICE (captioning).

In numpy (scikit-learn is only the tests' oracle); BLEU and CIDEr-D are coco-caption's definitions (pycocoevalcap)
without its Java tokenizer; SPICE runs coco-caption's own jar (it needs Java).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of entries whose predicted class index equals the true one. pred, target: (n,) ints."""
    return float(np.mean(np.asarray(pred) == np.asarray(target)))


def micro_f1(pred: np.ndarray, target: np.ndarray) -> float:
    """Micro-averaged F1 over all (entry, class) cells: 2TP / (2TP + FP + FN). pred, target: (n, C) in {0, 1}."""
    pred, target = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    denom = pred.sum() + target.sum()  # 2TP + FP + FN
    return float(2 * np.sum(pred & target) / denom) if denom else 0.0


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
    """Mean over classes of average_precision (a class without a positive counts as 0, as in LTU's stats.py over
    scikit-learn's per-class APs). scores: (n, C) floats; targets: (n, C) in {0, 1}."""
    per_class = zip(np.asarray(scores).T, np.asarray(targets).T, strict=True)  # (n,) scores and targets each
    return float(np.mean([average_precision(s, t) for s, t in per_class]))


def _ngrams(words: list[str], n: int) -> Counter:
    """Counts of the 1- to n-grams of a whitespace-tokenised caption (BLEU and CIDEr-D take such strings)."""
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
                dot = sum(min(w, vr[k].get(gram, 0.0)) * vr[k].get(gram, 0.0) for gram, w in vh[k].items())
                total[k] += dot / (nh[k] * nr[k] or 1.0) * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))  # 0 if empty
        scores.append(10.0 * total.mean() / len(grams))
    return float(np.mean(scores))


def spice(hyps: Sequence[str], refs: Sequence[Sequence[str]], jar: str | None, java: str = "java") -> list[float]:
    """Per-clip SPICE F-scores from coco-caption's spice-1.0.jar, run as coco-caption runs it. OSError (no jar, no
    Java) or RuntimeError (the jar failed): the caller reports SPICE as not computed."""
    if jar is None or not os.path.isfile(jar):
        raise FileNotFoundError(f"SPICE jar not found: {jar or 'pass --spice-jar'} (coco-caption's spice-1.0.jar)")
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp, "in.json"), Path(tmp, "out.json")
        inp.write_text(json.dumps([{"image_id": i, "test": h, "refs": r} for i, (h, r) in enumerate(zip(hyps, refs))]))
        cmd = [java, "-jar", "-Xmx8G", os.path.abspath(jar), inp, "-out", out, "-subset", "-silent"]
        run = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(jar)), capture_output=True, text=True)
        if run.returncode != 0 or not out.is_file():
            raise RuntimeError(f"SPICE failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
        results = {item["image_id"]: item["scores"]["All"]["f"] for item in json.loads(out.read_text())}
    return [float("nan") if results[i] is None else float(results[i]) for i in range(len(hyps))]
