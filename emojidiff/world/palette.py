"""Colour ramps that map continuous identity parameters in [0, 1] to RGB."""

from __future__ import annotations

import torch
from torch import Tensor

SKIN = (
    (255, 226, 200),
    (241, 194, 160),
    (224, 172, 130),
    (198, 134, 96),
    (160, 100, 66),
    (112, 70, 46),
    (78, 50, 36),
)
HAIR = (
    (22, 18, 18),
    (62, 40, 28),
    (112, 72, 42),
    (150, 62, 32),
    (204, 112, 52),
    (226, 190, 118),
    (238, 228, 204),
    (150, 150, 156),
)
IRIS = ((92, 56, 30), (132, 96, 46), (72, 122, 62), (62, 112, 172), (112, 126, 142))
CLOTHES = (
    (40, 60, 110),
    (120, 36, 40),
    (40, 100, 70),
    (60, 60, 66),
    (170, 150, 110),
    (110, 70, 140),
    (210, 210, 214),
)
BACKGROUND = (
    (200, 210, 225),
    (225, 215, 190),
    (190, 220, 200),
    (230, 200, 205),
    (205, 200, 230),
    (170, 185, 200),
    (235, 235, 230),
)


def ramp(colours: tuple[tuple[int, int, int], ...], t: Tensor) -> Tensor:
    """Piecewise-linear interpolation along `colours` at t in [0, 1]: (B,) -> (B, 3, 1, 1) in [0, 1]."""
    table = torch.tensor(colours, dtype=torch.float32) / 255.0
    pos = t.clamp(0.0, 1.0) * (len(colours) - 1)
    lo = pos.floor().long().clamp(max=len(colours) - 2)
    frac = (pos - lo.float()).unsqueeze(-1)
    rgb = table[lo] * (1.0 - frac) + table[lo + 1] * frac
    return rgb.view(-1, 3, 1, 1)


def pick(colours: tuple[tuple[int, int, int], ...], index: Tensor) -> Tensor:
    """Colour `index % len(colours)` of a palette: (B,) int -> (B, 3, 1, 1) in [0, 1]."""
    table = torch.tensor(colours, dtype=torch.float32) / 255.0
    return table[index.long() % len(colours)].view(-1, 3, 1, 1)
