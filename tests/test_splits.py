import numpy as np
import pytest

from training.errors import TrainingError
from training.data.stratify import stratified_kfold, stratified_split

LABELS = np.repeat(np.arange(3), [30, 12, 7])


def test_stratified_split_is_disjoint_and_covers_everything():
    keep, held = stratified_split(LABELS, 0.2, seed=1)
    assert not set(keep) & set(held)
    assert sorted(np.concatenate([keep, held])) == list(range(len(LABELS)))


def test_stratified_split_holds_out_each_class_in_proportion():
    _, held = stratified_split(LABELS, 0.2, seed=1)
    assert np.bincount(LABELS[held]).tolist() == [6, 2, 1]


def test_stratified_split_is_reproducible_per_seed_and_differs_across_seeds():
    assert np.array_equal(stratified_split(LABELS, 0.2, 5)[1], stratified_split(LABELS, 0.2, 5)[1])
    assert not np.array_equal(stratified_split(LABELS, 0.2, 5)[1], stratified_split(LABELS, 0.2, 6)[1])


def test_kfold_test_folds_are_disjoint_and_cover_every_index_once():
    folds = stratified_kfold(LABELS, 5, seed=0)
    tests = np.concatenate([t for _, t in folds])
    assert sorted(tests) == list(range(len(LABELS)))
    for train, test in folds:
        assert not set(train) & set(test)
        assert len(train) + len(test) == len(LABELS)


def test_kfold_keeps_each_class_balanced_across_folds():
    for _, test in stratified_kfold(LABELS, 5, seed=0):
        counts = np.bincount(LABELS[test], minlength=3)
        assert counts[0] == 6 and counts[1] in (2, 3) and counts[2] in (1, 2)


def test_kfold_refuses_more_folds_than_the_smallest_class():
    with pytest.raises(TrainingError, match="smallest class has 7"):
        stratified_kfold(LABELS, 8, seed=0)
