"""World portraits rendered on the fly: an endless, seeded, rank- and worker-split stream.

Each element is a whole batch (rendering is batched), so the DataLoader runs with
`batch_size=None`. Every (rank, worker, step) triple draws its own seed, so ranks and workers never
repeat each other and a run is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from emojidiff.images import to_signed, to_tensor
from emojidiff.splits import BASE_TRAIN_IDENTITIES, VAL_IDENTITIES, identity_range, to_training_seed
from emojidiff.world import PARTS, STYLES, Expression, Identity, render_batch
from emojidiff.world.prompts import sample_prompt

_FEATURE_LABELS = torch.tensor(
    [PARTS[p] for p in ("eye", "iris", "brow", "nose", "lips", "mouth_interior")], dtype=torch.uint8
)


class WorldPortraitStream(IterableDataset):
    """Yields dicts of a batch of portraits.

    Keys: "pixels" (B, 3, H, W) float in [-1, 1]; "masks" (B, 1, H, W) float {0, 1} face masks;
    "feature_masks" (B, 1, H, W) float {0, 1}: eyes, brows, nose and mouth (where expression shows);
    "prompts" list[str]; "identity_ids" (B,) int64; "expressions" (B, 10) float32 (natural units);
    "styles" list[str].

    identity_range: identities are drawn uniformly from [start, stop); hold out another range for
    evaluation. steps: batches per epoch for this rank (split over its workers). start_epoch: the
    epoch of the first pass; each further pass over the stream (a new epoch) draws new batches,
    so a resumed run created at epoch k continues the stream instead of replaying it; with
    `repeat`, every pass yields the same batches (validation).
    """

    def __init__(
        self,
        batch_size: int = 32,
        size: int = 64,
        identity_range: tuple[int, int] = BASE_TRAIN_IDENTITIES,
        styles: Sequence[str] = STYLES,
        steps: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        hair_prompt_probability: float = 0.5,
        start_epoch: int = 0,
        repeat: bool = False,
    ):
        super().__init__()
        unknown = [s for s in styles if s not in STYLES]
        if unknown:
            raise ValueError(f"unknown styles {unknown}; styles: {', '.join(STYLES)}")
        if identity_range[1] <= identity_range[0]:
            raise ValueError(f"identity_range must be (start, stop) with start < stop, got {identity_range}")
        self.batch_size, self.size = batch_size, size
        self.identity_range, self.styles = tuple(identity_range), list(styles)
        self.steps, self.seed = steps, seed
        self.rank, self.world_size = rank, world_size
        self.hair_prompt_probability = hair_prompt_probability
        self.epoch, self.repeat = start_epoch, repeat

    def __len__(self) -> int:
        return self.steps

    def batch(self, step_seed: int) -> dict[str, Any]:
        """The batch for one seed: deterministic in `step_seed` alone."""
        rng = np.random.default_rng(step_seed)
        ids = rng.integers(*self.identity_range, size=self.batch_size)
        identities = [Identity.sample(int(i)) for i in ids]
        expressions = [
            Expression.sample(to_training_seed(int(s))) for s in rng.integers(1 << 62, size=self.batch_size)
        ]
        styles = [self.styles[int(k)] for k in rng.integers(len(self.styles), size=self.batch_size)]
        seeds = [to_training_seed(int(s)) for s in rng.integers(1 << 62, size=self.batch_size)]
        out = render_batch(identities, expressions, styles, self.size, seeds, return_parts=True)
        pixels = to_signed(to_tensor(out.images))
        return {
            "pixels": pixels,
            "masks": out.masks.unsqueeze(1).float(),
            "feature_masks": torch.isin(out.parts, _FEATURE_LABELS).unsqueeze(1).float(),
            "prompts": [
                sample_prompt(s, i, rng, self.hair_prompt_probability)
                for s, i in zip(styles, identities, strict=True)
            ],
            "identity_ids": torch.from_numpy(ids.astype(np.int64)),
            "expressions": torch.from_numpy(np.stack([e.to_vector() for e in expressions])),
            "styles": styles,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        self.epoch += (
            0 if self.repeat else 1
        )  # per process: the main one, or each persistent worker's own copy
        for step in range(worker, self.steps, workers):
            yield self.batch(
                int(np.random.SeedSequence([self.seed, epoch, self.rank, step]).generate_state(1)[0])
            )


class WorldPortraitDataModule(L.LightningDataModule):
    """Train stream over `train_identities`, a fixed validation stream over held-out identities."""

    def __init__(
        self,
        batch_size: int = 32,
        size: int = 64,
        train_identities: tuple[int, int] = BASE_TRAIN_IDENTITIES,
        val_identities: tuple[int, int] = identity_range(VAL_IDENTITIES, 200),
        styles: Sequence[str] = STYLES,
        steps_per_epoch: int = 500,
        val_steps: int = 4,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()

    def _loader(self, identities: tuple[int, int], steps: int, seed: int, repeat: bool = False) -> DataLoader:
        hp = self.hparams
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        epoch = 0 if repeat or self.trainer is None else self.trainer.current_epoch
        stream = WorldPortraitStream(
            hp.batch_size,
            hp.size,
            identities,
            hp.styles,
            steps,
            seed,
            rank,
            world,
            start_epoch=epoch,
            repeat=repeat,
        )
        return DataLoader(
            stream, batch_size=None, num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_identities, self.hparams.steps_per_epoch, self.hparams.seed)

    def val_dataloader(self) -> DataLoader:
        # a fixed seed, so every validation pass sees the same held-out batches
        return self._loader(
            self.hparams.val_identities, self.hparams.val_steps, self.hparams.seed + 10_007, repeat=True
        )
