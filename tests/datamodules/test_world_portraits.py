"""The on-the-fly world portrait stream: contents, determinism, rank/worker/epoch splitting."""

import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.world_portraits import WorldPortraitDataModule, WorldPortraitStream
from emojidiff.world import Expression


def test_batch_contents():
    batch = WorldPortraitStream(batch_size=6, size=32, identity_range=(10, 20)).batch(123)
    assert batch["pixels"].shape == (6, 3, 32, 32) and batch["pixels"].dtype == torch.float32
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
    assert batch["masks"].shape == (6, 1, 32, 32) and set(batch["masks"].unique().tolist()) <= {0.0, 1.0}
    assert ((batch["identity_ids"] >= 10) & (batch["identity_ids"] < 20)).all()
    assert batch["expressions"].shape == (6, Expression.dim())
    assert all(p.startswith("a portrait, ") and p.split(", ")[1].endswith(" style") for p in batch["prompts"])
    styles = {"shaded": "realistic", "cel": "anime", "brush": "painting"}
    assert all(styles[s] in p for s, p in zip(batch["styles"], batch["prompts"], strict=True))


def test_batches_are_deterministic_per_seed():
    stream = WorldPortraitStream(batch_size=4, size=32)
    a, b, c = stream.batch(5), stream.batch(5), stream.batch(6)
    assert torch.equal(a["pixels"], b["pixels"]) and a["prompts"] == b["prompts"]
    assert not torch.equal(a["pixels"], c["pixels"])


def _keys(loader_or_stream) -> list[tuple]:
    return [
        tuple(b["identity_ids"].tolist()) + tuple(b["expressions"][:, 0].tolist()) for b in loader_or_stream
    ]


def test_ranks_epochs_and_workers_split_the_stream():
    rank0 = WorldPortraitStream(batch_size=4, size=32, steps=6, rank=0, world_size=2)
    rank1 = WorldPortraitStream(batch_size=4, size=32, steps=6, rank=1, world_size=2)
    epoch0, epoch1 = _keys(rank0), _keys(rank0)  # two passes = two epochs
    other_rank = _keys(rank1)
    assert len(set(epoch0)) == 6
    assert not set(epoch0) & set(epoch1) and not set(epoch0) & set(other_rank)
    resumed = WorldPortraitStream(batch_size=4, size=32, steps=6, rank=0, world_size=2, start_epoch=1)
    assert _keys(resumed) == epoch1  # a run resumed at epoch 1 continues, not replays
    workers = DataLoader(WorldPortraitStream(batch_size=4, size=32, steps=6), batch_size=None, num_workers=2)
    assert sorted(_keys(workers)) == sorted(_keys(WorldPortraitStream(batch_size=4, size=32, steps=6)))


def test_repeat_stream_is_the_same_every_pass():
    stream = WorldPortraitStream(batch_size=2, size=32, steps=2, repeat=True)
    assert _keys(stream) == _keys(stream)


def test_datamodule_validation_uses_held_out_identities():
    dm = WorldPortraitDataModule(
        batch_size=2, size=32, train_identities=(0, 50), val_identities=(1000, 1010), val_steps=2
    )
    val = list(dm.val_dataloader())
    assert len(val) == 2 and all(
        ((b["identity_ids"] >= 1000) & (b["identity_ids"] < 1010)).all() for b in val
    )
    assert _keys(dm.val_dataloader()) == _keys(val)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown styles"):
        WorldPortraitStream(styles=["oil"])
    with pytest.raises(ValueError, match="identity_range"):
        WorldPortraitStream(identity_range=(5, 5))
