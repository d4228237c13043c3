"""Honest few-label selection: the probe's setting chosen on N labels per class drawn from
validation (``few_val``) or by cross-validation on the labeled few (``cross_val``), never on more
validation labels; deterministic for a seed; recorded in the row, and an old suite's cells keep
their keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from ssl_kit import evaluation as P
from ssl_kit.bench.runner import Entry, cell_key
from ssl_kit.data.splits import few_label_split, stratified_folds
from ssl_kit.evaluation import FeatureSet

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, PER_CLASS = 4, 5
SETTINGS = dict(epochs=5, lrs=(0.01, 0.3), weight_decays=(0.0, 1e-2))


def blobs(n: int, seed: int) -> FeatureSet:
    """Class blobs in a shuffled order, every row distinct (so a row names its index)."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % CLASSES)[torch.randperm(n, generator=generator)]
    centers = torch.randn(CLASSES, 8, generator=torch.Generator().manual_seed(0))
    return FeatureSet(centers[labels] + 1.5 * torch.randn(n, 8, generator=generator), labels)


TRAIN, VAL, TEST = blobs(200, 1), blobs(120, 2), blobs(200, 3)


def rows_of(part: FeatureSet, whole: FeatureSet) -> np.ndarray:
    """The indices of ``whole`` whose rows ``part`` holds, in ``part``'s order."""
    matches = (part.features[:, None] == whole.features[None]).all(-1)
    assert matches.sum(1).eq(1).all()
    return matches.float().argmax(1).numpy()


@pytest.fixture
def validations(monkeypatch) -> list[FeatureSet]:
    """The validation sets ``few_label`` hands to the linear probe, which still runs."""
    seen: list[FeatureSet] = []
    probe = P.linear.linear_probe

    def spy(train, val, *args, **kwargs):
        seen.append(val)
        return probe(train, val, *args, **kwargs)

    monkeypatch.setattr("ssl_kit.evaluation.linear.linear_probe", spy)
    return seen


def same_result(first: P.ProbeResult, second: P.ProbeResult) -> bool:
    return (first.test_top1, first.val_top1, first.chosen, first.val_grid) == (second.test_top1, second.val_top1, second.chosen, second.val_grid)


def test_few_val_selection_reads_n_labels_per_class_of_validation_and_no_more(validations):
    result = P.few_label(TRAIN, VAL, TEST, CLASSES, labels_per_class=PER_CLASS, selection="few_val", seed=3, **SETTINGS)
    (seen,) = validations
    used = rows_of(seen, VAL)
    assert np.bincount(VAL.labels.numpy()[used], minlength=CLASSES).tolist() == [PER_CLASS] * CLASSES
    assert used.tolist() == few_label_split(VAL.labels.numpy(), PER_CLASS, None, 3)[0].tolist()
    assert result.chosen["selection"] == "few_val" and result.num_train == PER_CLASS * CLASSES
    unused = np.setdiff1d(np.arange(len(VAL)), used)
    scrambled = VAL.features.clone()
    scrambled[unused] = torch.randn(len(unused), 8, generator=torch.Generator().manual_seed(9))
    again = P.few_label(TRAIN, FeatureSet(scrambled, VAL.labels), TEST, CLASSES, labels_per_class=PER_CLASS, selection="few_val", seed=3, **SETTINGS)
    assert same_result(again, result)  # the rest of validation plays no part
    whole = P.few_label(TRAIN, VAL, TEST, CLASSES, labels_per_class=PER_CLASS, seed=3, **SETTINGS)
    assert len(validations[-1]) == len(VAL) and whole.chosen["selection"] == "val"  # the default: the whole split, as stores hold


