"""emojidiff.splits: the one declaration of which identities and seeds train and which are held out."""

import pytest

from emojidiff import splits


def _overlap(a, b):
    return max(a[0], b[0]) < min(a[1], b[1])


def test_held_out_ranges_are_disjoint_from_training_ranges():
    train = [
        splits.TRAIN_IDENTITIES,
        splits.BASE_TRAIN_IDENTITIES,
        splits.ANALYSER_TRAIN_IDENTITIES,
        splits.IDI_SOURCE_IDENTITIES,
        splits.EVAL_ANALYSER_TRAIN_IDENTITIES,
    ]
    for r in train:
        assert not _overlap(r, splits.TEST_IDENTITIES) and not _overlap(r, splits.VAL_IDENTITIES)


def test_evaluation_analysers_train_apart_from_every_other_training_range():
    ev = splits.EVAL_ANALYSER_TRAIN_IDENTITIES
    assert splits.check_split("train", ev) == ev and ev[1] <= splits.TEST_IDENTITIES[0]
    for r in (splits.BASE_TRAIN_IDENTITIES, splits.ANALYSER_TRAIN_IDENTITIES, splits.IDI_SOURCE_IDENTITIES):
        assert not _overlap(r, ev), r
    assert not _overlap(splits.TEST_IDENTITIES, splits.VAL_IDENTITIES)
    assert not _overlap(splits.TRAIN_SEEDS, splits.TEST_SEEDS) and not _overlap(
        splits.TRAIN_SEEDS, splits.VAL_SEEDS
    )
    assert not _overlap(splits.TEST_SEEDS, splits.VAL_SEEDS)


def test_to_training_seed_moves_draws_out_of_the_held_out_window():
    for seed in (
        splits.TEST_SEEDS[0],
        splits.TEST_SEEDS[1] - 1,
        splits.VAL_SEEDS[0] + 5,
        splits.VAL_SEEDS[1] - 1,
    ):
        moved = splits.to_training_seed(seed)
        assert not splits.get_split("test").has_seed(moved) and not splits.get_split("val").has_seed(moved)
    assert splits.to_training_seed(12345) == 12345 and splits.to_training_seed(1 << 40) == 1 << 40


def test_check_split_names_the_split():
    lo = splits.TEST_IDENTITIES[0]
    assert splits.check_split("test", (lo, lo + 10)) == (lo, lo + 10)
    with pytest.raises(ValueError, match="train split"):
        splits.check_split("train", (lo - 1, lo + 1))
    with pytest.raises(ValueError, match="unknown split"):
        splits.get_split("holdout")
