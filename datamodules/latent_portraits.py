"""World portraits encoded once by a frozen VAE: a latent-space dataset for diffusion training.

Rendering and VAE-encoding a 64x64 batch costs about as much as the tiny UNet's training step
itself, so training the UNet on a stream of fresh renders spends half its time re-encoding. With
the VAE frozen, its posterior for an image never changes: `encode_portraits` computes it once
(mean and std per latent), and every training step draws a fresh posterior sample
`mean + std * noise` (what `latent_dist.sample()` would give), exactly as training on the stream
does, at the price of seeing each image more than once. `WorldLatentPortraitDataModule` is the UNet
stage of `make base` (`configs/base/unet.yaml`): it encodes its portraits at setup with the VAE of a
backbone folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from datamodules.world_portraits import WorldPortraitStream
from emojidiff.models.tiny import load_vae
from emojidiff.splits import BASE_TRAIN_IDENTITIES, VAL_IDENTITIES, identity_range

#: pixels (B, 3, H, W) in [-1, 1] -> (mean, std), each (B, C, h, w) unscaled VAE latents
PosteriorFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LatentPortraits(Dataset):
    """N encoded portraits. Items: {"latent_mean", "latent_std"} (C, h, w) float32, "prompts" str,
    "identity_ids" int, "styles" str (the default collate stacks tensors and lists strings)."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    prompts: list[str]
    identity_ids: torch.Tensor
    styles: list[str]

    def __post_init__(self) -> None:
        n = len(self.latent_mean)
        sizes = {
            "latent_std": len(self.latent_std),
            "prompts": len(self.prompts),
            "identity_ids": len(self.identity_ids),
            "styles": len(self.styles),
        }
        wrong = {k: v for k, v in sizes.items() if v != n}
        if wrong:
            raise ValueError(f"LatentPortraits fields must all hold {n} items (latent_mean), got {wrong}")
        if self.latent_std.shape != self.latent_mean.shape:
            raise ValueError(
                f"latent_std shape {tuple(self.latent_std.shape)} != latent_mean shape {tuple(self.latent_mean.shape)}"
            )

    def __len__(self) -> int:
        return len(self.latent_mean)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "latent_mean": self.latent_mean[index],
            "latent_std": self.latent_std[index],
            "prompts": self.prompts[index],
            "identity_ids": self.identity_ids[index],
            "styles": self.styles[index],
        }


@torch.no_grad()
def encode_portraits(
    posterior: PosteriorFn,
    stream: WorldPortraitStream,
    count: int,
    seed: int = 0,
    description: str = "encoding portraits",
) -> LatentPortraits:
    """Render `count` portraits from `stream` (batches of `stream.batch_size`, seeds derived from
    `seed`) and keep their VAE posteriors; deterministic in (`stream` settings, `seed`)."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    means, stds, prompts, ids, styles = [], [], [], [], []
    batches = -(-count // stream.batch_size)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=batches)
        for k in range(batches):
            batch = stream.batch(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
            mean, std = posterior(batch["pixels"])
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
            prompts += batch["prompts"]
            ids.append(batch["identity_ids"])
            styles += batch["styles"]
            progress.advance(task)
    return LatentPortraits(
        torch.cat(means)[:count],
        torch.cat(stds)[:count],
        prompts[:count],
        torch.cat(ids)[:count],
        styles[:count],
    )


def vae_posterior(vae: torch.nn.Module) -> PosteriorFn:
    """`encode_portraits`' posterior function for a diffusers AutoencoderKL (on the VAE's device)."""

    def posterior(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return dist.mean, dist.std

    return posterior


class LatentPortraitDataModule(L.LightningDataModule):
    """Shuffled batches of a training `LatentPortraits`, fixed-order batches of a validation one.

    Under DDP, Lightning's distributed sampler splits the training set over ranks.
    """

    def __init__(
        self,
        train: LatentPortraits,
        val: LatentPortraits | None = None,
        batch_size: int = 48,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )


class WorldLatentPortraitDataModule(LatentPortraitDataModule):
    """`count` world portraits of `train_identities` encoded once, at setup, by the frozen VAE of the
    backbone folder `vae_from` (`emojidiff.models.tiny.load_vae`), and `2 * batch_size` validation
    portraits of `val_identities`; then batches as `LatentPortraitDataModule`.

    Seeds, all derived from `seed`: the training portraits `seed + 1`, the validation ones
    `seed + 10_007`, the shuffling `seed`. The VAE encodes on the CPU, in batches of `render_batch`.
    `encode_seconds` holds the time the encoding took.
    """

    def __init__(
        self,
        vae_from: str | Path,
        count: int = 12288,
        batch_size: int = 24,
        size: int = 64,
        train_identities: tuple[int, int] = BASE_TRAIN_IDENTITIES,
        val_identities: tuple[int, int] = identity_range(VAL_IDENTITIES, 200),
        render_batch: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(train=None, val=None, batch_size=batch_size, num_workers=num_workers, seed=seed)  # type: ignore[arg-type]
        self.save_hyperparameters()
        self.encode_seconds: float | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return

        hp = self.hparams
        start = time.perf_counter()
        posterior = vae_posterior(load_vae(hp.vae_from, key="data.init_args.vae_from"))
        train = WorldPortraitStream(
            batch_size=hp.render_batch, size=hp.size, identity_range=hp.train_identities
        )
        val = WorldPortraitStream(batch_size=hp.batch_size, size=hp.size, identity_range=hp.val_identities)
        self.train_set = encode_portraits(posterior, train, hp.count, seed=hp.seed + 1)
        self.val_set = encode_portraits(
            posterior, val, 2 * hp.batch_size, seed=hp.seed + 10_007, description="validation set"
        )
        self.encode_seconds = time.perf_counter() - start
