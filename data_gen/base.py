"""The IDI job's building blocks: what a source yields, what an alterer returns, and their registries.

A *source* turns target indices into `Targets` (target images of identity A with expression e,
their references, masks, prompts and metadata); an *alterer* turns `Targets` into candidate
`Templates` (e on someone other than A); filters score the candidates; the writer stores the
accepted ones as triplets (`emojidiff.triplet`). Images here are numpy uint8 (B, S, S, 3) RGB,
masks float32 (B, S, S) in [0, 1] (1 = face).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from emojidiff.registry import Registry


@dataclass
class Targets:
    """B targets, in the order of `indices`.

    indices: (B,) int64 global target indices (the sample key's index).
    images: (B, S, S, 3) uint8 targets; masks: (B, S, S) float32 face masks of the targets.
    references: (B, S, S, 3) uint8 identity references (another image of A, or the target).
    identity_embeddings: (B, D) float32 or None: A's embedding from the reference, when the
        source computes it (the job fills it otherwise).
    prompts: B captions. persons: B identity labels (world identity id, or the person folder),
        so an alterer can pick a donor who is someone else.
    meta: B dicts merged into the sample's json (ids, seeds, style, paths, ground truth).
    identity_params / expression_params: (B, 18) / (B, 10) float32 ground truth in the world, else None.
    reference_expression_params: (B, 10) float32 ground-truth expression of the references (world).
    styles / scene_seeds: B world styles and render seeds (world only), so a world alterer can
        re-render the same scene.
    skipped: (index, name, reason) of requested targets the source could not produce (an
        unreadable file, no face); they are logged and counted, never silently dropped.
    landmarks5: (B, 5, 2) float32 ArcFace 5 points (eyes, nose tip, mouth corners; in
        `emojidiff.face.insightface_backend.ARCFACE_TEMPLATE_112` order) in target-image pixels,
        when the source detected them (real-photo sources), else None.
    """

    indices: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    references: np.ndarray
    prompts: list[str]
    persons: list[str]
    meta: list[dict[str, Any]]
    identity_embeddings: np.ndarray | None = None
    identity_params: np.ndarray | None = None
    expression_params: np.ndarray | None = None
    styles: list[str] | None = None
    scene_seeds: list[int] | None = None
    reference_expression_params: np.ndarray | None = None
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    landmarks5: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, rows: Sequence[int] | np.ndarray) -> Targets:
        """The targets at `rows` (positions, not indices); `skipped` is not carried over."""
        rows = np.asarray(rows, dtype=np.int64)

        def take(name: str, value: Any) -> Any:
            if name == "skipped" or value is None:
                return [] if name == "skipped" else None
            return value[rows] if isinstance(value, np.ndarray) else [value[i] for i in rows]

        return Targets(**{f.name: take(f.name, getattr(self, f.name)) for f in fields(self)})


@dataclass
class Templates:
    """B candidate templates, one per target, in the targets' order.

    images: (B, S, S, 3) uint8; masks: (B, S, S) float32 face masks of the templates.
    ok: (B,) bool, False where the alterer could not make a template (no face to swap; the reason
        is in meta[i]["alter_error"]); such rows are rejected with that reason.
    meta: B dicts (alterer name, donor, seeds, ...), stored under the sample json's "template".
    identity_params / expression_params: (B, 18) / (B, 10) ground truth of what the template
        shows, in the world; None for real data.
    """

    images: np.ndarray
    masks: np.ndarray
    ok: np.ndarray
    meta: list[dict[str, Any]]
    identity_params: np.ndarray | None = None
    expression_params: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)


class Source(abc.ABC):
    """A deterministic, indexable supply of targets: `load(indices)` gives the same `Targets` for
    the same indices in any process, batch or order (what makes a killed job resumable)."""

    #: True for the embedded world (ground truth available, world-only alterers allowed).
    world: bool = False
    #: Side of the square images it yields.
    size: int

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of target indices (some may turn out unusable and be skipped)."""

    @abc.abstractmethod
    def load(self, indices: Sequence[int]) -> Targets:
        """The targets at `indices` (skipping, and reporting in `Targets.skipped`, unusable ones)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able description for the run record."""
        return {"class": type(self).__name__, "targets": len(self)}


class Alterer(abc.ABC):
    """Turns targets into candidate templates: the same expression on another identity.

    `rng` is the batch's generator (seeded by the job from seed, round, block, batch and attempt),
    so a rerun of the same batch gives the same templates.
    """

    name: str = "abstract"
    #: True when it needs the world's ground truth (world-swap, world-resynth).
    world_only: bool = False

    def setup(self, source: Source) -> None:
        """Called once by the job before the first batch: checks the alterer fits the source
        (a world-only alterer on a folder is an error) and lets it read the source's split."""
        if self.world_only and not source.world:
            raise ValueError(
                f"alterer {self.name!r} needs the embedded world's ground truth; the source is {type(source).__name__}"
            )

    @abc.abstractmethod
    def alter(self, targets: Targets, rng: np.random.Generator) -> Templates:
        """One candidate template per target."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


SOURCES: Registry[Source] = Registry("IDI source")
ALTERERS: Registry[Alterer] = Registry("IDI alterer")


def donor_rows(persons: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """For each row, the row of another person in the batch (uniform among them).

    (B,) int64. Raises ValueError when the batch holds a single person, so no donor exists.
    """
    persons = [str(p) for p in persons]
    b = len(persons)
    if b == 0:
        return np.zeros(0, dtype=np.int64)
    _, person = np.unique(persons, return_inverse=True)
    counts = np.bincount(person)
    own = counts[person]
    if (own == b).any():
        raise ValueError(
            f"batch of {b} targets holds only person {persons[0]!r}: no donor of another identity"
        )
    order = np.argsort(person, kind="stable")  # rows grouped by person, each person's rows contiguous
    starts = (np.cumsum(counts) - counts)[person]
    r = rng.integers(0, b - own)  # the r-th row among the other persons' rows
    return order[np.where(r < starts, r, r + own)].astype(np.int64)
