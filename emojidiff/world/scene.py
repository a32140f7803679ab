"""Per-image nuisance variation drawn from the render seed: pose jitter, background, clothes, light.

None of it depends on identity or expression, so two renders that share a seed differ only where
the identity or the expression puts them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_SCENE_SALT = 0x5CE9E

MAX_ROTATION_DEG = 7.0
MAX_SHIFT = 0.05  # in image half-widths
SCALE_RANGE = (0.94, 1.06)


@dataclass
class Scene:
    """Batched scene parameters; every tensor is (B, 1, 1) unless noted."""

    rotation: Tensor  # radians
    scale: Tensor
    shift_x: Tensor
    shift_y: Tensor
    background_a: Tensor  # (B,) palette index
    background_b: Tensor  # (B,) palette index
    background_angle: Tensor
    clothes: Tensor  # (B,) palette index
    light: Tensor  # (B, 3, 1, 1) unit vector, mostly frontal
    noise_seed: Tensor  # (B, 1, 1) int64

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> Scene:
        rows = []
        for seed in seeds:
            rng = np.random.default_rng([int(seed), _SCENE_SALT])
            light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.7, -0.1), 1.0])
            rows.append(
                (
                    np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)),
                    rng.uniform(*SCALE_RANGE),
                    rng.uniform(-MAX_SHIFT, MAX_SHIFT),
                    rng.uniform(-MAX_SHIFT, MAX_SHIFT),
                    rng.integers(1 << 16),
                    rng.integers(1 << 16),
                    rng.uniform(0, 2 * np.pi),
                    rng.integers(1 << 16),
                    *(light / np.linalg.norm(light)),
                    rng.integers(1 << 30),
                )
            )
        a = np.array(rows, dtype=np.float64)

        def col(i: int) -> Tensor:
            return torch.tensor(a[:, i], dtype=torch.float32).view(-1, 1, 1)

        return cls(
            rotation=col(0),
            scale=col(1),
            shift_x=col(2),
            shift_y=col(3),
            background_a=torch.tensor(a[:, 4], dtype=torch.int64),
            background_b=torch.tensor(a[:, 5], dtype=torch.int64),
            background_angle=col(6),
            clothes=torch.tensor(a[:, 7], dtype=torch.int64),
            light=torch.tensor(a[:, 8:11], dtype=torch.float32).view(-1, 3, 1, 1),
            noise_seed=torch.tensor(a[:, 11], dtype=torch.int64).view(-1, 1, 1),
        )
