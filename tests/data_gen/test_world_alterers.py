"""World source and world alterers: determinism, references, what a swap keeps, what resynth reads."""

from __future__ import annotations

import numpy as np
import pytest

import data_gen.alterers  # noqa: F401
import data_gen.sources  # noqa: F401
from data_gen.alterers.world import INNER_FACE, KEPT_BY_SWAP, SelfPair, WorldResynth, WorldSwap
from data_gen.base import ALTERERS, donor_rows
from data_gen.filters import identity_distance
from data_gen.sources.world import WorldSource
from emojidiff.splits import TEST_SEEDS, TRAIN_SEEDS
from emojidiff.world import Identity, render_batch


@pytest.fixture(scope="module")
def source() -> WorldSource:
    return WorldSource(split="train", num_targets=24, images_per_identity=4, size=64, seed=5)


@pytest.fixture(scope="module")
def targets(source):
    return source.load(range(12))


def test_world_source_is_deterministic_in_any_batch_order(source, targets):
    again = source.load([7, 3, 11])
    np.testing.assert_array_equal(again.images, targets.images[[7, 3, 11]])
    np.testing.assert_array_equal(again.references, targets.references[[7, 3, 11]])
    assert again.prompts == [targets.prompts[i] for i in (7, 3, 11)]


def test_references_are_other_images_of_the_same_person(source, targets):
    for i in range(12):
        j = source.reference_of(i)
        assert j != i and source.identity_of(j) == source.identity_of(i)
        np.testing.assert_array_equal(targets.references[i], targets.images[j])
    assert targets.persons[0] == targets.persons[3] != targets.persons[4]


def test_test_split_draws_seeds_from_the_test_range():
    src = WorldSource(split="test", num_targets=8, images_per_identity=4)
    for i in range(8):
        d = src.draw(i)
        assert (
            TEST_SEEDS[0] <= d["expression_seed"] < TEST_SEEDS[1]
            and TEST_SEEDS[0] <= d["scene_seed"] < TEST_SEEDS[1]
        )
    with pytest.raises(ValueError, match="not inside the train split"):
        WorldSource(split="train", identities=(999_990, 1_000_010))


def test_world_swap_keeps_outline_and_hair_and_swaps_the_inner_face(targets):
    swap = WorldSwap(keep_fraction=(0.0, 0.0))
    rng = np.random.default_rng(0)
    out = swap.alter(targets, rng)
    donors = donor_rows(targets.persons, np.random.default_rng(0))
    names = Identity.names()
    kept = [names.index(n) for n in KEPT_BY_SWAP]
    inner = [names.index(n) for n in INNER_FACE]
    np.testing.assert_allclose(out.identity_params[:, kept], targets.identity_params[:, kept])
    np.testing.assert_allclose(out.identity_params[:, inner], targets.identity_params[donors][:, inner])
    np.testing.assert_array_equal(out.expression_params, targets.expression_params)
    again = render_batch(
        out.identity_params, targets.expression_params, targets.styles, 64, targets.scene_seeds
    )
    np.testing.assert_array_equal(out.images, again.images.numpy())
    assert all(m["donor"] != p for m, p in zip(out.meta, targets.persons, strict=True))


def test_world_swap_blends_back_the_configured_fraction(targets):
    full = WorldSwap(keep_fraction=(1.0, 1.0)).alter(targets, np.random.default_rng(1))
    np.testing.assert_allclose(full.identity_params, targets.identity_params, atol=1e-6)
    half = WorldSwap(keep_fraction=(0.5, 0.5)).alter(targets, np.random.default_rng(1))
    d_half = identity_distance(half.identity_params, targets.identity_params)
    d_none = identity_distance(
        WorldSwap((0.0, 0.0)).alter(targets, np.random.default_rng(1)).identity_params,
        targets.identity_params,
    )
    assert (d_half < d_none).all() and (d_none > 0).all()


def test_world_resynth_renders_the_analysed_expression_on_someone_else(source, targets):
    resynth = WorldResynth()
    resynth.setup(source)
    out = resynth.alter(targets, np.random.default_rng(2))
    read = resynth.read_expressions(targets.images)
    np.testing.assert_allclose(out.expression_params, read)
    assert not np.allclose(
        out.expression_params, targets.expression_params
    )  # analyser error, not ground truth
    assert (np.abs(read - targets.expression_params).mean(axis=1) < 0.3).all()
    assert (identity_distance(out.identity_params, targets.identity_params) > 0.3).all()
    for m in out.meta:
        assert TRAIN_SEEDS[0] <= m["scene_seed"] < TRAIN_SEEDS[1]


def test_self_pair_is_the_masked_target(targets):
    out = SelfPair().alter(targets, np.random.default_rng(0))
    outside = targets.masks < 0.5
    assert (out.images[outside] <= 1).all()
    inside = targets.masks > 0.999
    np.testing.assert_array_equal(out.images[inside], targets.images[inside])


def test_world_alterers_refuse_a_real_photo_source():
    class Folder:
        world = False

    with pytest.raises(ValueError, match="ground truth"):
        ALTERERS.build("world-swap").setup(Folder())


def test_identity_distance_scale():
    a = np.stack([Identity.sample(i).to_vector() for i in range(400)])
    b = np.stack([Identity.sample(i + 400).to_vector() for i in range(400)])
    assert identity_distance(a, a).max() == 0.0
    assert 0.85 < identity_distance(a, b).mean() < 1.15
