"""The "adapter" alterer (an untrained E-Adapter on the packaged tiny backbone) and the "chain" alterer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_gen.alterers.adapter import AdapterAlterer
from data_gen.alterers.chain import Chain
from data_gen.base import ALTERERS, Targets
from data_gen.sources.folder import FolderSource
from emojidiff.errors import MissingWeightsError
from emojidiff.models.bundle import fresh_model
from emojidiff.world import Expression, Identity, render_batch
from emojidiff.world.params import stack_vectors

SIZE = 64
ADAPTER = {"num_id_tokens": 2, "num_expr_tokens": 4, "expr_layers": ["up_blocks.*"]}
EXPR = {"name": "tiny-conv", "init_args": {"feature_dim": 32, "width": 16}}
FAST = {"steps": 2, "guidance": 2.0, "size": 32}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model = fresh_model("emojidiff:tiny-sd15", "world-id", EXPR, ADAPTER, seed=1, default_prompt="a portrait")
    return model.save(tmp_path_factory.mktemp("model") / "untrained")


@pytest.fixture(scope="module")
def alterer(model_dir) -> AdapterAlterer:
    out = ALTERERS.build({"name": "adapter", "init_args": {"model": str(model_dir), **FAST, "batch_size": 3}})
    assert isinstance(out, AdapterAlterer)
    return out


def world_targets(persons: list[int], size: int = SIZE) -> Targets:
    """World renders: person p wearing expression sample k (k = row), with ground truth; the
    reference of each row is the same person in another expression."""
    ids = [Identity.sample(p) for p in persons]
    exprs = [Expression.sample(100 + k) for k in range(len(persons))]
    seeds = list(range(len(persons)))
    out = render_batch(ids, exprs, "shaded", size=size, seeds=seeds)
    refs = render_batch(ids, [Expression.preset("neutral")] * len(persons), "shaded", size=size, seeds=seeds)
    return Targets(
        indices=np.arange(10, 10 + len(persons), dtype=np.int64),
        images=out.images.numpy(),
        masks=out.masks.numpy().astype(np.float32),
        references=refs.images.numpy(),
        prompts=[f"a portrait of person {p}" for p in persons],
        persons=[str(p) for p in persons],
        meta=[{} for _ in persons],
        identity_params=stack_vectors(ids),
        expression_params=stack_vectors(exprs),
        styles=["shaded"] * len(persons),
        scene_seeds=seeds,
    )


# ------------------------------------------------------------------------------------ adapter


def test_adapter_templates_shapes_donors_and_world_truth(alterer):
    targets = world_targets([1, 1, 2, 3, 3])
    calls = []
    generate = alterer.generate

    def spy(templates, masks, id_embeds, prompts, seeds):  # records what the real generate gets
        calls.append((templates, masks, id_embeds, prompts, seeds))
        return generate(templates, masks, id_embeds, prompts, seeds)

    alterer.generate = spy
    try:
        out = alterer.alter(targets, np.random.default_rng(0))
    finally:
        del alterer.generate
    assert out.images.shape == (5, SIZE, SIZE, 3) and out.images.dtype == np.uint8 and out.ok.all()
    np.testing.assert_array_equal(out.masks, targets.masks)
    assert not (out.images == targets.images).all(axis=(1, 2, 3)).any()
    donors = [m["donor"] for m in out.meta]
    assert all(d != p for d, p in zip(donors, targets.persons, strict=True))
    assert all(m["alterer"] == "adapter" and isinstance(m["seed"], int) for m in out.meta)
    rows = [int(np.flatnonzero(targets.indices == m["donor_index"])[0]) for m in out.meta]
    assert [targets.persons[r] for r in rows] == donors
    np.testing.assert_array_equal(out.identity_params, targets.identity_params[rows])  # nominal: the donor's
    assert out.expression_params is None
    # batches of 3 and 2; the template is the target with its mask, the identity the donor's reference
    assert [len(c[4]) for c in calls] == [3, 2]
    np.testing.assert_array_equal(np.concatenate([c[0] for c in calls]), targets.images)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in calls]), targets.masks)
    assert sum((c[3] for c in calls), []) == targets.prompts
    # (the encoder resizes with torch here and with PIL in the alterer: close, not equal)
    encoder = alterer.model.pipeline.identity_encoder
    refs = encoder(torch.from_numpy(targets.references).permute(0, 3, 1, 2).float() / 255)
    similarity = torch.cat([c[2] for c in calls]) @ refs.T  # (rows, every reference)
    assert [targets.persons[j] for j in similarity.argmax(1).tolist()] == donors
    assert similarity.max(1).values.min() > 0.98


def test_adapter_is_deterministic_per_rng_seed(alterer):
    targets = world_targets([4, 5, 6])
    a = alterer.alter(targets, np.random.default_rng(11))
    b = alterer.alter(targets, np.random.default_rng(11))
    c = alterer.alter(targets, np.random.default_rng(12))
    np.testing.assert_array_equal(a.images, b.images)
    assert a.meta == b.meta and a.meta != c.meta
    assert not np.array_equal(a.images, c.images)


def test_adapter_real_targets_have_no_ground_truth(alterer):
    targets = world_targets([7, 8])
    targets.identity_params = targets.expression_params = None
    out = alterer.alter(targets, np.random.default_rng(0))
    assert out.identity_params is None and out.expression_params is None and out.ok.all()


def test_adapter_missing_model_folder_names_the_key(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"`model`.*emojidiff_model\.json") as info:
        AdapterAlterer(tmp_path / "no_model")
    assert info.value.key == "model"
    with pytest.raises(MissingWeightsError, match="`model` is not set"):
        ALTERERS.build({"name": "adapter", "init_args": {"model": None}})


# ------------------------------------------------------------------------------------ chain


def test_chain_feeds_each_step_the_previous_templates(model_dir):
    step = {"name": "adapter", "init_args": {"model": str(model_dir), **FAST}}
    chain = ALTERERS.build({"name": "chain", "init_args": {"alterers": [step, step]}})
    assert isinstance(chain, Chain) and len(chain.steps) == 2 and not chain.world_only
    assert chain.describe()["steps"][0]["name"] == "adapter"
    targets = world_targets([1, 2, 3])
    out = chain.alter(targets, np.random.default_rng(5))

    # the same draws by hand: step 1 on the targets, step 2 on step 1's templates
    first_step, second_step = chain.steps
    rng = np.random.default_rng(5)
    first = first_step.alter(targets, rng)
    again = targets.subset(range(3))
    again.images, again.masks = first.images, first.masks
    again.identity_params, again.expression_params = first.identity_params, None
    second = second_step.alter(again, rng)
    np.testing.assert_array_equal(out.images, second.images)
    np.testing.assert_array_equal(out.identity_params, second.identity_params)
    assert out.ok.all() and all(m["alterer"] == "chain" for m in out.meta)
    assert [m["steps"] for m in out.meta] == [[a, b] for a, b in zip(first.meta, second.meta, strict=True)]
    assert [m["donor"] for m in out.meta] == [m["donor"] for m in second.meta]
    assert all(m["donor"] != p for m, p in zip(out.meta, targets.persons, strict=True))


def test_chain_keeps_failed_rows_failed(model_dir, monkeypatch):
    step = {"name": "adapter", "init_args": {"model": str(model_dir), **FAST}}
    chain = Chain([step, step])
    first = chain.steps[0]
    original = first.alter

    def failing_first(targets, rng):  # the real first step, with row 1 marked as failed
        t = original(targets, rng)
        t.ok[1] = False
        t.meta[1]["alter_error"] = "no face found in the donor's reference"
        return t

    monkeypatch.setattr(first, "alter", failing_first)
    out = chain.alter(world_targets([1, 2, 3]), np.random.default_rng(0))
    assert out.ok.tolist() == [True, False, True]
    assert out.meta[1]["alter_error"] == "step 0 (adapter): no face found in the donor's reference"
    assert "alter_error" not in out.meta[0] and "alter_error" not in out.meta[1]["steps"][1]
    with pytest.raises(ValueError, match="at least one"):
        Chain([])


def test_chain_of_world_swap_then_adapter_passes_the_ground_truth(model_dir, tmp_path):
    chain = Chain(["world-swap", {"name": "adapter", "init_args": {"model": str(model_dir), **FAST}}])
    assert chain.world_only
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="world"):
        chain.setup(FolderSource(tmp_path))
    targets = world_targets([1, 2, 3])
    out = chain.alter(targets, np.random.default_rng(2))
    swap, generated = ([m["steps"][k] for m in out.meta] for k in (0, 1))
    assert [m["alterer"] for m in swap] == ["world-swap"] * 3 and [m["alterer"] for m in generated] == [
        "adapter"
    ] * 3
    # the adapter's nominal identity is its donor row's identity after the swap (step 1's ground truth)
    rng = np.random.default_rng(2)
    first = chain.steps[0].alter(targets, rng)
    rows = [int(np.flatnonzero(targets.indices == m["donor_index"])[0]) for m in generated]
    np.testing.assert_allclose(out.identity_params, first.identity_params[rows])
    assert out.expression_params is None and out.ok.all()
