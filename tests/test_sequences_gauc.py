"""GAUC against a per-user sklearn computation and a hand-computed example."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from embtables.experiments.metrics_gauc import gauc


def test_gauc_hand_example():
    # user 1: 4 rows, pairs (pos, neg): p=.9 vs .1 win, .9 vs .5 win, .4 vs .1 win, .4 vs .5 lose -> 3/4
    # user 2: 2 rows, one tie -> 1/2;  user 3: only positives -> skipped
    users = [1, 1, 1, 1, 2, 2, 3, 3]
    labels = [1, 1, 0, 0, 1, 0, 1, 1]
    preds = [0.9, 0.4, 0.1, 0.5, 0.3, 0.3, 0.2, 0.8]
    assert gauc(users, labels, preds) == pytest.approx((4 * 0.75 + 2 * 0.5) / 6)
    assert gauc(users, labels, preds, weight="uniform") == pytest.approx((0.75 + 0.5) / 2)


def test_gauc_matches_sklearn_per_user():
    rng = np.random.default_rng(0)
    n = 1500
    users = rng.integers(0, 60, n)
    labels = (rng.random(n) < 0.3).astype(int)
    preds = np.round(rng.random(n) + 0.3 * labels, 2)  # rounded: many ties
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if labels[m].min() == labels[m].max():
            continue
        num += m.sum() * roc_auc_score(labels[m], preds[m])
        den += m.sum()
    assert gauc(users, labels, preds) == pytest.approx(num / den, rel=1e-12)


def test_gauc_none_without_two_classes():
    assert gauc([1, 1, 2], [1, 1, 0], [0.2, 0.3, 0.4]) is None
    assert gauc([], [], []) is None