def test_cross_validation_reads_no_validation_and_averages_the_held_out_folds(validations):
    result = P.few_label(TRAIN, VAL, TEST, CLASSES, labels_per_class=PER_CLASS, selection="cross_val", folds=5, seed=3, **SETTINGS)
    assert validations == [] and result.chosen["selection"] == "cross_val"
    garbage = FeatureSet(torch.zeros(8, 8), torch.zeros(8, dtype=torch.long))
    assert same_result(P.few_label(TRAIN, garbage, TEST, CLASSES, labels_per_class=PER_CLASS, selection="cross_val", folds=5, seed=3, **SETTINGS), result)

    few = TRAIN.subset(few_label_split(TRAIN.labels.numpy(), PER_CLASS, None, 3)[0])
    settings = [(lr, wd) for lr in SETTINGS["lrs"] for wd in SETTINGS["weight_decays"]]
    held_out_scores = []
    for held in stratified_folds(few.labels.numpy(), 5, 3):
        kept = np.setdiff1d(np.arange(len(few)), held)
        heads = P.train_linear_heads(few.subset(kept), CLASSES, settings, epochs=5, seed=3)
        with torch.no_grad():
            held_out_scores.append([P.top1(head(few.features[held]), few.labels[held]) for head in heads])
    expected = np.mean(held_out_scores, 0)
    assert [acc for *_, acc in result.val_grid] == pytest.approx(expected.tolist())
    best = settings[int(np.argmax(expected))]
    assert (result.chosen["lr"], result.chosen["weight_decay"]) == best and result.val_top1 == pytest.approx(expected.max())
    (head,) = P.train_linear_heads(few, CLASSES, [best], epochs=5, seed=3)
    with torch.no_grad():
        assert result.test_top1 == pytest.approx(P.top1(head(TEST.features), TEST.labels))


@pytest.mark.parametrize("selection", ["few_val", "cross_val"])
def test_selection_is_deterministic_for_a_seed(selection, validations):
    runs = [P.few_label(TRAIN, VAL, TEST, CLASSES, labels_per_class=PER_CLASS, selection=selection, seed=seed, **SETTINGS) for seed in (3, 3, 4)]
    assert same_result(runs[0], runs[1])
    if selection == "few_val":
        assert rows_of(validations[0], VAL).tolist() == rows_of(validations[1], VAL).tolist() != rows_of(validations[2], VAL).tolist()


def test_stratified_folds_partition_every_class_evenly():
    labels = np.repeat([0, 1, 2], [10, 7, 5])[np.random.default_rng(0).permutation(22)]
    folds = stratified_folds(labels, 5, seed=1)
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(22))
    assert all(np.array_equal(fold, np.sort(fold)) for fold in folds)
    for cls, size in ((0, 10), (1, 7), (2, 5)):
        counts = [int((labels[fold] == cls).sum()) for fold in folds]
        assert sum(counts) == size and max(counts) - min(counts) <= 1
    assert [f.tolist() for f in stratified_folds(labels, 5, seed=1)] == [f.tolist() for f in folds]
    assert [f.tolist() for f in stratified_folds(labels, 5, seed=2)] != [f.tolist() for f in folds]
    with pytest.raises(ValueError, match="class 2 has 5"):
        stratified_folds(labels, 6, seed=1)


def test_bad_selections_are_refused_with_their_setting():
    with pytest.raises(ValueError, match="selection must be"):
        P.few_label(TRAIN, VAL, TEST, CLASSES, labels_per_class=PER_CLASS, selection="test", **SETTINGS)
    with pytest.raises(ValueError, match="'few_val' draws as many labels per class from the validation split"):
        P.few_label(TRAIN, VAL.subset(range(12)), TEST, CLASSES, labels_per_class=PER_CLASS, selection="few_val", **SETTINGS)


def test_old_suites_keep_their_cell_keys_and_a_new_selection_gets_new_ones():
    entry = Entry(method="SimCLR", dataset="MNIST", config="configs/simclr_mnist.yaml")
    old = {"linear": {}, "few_label": {"labels_per_class": 10}}
    fields = {k: v for k, v in asdict(entry).items() if k in ("method", "dataset", "config", "args", "checkpoint", "protocols")}
    stored = hashlib.sha1(json.dumps({"suite": "s", "entry": fields, "seed": 0, "protocols": old}, sort_keys=True).encode()).hexdigest()[:16]
    assert cell_key("s", entry, 0, old) == stored  # the key a store written before these settings holds
    assert cell_key("s", entry, 0, {**old, "few_label": {"labels_per_class": 10, "selection": "val"}}) == stored
    keys = {cell_key("s", entry, 0, {**old, "few_label": {"labels_per_class": 10, "selection": selection}}) for selection in ("few_val", "cross_val")}
    assert len(keys) == 2 and stored not in keys
