"""AUROC / AUPRC against brute-force definitions, ties included."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from anogan_batch.evaluation.evaluate import auroc, average_precision, metrics, roc_curve


def brute_auroc(scores, positive):
    pairs = list(itertools.product(scores[positive], scores[~positive]))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def brute_ap(scores, positive):
    # precision at each positive, averaged, with tied scores entering together
    total = 0.0
    for t in sorted(set(scores[positive]), reverse=True):
        sel = scores >= t
        prec = positive[sel].mean()
        total += prec * (positive & (scores == t)).sum()
    return total / positive.sum()


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 8, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    assert auroc(scores, positive) == pytest.approx(brute_auroc(scores, positive))


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_definition(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 8, 50).astype(float)
    positive = rng.random(50) < 0.3
    assert average_precision(scores, positive) == pytest.approx(brute_ap(scores, positive))


def test_perfect_and_inverted():
    s = np.array([0.1, 0.2, 0.8, 0.9])
    y = np.array([False, False, True, True])
    assert auroc(s, y) == 1.0 and average_precision(s, y) == 1.0
    assert auroc(-s, y) == 0.0
    fpr, tpr = roc_curve(s, y)
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1


def test_metrics_skips_unlabelled_rows():
    m = metrics(np.array([1.0, 2.0, 3.0, 9.0]), ["n", None, "n", "a"], "n")
    assert m == {"auroc": 1.0, "auprc": 1.0, "n_normal": 2, "n_anomalous": 1}
