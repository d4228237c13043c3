"""Seeded, deterministic, class-stratified index splits shared by every DataModule."""

from __future__ import annotations

import numpy as np

#: Seed of the test split carved out of folders without one (``--data.test_fraction``): a constant,
#: so the test set never moves with ``--data.seed``.
TEST_CARVE_SEED = 20261202


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices into (kept, held_out) with ``fraction`` of each class held out.

    The same labels and seed always give the same split; both parts are sorted. Multi-hot labels
    ``(N, C)`` (multi-label data) have no class strata, since a sample is in several classes: a
    seeded ``fraction`` of all samples is held out.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        held = np.sort(rng.permutation(len(labels))[: int(round(fraction * len(labels)))])
        return np.setdiff1d(np.arange(len(labels)), held), held
    held_out: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = int(round(fraction * len(members)))
        held_out.append(rng.permutation(members)[:count])
    held = np.sort(np.concatenate(held_out)) if held_out else np.array([], dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held)
    return kept, held


def subsample(count: int, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` indices out of ``count``, seeded, sorted (all of them when limit <= 0)."""
    if limit <= 0 or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).permutation(count)[:limit])


def few_label_split(
    labels: np.ndarray, labels_per_class: int | None = None, fraction: float | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced, seeded (labeled, unlabeled) index split for semi-supervised training.

    Exactly ``labels_per_class`` samples of every class are labeled, or ``round(fraction * n_c)``
    (at least 1) of each class of ``n_c`` samples; the rest is the unlabeled pool. The same labels
    and seed always give the same split; both parts are sorted and disjoint.
    """
    if (labels_per_class is None) == (fraction is None):
        raise ValueError("give exactly one of labels_per_class and label_fraction")
    if labels_per_class is not None and labels_per_class < 1:
        raise ValueError(f"labels_per_class must be >= 1, got {labels_per_class}")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise ValueError(f"label_fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    if labels.ndim == 2:
        raise ValueError("a few-label split draws labels per class: multi-hot labels (multi-label data) have no such split")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == cls)
        count = labels_per_class if labels_per_class is not None else max(1, int(round(fraction * len(members))))
        if count > len(members):
            raise ValueError(f"class {cls} has {len(members)} training samples, fewer than the {count} labels asked for")
        chosen.append(rng.permutation(members)[:count])
    labeled = np.sort(np.concatenate(chosen))
    return labeled, np.setdiff1d(np.arange(len(labels)), labeled)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The held-out indices of each of ``folds`` cross-validation folds: disjoint, sorted, covering
    every sample, each class spread over the folds as evenly as it divides (its members, shuffled
    by ``seed``, are dealt out in turn). The same labels and seed always give the same folds."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    if counts.min(initial=folds) < folds:
        raise ValueError(f"{folds}-fold cross-validation needs {folds} samples of every class; class {classes[counts.argmin()]} has {counts.min()}")
    rng = np.random.default_rng(seed)
    dealt = np.concatenate([rng.permutation(np.flatnonzero(labels == cls)) for cls in classes])
    fold_of = np.empty(len(labels), dtype=np.int64)
    fold_of[dealt] = np.arange(len(labels)) % folds
    return [np.flatnonzero(fold_of == fold) for fold in range(folds)]
