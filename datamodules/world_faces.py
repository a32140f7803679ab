"""World faces for the analysers: a seeded training stream of labelled renders, fixed held-out designs.

- `WorldFaceStream`: every step renders a fresh batch (identities drawn from an identity range,
  labels = identity - range start; random training expressions, styles and scene seeds), with
  light photometric noise and, on a fraction of the images, the softening a latent-diffusion
  decoder applies (`augment`), so the analysers read generated images as they read renders.
- `HeldOutRenders`: a fixed design (each of `n_ids` identities rendered `renders` times, styles
  cycled, unique expression and scene seeds from a held-out window) rendered chunk by chunk.
- `WorldFaceDataModule`: the training stream and a held-out validation design whose batches hold
  whole identities (so verification pairs can be scored within a batch).

Each dataset element is a whole batch (rendering is batched): loaders run with `batch_size=None`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from emojidiff.degradations import down_up, gaussian_blur
from emojidiff.images import to_tensor
from emojidiff.splits import ANALYSER_TRAIN_IDENTITIES, TRAIN_SEEDS, VAL_IDENTITIES, VAL_SEEDS
from emojidiff.world import PARTS, STYLES, Expression, Identity, render_batch
from emojidiff.world.landmarks import landmarks68

__all__ = [
    "HeldOutRenders",
    "WorldFaceDataModule",
    "WorldFaceStream",
    "augment",
    "expression_vectors",
    "held_out_design",
    "identity_vectors",
    "render_images",
]


def render_images(
    id_vectors: np.ndarray, expr_vectors: np.ndarray, styles: Sequence[str], seeds: Sequence[int], size: int
) -> Tensor:
    """Render and convert: (B, 18), (B, 10) parameter vectors -> (B, 3, size, size) float32 in [0, 1]."""
    out = render_batch(id_vectors, expr_vectors, list(styles), size=size, seeds=[int(s) for s in seeds])
    return to_tensor(out.images)


def expression_vectors(seeds: Sequence[int]) -> np.ndarray:
    """(B, 10) natural-unit vectors of Expression.sample(seed) for each seed (float64)."""
    return np.stack([Expression.sample(int(s)).to_vector() for s in seeds])


def identity_vectors(ids: Sequence[int]) -> np.ndarray:
    """(B, 18) vectors of Identity.sample(i) for each id (float64)."""
    return np.stack([Identity.sample(int(i)).to_vector() for i in ids])


def augment(images: Tensor, gen: torch.Generator, degrade: float = 0.0) -> Tensor:
    """Light photometric noise so the analysers tolerate generated (slightly soft, noisy,
    off-tone) images without losing the pixel-level cues of gaze: per-image gain (+-5%) and
    offset (+-2.5%), a 3x3 binomial blur on a tenth, Gaussian noise up to sigma 0.01.
    (B, 3, H, W) in [0, 1] -> same shape, clamped to [0, 1].

    `degrade`: the fraction of images that are first softened the way a latent-diffusion decoder
    softens them: half of those by a Gaussian blur of sigma U(0.3, 1.3) px, half by losing
    resolution (down to 1/U(1.3, 2.5) of the side and back up, `emojidiff.degradations`)."""
    b = images.shape[0]
    if degrade > 0:
        chosen = torch.rand(b, generator=gen) < degrade
        blur = chosen & (torch.rand(b, generator=gen) < 0.5)
        sigmas = 0.3 + torch.rand(b, generator=gen)
        factors = 1.3 + 1.2 * torch.rand(b, generator=gen)
        images = images.clone()
        if bool(blur.any()):
            images[blur] = gaussian_blur(images[blur], sigmas[blur])
        for k in torch.nonzero(chosen & ~blur).flatten().tolist():
            images[k : k + 1] = down_up(images[k : k + 1], float(factors[k]))
    gain = 1.0 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.1
    offset = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.05
    images = (images - 0.5) * gain + 0.5 + offset
    blur = torch.rand(b, generator=gen) < 0.1
    if bool(blur.any()):
        k1 = torch.tensor([0.25, 0.5, 0.25])
        kernel = (k1[:, None] * k1[None, :]).expand(3, 1, 3, 3).contiguous()
        images[blur] = F.conv2d(F.pad(images[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.01
    images = images + torch.randn(images.shape, generator=gen) * sigma
    return images.clamp(0.0, 1.0)


class WorldFaceStream(IterableDataset):
    """Training batches for the analysers, each rendered fresh, so no image is seen twice.

    Yields dicts: "images" (B, 3, size, size) float32 in [0, 1] (augmented when `augment`),
    "labels" (B,) int64 in [0, stop - start) (the identity minus the range start: a class index),
    "expressions" (B, 10) float32 in natural units, "landmarks" (B, 68, 2) float32 pixels (the renderer's,
    `emojidiff.world.landmarks`; `augment` moves no pixel, so they hold for the augmented images too).

    identities: [start, stop) the identities drawn (uniformly); expressions and scene seeds are
    drawn from `TRAIN_SEEDS`. steps: batches per epoch for this rank (split over its workers);
    every (seed, epoch, rank, step) draws its own batch, so ranks and workers never repeat each
    other and a run is reproducible from its seed. degrade: see `augment`.
    """

    def __init__(
        self,
        identities: tuple[int, int] = ANALYSER_TRAIN_IDENTITIES,
        batch_size: int = 64,
        size: int = 64,
        styles: Sequence[str] = STYLES,
        steps: int = 1000,
        seed: int = 0,
        augment: bool = True,
        degrade: float = 0.5,
        rank: int = 0,
        start_epoch: int = 0,
    ):
        super().__init__()
        unknown = [s for s in styles if s not in STYLES]
        if unknown:
            raise ValueError(f"unknown styles {unknown}; styles: {', '.join(STYLES)}")
        if identities[1] <= identities[0]:
            raise ValueError(f"identities must be (start, stop) with start < stop, got {identities}")
        self.identities, self.batch_size, self.size = (
            (int(identities[0]), int(identities[1])),
            batch_size,
            size,
        )
        self.styles, self.steps, self.seed = list(styles), steps, seed
        self.augment, self.degrade = augment, degrade
        self.rank, self.epoch = rank, start_epoch
        self._id_cache: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return self.identities[1] - self.identities[0]

    def __len__(self) -> int:
        return self.steps

    def batch(self, step_seed: int) -> dict[str, Tensor]:
        """The batch for one seed: deterministic in `step_seed` alone."""
        if self._id_cache is None:
            self._id_cache = identity_vectors(range(*self.identities))
        rng = np.random.default_rng(step_seed)
        b = self.batch_size
        labels = rng.integers(0, self.num_classes, b)
        exprs = expression_vectors(rng.integers(*TRAIN_SEEDS, size=b))
        styles = [self.styles[int(k)] for k in rng.integers(0, len(self.styles), b)]
        seeds = rng.integers(*TRAIN_SEEDS, size=b)
        images = render_images(self._id_cache[labels], exprs, styles, seeds, self.size)
        if self.augment:
            images = augment(images, torch.Generator().manual_seed(int(rng.integers(1 << 62))), self.degrade)
        return {
            "images": images,
            "labels": torch.from_numpy(labels).long(),
            "expressions": torch.from_numpy(exprs).float(),
            "landmarks": landmarks68(
                self._id_cache[labels], exprs, styles, self.size, [int(s) for s in seeds]
            ),
        }

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        self.epoch += 1  # per process: the main one, or each persistent worker's own copy
        for step in range(worker, self.steps, workers):
            yield self.batch(
                int(np.random.SeedSequence([self.seed, epoch, self.rank, step]).generate_state(1)[0])
            )


def held_out_design(
    n_ids: int, renders: int, id_offset: int, seed_offset: int, n_styles: int = len(STYLES)
) -> dict[str, np.ndarray]:
    """A fixed evaluation design: identities id_offset .. id_offset + n_ids - 1, each rendered
    `renders` times in a row, style indices cycled evenly, expression and scene seeds unique
    (seed_offset + 2k, seed_offset + 2k + 1). Arrays of length n_ids * renders:
    "ids", "style", "expr_seed", "scene_seed"."""
    ids = np.repeat(np.arange(n_ids) + id_offset, renders)
    style_idx = np.tile(np.arange(renders) % n_styles, n_ids)
    k = np.arange(n_ids * renders)
    return {
        "ids": ids,
        "style": style_idx,
        "expr_seed": seed_offset + 2 * k,
        "scene_seed": seed_offset + 2 * k + 1,
    }


class HeldOutRenders(Dataset):
    """A `held_out_design` rendered in chunks of `batch` renders (item k = chunk k).

    Each item: "images" (B, 3, size, size) float32 in [0, 1], "identities" (B,) int64,
    "styles" (B,) int64 indices into `styles`, "expressions" (B, 10) float32 natural units,
    "iris_pixels" (B,) int64 visible iris pixels (gaze is unobservable without them),
    "landmarks" (B, 68, 2) float32 pixels (the renderer's).
    """

    def __init__(
        self,
        n_ids: int,
        renders: int,
        id_offset: int,
        seed_offset: int,
        styles: Sequence[str] = STYLES,
        size: int = 64,
        batch: int = 256,
    ):
        super().__init__()
        self.styles, self.size, self.batch = list(styles), size, batch
        self.n_ids, self.renders, self.id_offset, self.seed_offset = n_ids, renders, id_offset, seed_offset
        self.design = held_out_design(n_ids, renders, id_offset, seed_offset, len(self.styles))

    def __len__(self) -> int:
        return -(-self.design["ids"].size // self.batch)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        sl = slice(index * self.batch, (index + 1) * self.batch)
        d = {k: v[sl] for k, v in self.design.items()}
        exprs, ids = expression_vectors(d["expr_seed"]), identity_vectors(d["ids"])
        styles, seeds = [self.styles[i] for i in d["style"]], [int(v) for v in d["scene_seed"]]
        out = render_batch(ids, exprs, styles, size=self.size, seeds=seeds, return_parts=True)
        assert out.parts is not None
        return {
            "images": to_tensor(out.images),
            "identities": torch.from_numpy(d["ids"]).long(),
            "styles": torch.from_numpy(d["style"]).long(),
            "expressions": torch.from_numpy(exprs).float(),
            "iris_pixels": (out.parts == PARTS["iris"]).flatten(1).sum(1).long(),
            "landmarks": landmarks68(ids, exprs, styles, self.size, seeds),
        }


class WorldFaceDataModule(L.LightningDataModule):
    """The analysers' training stream over `identities` and a fixed validation design.

    Validation: `val_identities` identities from `VAL_IDENTITIES[0]` + `val_id_offset`, each
    rendered `val_renders` times with seeds from `VAL_SEEDS`, in batches of `val_ids_per_batch`
    whole identities (so same-person and impostor pairs can be scored within a batch).
    """

    def __init__(
        self,
        identities: tuple[int, int] = ANALYSER_TRAIN_IDENTITIES,
        batch_size: int = 64,
        size: int = 64,
        styles: Sequence[str] = STYLES,
        steps: int = 3600,
        augment: bool = True,
        degrade: float = 0.5,
        seed: int = 0,
        val_identities: int = 32,
        val_renders: int = 4,
        val_ids_per_batch: int = 16,
        val_id_offset: int = 500_000,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return self.hparams.identities[1] - self.hparams.identities[0]

    def train_stream(self) -> WorldFaceStream:
        hp = self.hparams
        rank = self.trainer.global_rank if self.trainer is not None else 0
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return WorldFaceStream(
            hp.identities,
            hp.batch_size,
            hp.size,
            hp.styles,
            hp.steps,
            hp.seed,
            hp.augment,
            hp.degrade,
            rank=rank,
            start_epoch=epoch,
        )

    def val_renders(self) -> HeldOutRenders:
        hp = self.hparams
        return HeldOutRenders(
            hp.val_identities,
            hp.val_renders,
            VAL_IDENTITIES[0] + hp.val_id_offset,
            VAL_SEEDS[0],
            hp.styles,
            hp.size,
            batch=hp.val_ids_per_batch * hp.val_renders,
        )

    def train_dataloader(self) -> DataLoader:
        n = self.hparams.num_workers
        return DataLoader(self.train_stream(), batch_size=None, num_workers=n, persistent_workers=n > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_renders(), batch_size=None, shuffle=False)
