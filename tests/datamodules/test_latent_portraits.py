"""Latent-space portrait dataset: posteriors computed once equal the VAE's, batches and errors."""

import numpy as np
import pytest
import torch

from datamodules.latent_portraits import (
    LatentPortraitDataModule,
    LatentPortraits,
    encode_portraits,
    vae_posterior,
)
from datamodules.world_portraits import WorldPortraitStream
from emojidiff.models.tiny import build_tiny_backbone


@pytest.fixture(scope="module")
def vae():
    return build_tiny_backbone("sd15").vae


def test_encoded_posteriors_are_the_vaes(vae):
    stream = WorldPortraitStream(batch_size=4, size=64)
    data = encode_portraits(vae_posterior(vae), stream, 6, seed=3)
    assert (
        len(data) == 6
        and data.latent_mean.shape == (6, 8, 16, 16)
        and data.latent_std.shape == (6, 8, 16, 16)
    )
    again = encode_portraits(vae_posterior(vae), stream, 6, seed=3)
    assert torch.equal(data.latent_mean, again.latent_mean) and data.prompts == again.prompts
    # the first 4 items are the first rendered batch, encoded as the VAE encodes it
    first = stream.batch(int(np.random.SeedSequence([3, 0]).generate_state(1)[0]))
    with torch.no_grad():
        dist = vae.encode(first["pixels"]).latent_dist
    torch.testing.assert_close(data.latent_mean[:4], dist.mean)
    torch.testing.assert_close(data.latent_std[:4], dist.std)
    assert data.prompts[:4] == first["prompts"] and data.styles[:4] == first["styles"]
    other = encode_portraits(vae_posterior(vae), stream, 6, seed=4)
    assert not torch.equal(data.latent_mean, other.latent_mean)


def test_datamodule_batches(vae):
    data = encode_portraits(vae_posterior(vae), WorldPortraitStream(batch_size=5, size=64), 10)
    module = LatentPortraitDataModule(data, data, batch_size=4)
    batches = list(module.train_dataloader())
    assert len(batches) == 2  # drop_last
    batch = batches[0]
    assert batch["latent_mean"].shape == (4, 8, 16, 16) and len(batch["prompts"]) == 4
    assert all(isinstance(p, str) for p in batch["prompts"])
    assert [len(b["prompts"]) for b in module.val_dataloader()] == [4, 4, 2]
    # the same seed gives the same order
    again = next(iter(LatentPortraitDataModule(data, batch_size=4).train_dataloader()))
    assert torch.equal(again["latent_mean"], batch["latent_mean"])


def test_mismatched_fields_are_named():
    mean = torch.zeros(3, 8, 4, 4)
    with pytest.raises(ValueError, match="prompts"):
        LatentPortraits(mean, mean.clone(), ["a"] * 2, torch.zeros(3), ["cel"] * 3)
    with pytest.raises(ValueError, match="latent_std shape"):
        LatentPortraits(mean, torch.zeros(3, 8, 2, 2), ["a"] * 3, torch.zeros(3), ["cel"] * 3)
    with pytest.raises(ValueError, match="count"):
        encode_portraits(lambda x: (x, x), WorldPortraitStream(batch_size=2, size=32), 0)


def test_world_latents_are_encoded_at_setup_by_the_vae_of_a_folder(tmp_path):
    from datamodules.latent_portraits import WorldLatentPortraitDataModule
    from emojidiff.models.tiny import save_backbone

    backbone = build_tiny_backbone("sd15", seed=2)
    save_backbone(backbone, tmp_path / "bb")
    module = WorldLatentPortraitDataModule(tmp_path / "bb", count=6, batch_size=2, render_batch=4, seed=5)
    module.setup("fit")
    # the training set: `count` portraits of the training stream seeded seed + 1, encoded by that VAE
    expected = encode_portraits(
        vae_posterior(backbone.vae), WorldPortraitStream(batch_size=4, size=64), 6, seed=6
    )
    torch.testing.assert_close(module.train_set.latent_mean, expected.latent_mean)
    assert module.train_set.prompts == expected.prompts and len(module.val_set) == 4
    assert module.encode_seconds is not None and len(list(module.train_dataloader())) == 3
    with pytest.raises(FileNotFoundError, match="data.init_args.vae_from"):
        WorldLatentPortraitDataModule(tmp_path / "nothing").setup("fit")
