"""Multi-label protocols: macro mAP against scikit-learn, the sigmoid probe against per-class
logistic regressions, the probe's choice and score in mAP, and multi-hot kNN votes by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.preprocessing import StandardScaler

from ssl_kit import evaluation as P
from ssl_kit.evaluation import FeatureSet

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 3


def tagged(n: int, seed: int, dim: int = 8) -> FeatureSet:
    """Gaussian features, shifted and scaled away from standard, with 3 overlapping tags: each the
    sign of a fixed direction plus noise, so a sample carries 0 to 3 of them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    directions = torch.randn(dim, CLASSES, generator=torch.Generator().manual_seed(0))
    labels = (x @ directions + 0.7 * torch.randn(n, CLASSES, generator=generator) > 0).long()
    return FeatureSet(2.0 + 3.0 * x, labels)


TRAIN, VAL, TEST = tagged(400, 1), tagged(200, 2), tagged(600, 3)


def test_mean_average_precision_equals_sklearn_macro_average_precision():
    rng = np.random.default_rng(0)
    for labels in (5, 12):
        targets = rng.random((40, labels)) < 0.3
        targets[0], targets[1] = True, False  # every class has a positive and a negative
        scores = rng.standard_normal((40, labels)).astype(np.float32)
        expected = average_precision_score(targets, scores, average="macro")
        assert P.mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets)) == pytest.approx(expected, abs=1e-6)
    # score() is top-1 on class indices and mAP on multi-hot labels
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert P.score(logits, torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)
    multi_hot = torch.tensor([[0, 1], [1, 0], [1, 1]])
    assert P.score(logits, multi_hot) == pytest.approx(average_precision_score(multi_hot.numpy(), logits.numpy(), average="macro"))


def test_sigmoid_heads_match_one_logistic_regression_per_class():
    """On multi-hot labels every class is an L2-regularised logistic regression of its own: sklearn's
    ``C * sum(BCE) + ||w||^2 / 2`` is ``mean(BCE) + wd ||w||^2 / 2`` with ``wd = 1 / (C N)``."""
    strength = 1.0
    scaler = StandardScaler().fit(TRAIN.features.numpy())
    (head,) = P.train_linear_heads(TRAIN, CLASSES, [(0.1, 1 / (strength * len(TRAIN)))], batch_size=64)
    with torch.no_grad():
        predicted = (head(TEST.features) > 0).numpy()
    weights = head[1].weight.detach().numpy()
    for c in range(CLASSES):
        reference = LogisticRegression(C=strength, max_iter=10_000, tol=1e-8).fit(scaler.transform(TRAIN.features.numpy()), TRAIN.labels[:, c].numpy())
        expected = reference.predict(scaler.transform(TEST.features.numpy()))
        assert (predicted[:, c] == expected).mean() >= 0.97, c
        assert np.abs(weights[c] - reference.coef_[0]).max() <= 0.1 * np.abs(reference.coef_).max(), c


def test_linear_probe_chooses_on_validation_map_and_reports_test_map():
    settings = dict(epochs=20, lrs=(0.001, 0.3), weight_decays=(0.0, 0.1))
    result = P.linear_probe(TRAIN, VAL, TEST, CLASSES, **settings)
    assert result.metric == "mAP" and TEST.metric == "mAP"
    assert result.val_top1 == max(value for _, _, value in result.val_grid) and len(result.val_grid) == 4
    # the chosen head, trained alone with the same seed, scores the reported test mAP (sklearn's macro AP)
    (head,) = P.train_linear_heads(TRAIN, CLASSES, [(result.chosen["lr"], result.chosen["weight_decay"])], epochs=20)
    with torch.no_grad():
        outputs = head(TEST.features).numpy()
    assert result.test_top1 == pytest.approx(average_precision_score(TEST.labels.numpy(), outputs, average="macro"), abs=1e-4)
    assert result.test_top1 > 0.8  # the tags are linear in the features
    shuffled = FeatureSet(TEST.features, TEST.labels[torch.randperm(len(TEST), generator=torch.Generator().manual_seed(0))])
    blind = P.linear_probe(TRAIN, VAL, shuffled, CLASSES, **settings)
    assert (blind.chosen, blind.val_grid) == (result.chosen, result.val_grid) and blind.test_top1 < 0.7


def test_knn_on_multi_hot_labels_sums_the_neighbours_weights_per_tag():
    # Query (1, 0); bank similarities 1.0, 0.8, 0.6, 0.0: with k = 3 the last is no neighbour.
    bank = torch.tensor([[2.0, 0.0], [4.0, 3.0], [3.0, 4.0], [0.0, 1.0]])
    tags = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0]])
    scores = P.knn_predict(torch.tensor([[1.0, 0.0]]), bank, tags, CLASSES, k=3, temperature=0.5)[0]
    weight = {s: math.exp(s / 0.5) for s in (1.0, 0.8, 0.6)}
    assert scores.tolist() == pytest.approx([weight[1.0] + weight[0.6], weight[0.8], weight[1.0] + weight[0.8]], rel=1e-5)
    result = P.knn(FeatureSet(bank, tags), FeatureSet(bank, tags), CLASSES, k=1)  # each its own nearest neighbour
    assert result == pytest.approx(1.0)
