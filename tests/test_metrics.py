"""metrics.py: the metrics of Table I against hand-worked cases, scikit-learn (accuracy, micro-F1, AP/mAP),
Papineni et al.'s BLEU formula written out, and coco-caption's CIDEr-D by hand; SPICE's jar I/O with a stand-in."""
import math
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

import metrics


def test_accuracy_and_micro_f1_vs_sklearn():
    assert metrics.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    # TP = 2, FP = 1, FN = 2 -> 4 / 7
    assert metrics.micro_f1([[1, 0, 1], [0, 1, 0]], [[1, 0, 0], [1, 1, 1]]) == pytest.approx(4 / 7)
    rng = np.random.default_rng(0)
    p, t = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert metrics.accuracy(p, t) == pytest.approx(accuracy_score(t, p))
    P, T = rng.integers(0, 2, (50, 7)), rng.integers(0, 2, (50, 7))
    assert metrics.micro_f1(P, T) == pytest.approx(f1_score(T, P, average="micro"))
    assert metrics.micro_f1(np.eye(5)[p], np.eye(5)[t]) == pytest.approx(accuracy_score(t, p))  # one label each


def test_average_precision_by_hand_and_vs_sklearn():
    # ranks 1 and 3 are positives: P@1 = 1, P@3 = 2/3, each adds recall 1/2
    assert metrics.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a tie between two positives and a negative is one threshold: P = 2/3 at recall 1
    assert metrics.average_precision([0.5, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(2 / 3)
    assert metrics.average_precision([0.3, 0.2], [0, 0]) == 0.0
    rng = np.random.default_rng(1)
    scores = np.round(rng.random((60, 6)), 1)  # many ties
    targets = (rng.random((60, 6)) < 0.3).astype(int)
    targets[:, 4] = 0  # a class without positives counts as AP 0, as in sklearn's macro average
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expect = average_precision_score(targets, scores, average="macro")
        per_class = average_precision_score(targets, scores, average=None)
    assert per_class[4] == 0
    assert metrics.mean_average_precision(scores, targets) == pytest.approx(expect)
    assert metrics.mean_average_precision(np.r_[[[0.9, 0.1]], [[0.2, 0.8]]], [[1, 0], [0, 0]]) == pytest.approx(0.5)


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
    assert metrics.bleu(["the cat sat on the mat"], refs)[3] == pytest.approx(1.0)  # closest ref has 6 words
    # 'the cat is on a mat': 1-grams 5/6 (one 'the' unmatched... both refs have 'the'), see counts below
    hyp = "the cat is on a mat"
    # unigrams: all 6 occur in a reference; bigrams: 'the cat', 'cat is', 'is on' of 5; trigrams: 'cat is on' of 4;
    # no 4-gram of 3 -> BLEU-4 ~ 0 (coco-caption's 1e-15 guard); closest reference length 6 -> no brevity penalty
    b = metrics.bleu([hyp], refs)
    assert b[0] == pytest.approx(1.0) and b[1] == pytest.approx(math.sqrt(3 / 5))
    assert b[2] == pytest.approx((3 / 5 * 1 / 4) ** (1 / 3)) and b[3] < 1e-3
    # brevity penalty: 3 words against a closest reference of 6 -> exp(1 - 6/3)
    short = metrics.bleu(["the cat sat"], [["the cat sat on the mat"]])
    assert short[0] == pytest.approx(math.exp(-1))
    rng = np.random.default_rng(2)
    vocab = "a the dog cat barks sits on mat loudly outside".split()
    refs = [[" ".join(rng.choice(vocab[:6], rng.integers(6, 10))) for _ in range(3)] for _ in range(8)]
    hyps = [" ".join(r[0].split()[:-1]) for r in refs]  # shares n-grams of every order with a reference
    assert metrics.bleu(hyps, refs)[3] == pytest.approx(bleu_reference(hyps, refs), rel=1e-9)


def test_cider_d_by_hand():
    # two clips, one reference each, perfect answers: weights log 2 everywhere; cosine 1 for n = 1, 2 and nothing
    # for n = 3, 4 -> mean over n = 0.5, x10 = 5
    assert metrics.cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    # 'a a b' against 'a b': n=1 clipped dot 2 L^2 / (L sqrt5 * L sqrt2), n=2 L^2 / (L sqrt2 * L), bigram lengths
    # differ by 1 -> penalty exp(-1 / 72)
    first = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4
    assert metrics.cider_d(["a a b", "c d"], [["a b"], ["c d"]]) == pytest.approx((first + 5) / 2)
    # two references: the mean of the per-reference similarities; idf comes from the evaluated set only
    second = 10 * (1 + 1 + 0 + 0) / 4 / 2  # second reference 'e f' shares nothing with 'c d'
    assert metrics.cider_d(["a b", "c d"], [["a b"], ["c d", "e f"]]) == pytest.approx((5 + second) / 2)
    # document frequency counts clips, not references: 'a' is in both references of clip 1 but has df 1, weight
    # log 2. Clip 1: n=1 cosines 1 and 1/2, n=2 cosines 1 and 0 -> 10 (1.5 + 1) / 4 / 2; clip 2 ('d'): 10 / 4
    assert metrics.cider_d(["a b", "d"], [["a b", "a c"], ["d"]]) == pytest.approx((3.125 + 2.5) / 2)


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
    got = metrics.spice(["a dog", "one two three"], [["x"], ["y", "z"]], str(jar), java=str(java))
    assert got == pytest.approx([1.2, 2.3])
    with pytest.raises(FileNotFoundError, match="SPICE jar"):
        metrics.spice(["a"], [["b"]], str(tmp_path / "none.jar"))
    with pytest.raises(FileNotFoundError, match="pass --spice-jar"):
        metrics.spice(["a"], [["b"]], None)
