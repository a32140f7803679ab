"""The analysers' world data: a reproducible labelled training stream, fixed held-out designs."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.world_faces import (
    HeldOutRenders,
    WorldFaceDataModule,
    WorldFaceStream,
    augment,
    expression_vectors,
    identity_vectors,
    render_images,
)
from emojidiff.splits import VAL_IDENTITIES, VAL_SEEDS
from emojidiff.world import STYLES, Expression


def test_stream_batches_are_labelled_seeded_and_in_range() -> None:
    stream = WorldFaceStream(
        identities=(500_000, 500_006), batch_size=6, size=32, steps=2, seed=3, augment=False
    )
    batch = stream.batch(7)
    assert batch["images"].shape == (6, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert 0.0 <= float(batch["images"].min()) and float(batch["images"].max()) <= 1.0
    assert batch["labels"].dtype == torch.int64 and set(batch["labels"].tolist()) <= set(range(6))
    assert stream.num_classes == 6
    lows, highs = Expression.lows(), Expression.highs()
    e = batch["expressions"].numpy()
    assert e.shape == (6, 10) and (e >= lows - 1e-6).all() and (e <= highs + 1e-6).all()
    torch.testing.assert_close(stream.batch(7)["images"], batch["images"])  # deterministic in the seed
    label = int(batch["labels"][0])  # a label is the identity minus the range start
    assert (identity_vectors([500_000 + label]) == stream._id_cache[label]).all()
    epochs = [next(iter(stream))["images"] for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])  # each pass draws new batches


def test_augment_keeps_shape_range_and_degrades_the_requested_fraction() -> None:
    images = render_images(
        identity_vectors(range(8)), expression_vectors(range(8)), [STYLES[0]] * 8, range(8), 64
    )
    out = augment(images, torch.Generator().manual_seed(0), degrade=1.0)
    assert out.shape == images.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    # every image softened: less high-frequency energy than the (photometrically noised) original
    lap = lambda x: (x[..., 1:, :] - x[..., :-1, :]).abs().mean()  # noqa: E731
    assert lap(out) < lap(images)
    light = augment(images, torch.Generator().manual_seed(0), degrade=0.0)
    assert (light - images).abs().mean() < 0.05


def test_held_out_renders_follow_the_design_in_chunks() -> None:
    renders = HeldOutRenders(
        n_ids=5, renders=6, id_offset=VAL_IDENTITIES[0], seed_offset=VAL_SEEDS[0], size=32, batch=12
    )
    assert len(renders) == 3
    items = [renders[k] for k in range(len(renders))]
    ids = torch.cat([i["identities"] for i in items])
    assert ids.tolist() == np.repeat(VAL_IDENTITIES[0] + np.arange(5), 6).tolist()
    assert torch.cat([i["styles"] for i in items]).tolist() == [k % len(STYLES) for k in range(6)] * 5
    assert items[-1]["images"].shape == (6, 3, 32, 32) and items[0]["iris_pixels"].dtype == torch.int64
    first = expression_vectors([VAL_SEEDS[0]])[0]
    np.testing.assert_allclose(items[0]["expressions"][0].numpy(), first, rtol=1e-6)


def test_datamodule_validation_batches_hold_whole_identities() -> None:
    data = WorldFaceDataModule(
        identities=(0, 10),
        batch_size=4,
        size=32,
        steps=2,
        val_identities=6,
        val_renders=3,
        val_ids_per_batch=2,
    )
    batches = list(data.val_dataloader())
    assert len(batches) == 3
    for b in batches:
        assert b["images"].shape[0] == 6 and torch.bincount(
            b["identities"] - b["identities"].min()
        ).tolist() == [3, 3]
    train = next(iter(data.train_dataloader()))
    assert train["images"].shape == (4, 3, 32, 32) and data.num_classes == 10
