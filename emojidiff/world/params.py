"""Typed parameter spaces for the synthetic world: ranges, validation, vectors, sampling.

`Identity` and `Expression` are frozen dataclasses whose fields are described by a `ParamSpace`.
A space knows each field's range (continuous) or number of choices (categorical), so it can
validate values with an error that names the field, turn an instance into a float32 vector (the
ground truth later stages measure against) and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

P = TypeVar("P", bound="ParamRecord")


@dataclass(frozen=True)
class Param:
    """One parameter: continuous in [low, high] or categorical with `choices` labels."""

    name: str
    low: float = 0.0
    high: float = 1.0
    default: float = 0.5
    choices: tuple[str, ...] = ()
    doc: str = ""

    @property
    def categorical(self) -> bool:
        return bool(self.choices)

    def check(self, owner: str, value: Any) -> float | int:
        if self.categorical:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{owner}.{self.name} must be an int choice index, got {value!r}")
            if not 0 <= int(value) < len(self.choices):
                raise ValueError(
                    f"{owner}.{self.name}={value} is not a valid choice; expected 0..{len(self.choices) - 1} "
                    f"({', '.join(self.choices)})"
                )
            return int(value)
        value = float(value)
        if not np.isfinite(value) or not self.low <= value <= self.high:
            raise ValueError(f"{owner}.{self.name}={value} outside [{self.low}, {self.high}]")
        return value


class ParamRecord:
    """Mixin for frozen dataclasses whose fields are all `Param`s of `SPACE`."""

    SPACE: tuple[Param, ...] = ()

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for p in self.SPACE:
            object.__setattr__(self, p.name, p.check(owner, getattr(self, p.name)))

    @classmethod
    def names(cls) -> list[str]:
        return [p.name for p in cls.SPACE]

    @classmethod
    def dim(cls) -> int:
        return len(cls.SPACE)

    @classmethod
    def param(cls, name: str) -> Param:
        for p in cls.SPACE:
            if p.name == name:
                return p
        raise KeyError(f"{cls.__name__} has no parameter {name!r}; parameters: {', '.join(cls.names())}")

    @classmethod
    def lows(cls) -> np.ndarray:
        return np.array([0.0 if p.categorical else p.low for p in cls.SPACE], dtype=np.float32)

    @classmethod
    def highs(cls) -> np.ndarray:
        return np.array(
            [len(p.choices) - 1 if p.categorical else p.high for p in cls.SPACE], dtype=np.float32
        )

    def to_vector(self) -> np.ndarray:
        """(D,) float32 in the parameters' own units (categorical fields as their index)."""
        return np.array([float(getattr(self, p.name)) for p in self.SPACE], dtype=np.float32)

    @classmethod
    def from_vector(cls: type[P], vector: Sequence[float] | np.ndarray) -> P:
        vector = np.asarray(vector, dtype=np.float64).reshape(-1)
        if vector.shape[0] != len(cls.SPACE):
            raise ValueError(
                f"{cls.__name__}.from_vector needs {len(cls.SPACE)} values, got {vector.shape[0]}"
            )
        kwargs = {}
        for p, v in zip(cls.SPACE, vector, strict=True):
            kwargs[p.name] = int(round(v)) if p.categorical else float(v)
        return cls(**kwargs)

    def replace(self: P, **changes: Any) -> P:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, float | int]:
        return {p.name: getattr(self, p.name) for p in self.SPACE}

    def __iter__(self) -> Iterator[tuple[str, float | int]]:
        return iter(self.as_dict().items())


def stack_vectors(records: Sequence[ParamRecord]) -> np.ndarray:
    """(B, D) float32 from a sequence of records of one type."""
    if not records:
        raise ValueError("stack_vectors needs at least one record")
    return np.stack([r.to_vector() for r in records])
