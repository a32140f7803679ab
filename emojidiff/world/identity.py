"""The identity space of the synthetic world: who a portrait shows, independent of expression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .params import Param, ParamRecord

HAIR_STYLES: tuple[str, ...] = ("buzz", "short", "spiky", "bob", "long", "bun")

# Salt so identity draws never coincide with expression or scene draws of the same integer.
_IDENTITY_SALT = 0x1D_E7


@dataclass(frozen=True)
class Identity(ParamRecord):
    """One person. Continuous fields are in [0, 1] (0 = small/narrow/light, 1 = large/wide/dark);
    `hair_style` indexes `HAIR_STYLES`."""

    face_width: float = 0.5
    face_length: float = 0.5
    jaw_width: float = 0.5
    chin_length: float = 0.5
    skin_tone: float = 0.3
    eye_size: float = 0.5
    eye_spacing: float = 0.5
    iris_colour: float = 0.2
    brow_thickness: float = 0.5
    brow_arch: float = 0.5
    nose_length: float = 0.5
    nose_width: float = 0.5
    mouth_width: float = 0.5
    lip_thickness: float = 0.5
    ear_size: float = 0.5
    hair_colour: float = 0.2
    hair_volume: float = 0.5
    hair_style: int = 1

    SPACE: ClassVar[tuple[Param, ...]] = (
        Param("face_width", doc="half-width of the face"),
        Param("face_length", doc="forehead-to-chin length"),
        Param("jaw_width", doc="0 tapered oval jaw, 1 square jaw"),
        Param("chin_length", doc="length of the chin below the mouth"),
        Param("skin_tone", default=0.3, doc="0 lightest to 1 darkest along a skin-tone ramp"),
        Param("eye_size"),
        Param("eye_spacing"),
        Param("iris_colour", default=0.2, doc="brown, hazel, green, blue, grey along [0, 1]"),
        Param("brow_thickness"),
        Param("brow_arch"),
        Param("nose_length"),
        Param("nose_width"),
        Param("mouth_width"),
        Param("lip_thickness"),
        Param("ear_size"),
        Param("hair_colour", default=0.2, doc="black, browns, auburn, ginger, blond, platinum, grey"),
        Param("hair_volume"),
        Param("hair_style", default=1, choices=HAIR_STYLES),
    )

    @classmethod
    def sample(cls, identity_id: int) -> Identity:
        """The identity with integer id `identity_id`: the same id always gives the same person."""
        if isinstance(identity_id, bool) or not isinstance(identity_id, (int, np.integer)) or identity_id < 0:
            raise ValueError(f"identity_id must be a non-negative int, got {identity_id!r}")
        rng = np.random.default_rng([int(identity_id), _IDENTITY_SALT])
        values: dict[str, float | int] = {}
        for p in cls.SPACE:
            values[p.name] = (
                int(rng.integers(len(p.choices))) if p.categorical else float(rng.uniform(p.low, p.high))
            )
        return cls(**values)
