"""The expression space of the synthetic world: what a face does, independent of who it is.

Left/right refer to the image: `eye_open_l` is the eye on the left of the picture. Mirroring a
portrait therefore swaps the `_l` and `_r` fields and negates `gaze_x`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .params import Param, ParamRecord

_EXPRESSION_SALT = 0xE4_9E


@dataclass(frozen=True)
class Expression(ParamRecord):
    """Ten expression parameters in their natural units (see `SPACE` for ranges)."""

    smile: float = 0.0
    mouth_open: float = 0.0
    jaw_drop: float = 0.0
    brow_raise_l: float = 0.0
    brow_raise_r: float = 0.0
    brow_furrow: float = 0.0
    eye_open_l: float = 0.6
    eye_open_r: float = 0.6
    gaze_x: float = 0.0
    gaze_y: float = 0.0

    SPACE: ClassVar[tuple[Param, ...]] = (
        Param("smile", -1.0, 1.0, 0.0, doc="-1 frown (corners down) to +1 smile (corners up)"),
        Param("mouth_open", 0.0, 1.0, 0.0, doc="lips parted"),
        Param("jaw_drop", 0.0, 1.0, 0.0, doc="chin and lower lip lowered"),
        Param("brow_raise_l", 0.0, 1.0, 0.0),
        Param("brow_raise_r", 0.0, 1.0, 0.0),
        Param(
            "brow_furrow",
            -1.0,
            1.0,
            0.0,
            doc="+1 inner brows down and in (anger), -1 inner brows up (sadness)",
        ),
        Param("eye_open_l", 0.0, 1.0, 0.6, doc="0 closed, 0.6 relaxed, 1 wide open"),
        Param("eye_open_r", 0.0, 1.0, 0.6),
        Param("gaze_x", -1.0, 1.0, 0.0, doc="-1 looking to the image's left, +1 to its right"),
        Param("gaze_y", -1.0, 1.0, 0.0, doc="-1 up, +1 down"),
    )

    @classmethod
    def preset(cls, name: str) -> Expression:
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise KeyError(f"unknown expression preset {name!r}; presets: {', '.join(PRESETS)}") from None

    @classmethod
    def sample(cls, seed: int) -> Expression:
        """A random expression: half the time a jittered preset, else independent draws with
        mostly symmetric eyes and brows (as faces mostly are)."""
        rng = np.random.default_rng([int(seed), _EXPRESSION_SALT])
        if rng.random() < 0.5:
            base = cls.preset(str(rng.choice(list(PRESETS)))).to_vector().astype(np.float64)
            base += rng.normal(0.0, 0.12, size=base.shape)
        else:
            base = rng.uniform(cls.lows(), cls.highs()).astype(np.float64)
            names = cls.names()
            for left, right in (("eye_open_l", "eye_open_r"), ("brow_raise_l", "brow_raise_r")):
                if rng.random() < 0.8:
                    i, j = names.index(left), names.index(right)
                    base[j] = base[i] + rng.normal(0.0, 0.05)
        return cls.from_vector(np.clip(base, cls.lows(), cls.highs()))


PRESETS: dict[str, dict[str, float]] = {
    "neutral": {},
    "happy": {
        "smile": 0.9,
        "mouth_open": 0.35,
        "eye_open_l": 0.45,
        "eye_open_r": 0.45,
        "brow_raise_l": 0.2,
        "brow_raise_r": 0.2,
    },
    "surprised": {
        "mouth_open": 0.7,
        "jaw_drop": 0.8,
        "brow_raise_l": 1.0,
        "brow_raise_r": 1.0,
        "eye_open_l": 1.0,
        "eye_open_r": 1.0,
    },
    "angry": {"smile": -0.5, "brow_furrow": 1.0, "eye_open_l": 0.75, "eye_open_r": 0.75},
    "sad": {"smile": -0.9, "brow_furrow": -0.9, "eye_open_l": 0.4, "eye_open_r": 0.4, "gaze_y": 0.5},
    "wink": {"smile": 0.6, "eye_open_l": 0.0, "eye_open_r": 0.7, "brow_raise_r": 0.3},
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def nearest_preset(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The emotion label of expressions: (B, 10) natural-unit parameters -> ((B,) int64 index into
    `PRESET_NAMES`, (B,) float32 intensity in [0, 1]).

    Each preset p spans the segment neutral + s (p - neutral), s in [0, 1]; the label is the preset
    whose segment passes nearest the expression (Euclidean, every parameter scaled to [0, 1]) and the
    intensity is that point's s (0 for "neutral"). What an emotion classifier with an intensity head
    reports: asymmetries, gaze and everything off the six segments are lost.
    """
    low = torch.as_tensor(Expression.lows(), dtype=torch.float32)
    span = torch.as_tensor(Expression.highs() - Expression.lows(), dtype=torch.float32)
    x = (params.float().cpu() - low) / span  # (B, 10)
    presets = (
        torch.as_tensor(np.stack([Expression.preset(n).to_vector() for n in PRESET_NAMES])) - low
    ) / span
    neutral = presets[PRESET_NAMES.index("neutral")]
    d = presets - neutral  # (P, 10)
    dd = (d * d).sum(-1)  # (P,)
    s = (((x - neutral) @ d.T) / dd.clamp_min(1e-12)).clamp(0.0, 1.0)  # (B, P)
    s = torch.where(dd > 0, s, torch.zeros_like(s))
    nearest = neutral + s[..., None] * d  # (B, P, 10)
    label = (x[:, None] - nearest).norm(dim=-1).argmin(-1)
    return label, s.gather(1, label[:, None]).squeeze(1)
