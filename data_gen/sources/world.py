"""The embedded world as an IDI source: rendered targets whose identity and expression are known.

Target `i` is identity `identities[0] + i // images_per_identity` wearing an expression drawn
from the split's seed range, in a random style and scene, all seeded by (seed, i): the same index
gives the same target in any process, batch or order. The `images_per_identity` targets of one
identity are each other's references (target i's reference is the next image of the same
person: another expression, scene and style), so references cost no extra render when a batch
holds whole identities (the job's blocks do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from data_gen.base import SOURCES, Source, Targets
from emojidiff.splits import IDI_SOURCE_IDENTITIES, TEST_IDENTITIES, VAL_IDENTITIES, check_split, get_split
from emojidiff.world import STYLES, Expression, Identity, render_batch
from emojidiff.world.params import stack_vectors
from emojidiff.world.prompts import sample_prompt

_TARGET_SALT = 0x7A26E7
#: Renders per render_batch call: larger batches stop fitting the CPU caches and get slower per image.
RENDER_CHUNK = 200


def render_chunked(
    identities, expressions, styles: Sequence[str], size: int, seeds: Sequence[int], chunk: int = RENDER_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """`render_batch` over chunks of `chunk` rows: (uint8 (B, S, S, 3) images, float32 (B, S, S) face masks).

    identities / expressions: records or (B, D) vectors, as `render_batch` takes them.
    """
    images, masks = [], []
    for a in range(0, len(styles), chunk):
        out = render_batch(
            identities[a : a + chunk],
            expressions[a : a + chunk],
            list(styles[a : a + chunk]),
            size,
            list(seeds[a : a + chunk]),
        )
        images.append(out.images.numpy())
        masks.append(out.masks.numpy().astype(np.float32))
    return np.concatenate(images), np.concatenate(masks)


#: Default identity ranges per split (the train range is the paper's ~10k source identities).
DEFAULT_IDENTITIES: dict[str, tuple[int, int]] = {
    "train": IDI_SOURCE_IDENTITIES,
    "val": (VAL_IDENTITIES[0], VAL_IDENTITIES[0] + 10_000),
    "test": (TEST_IDENTITIES[0], TEST_IDENTITIES[0] + 10_000),
}
REFERENCE_MODES = ("other", "target")


@SOURCES.register("world")
class WorldSource(Source):
    """World renders of one split (see module docstring).

    split: "train", "val" or "test" (`emojidiff.splits`): identities and expression/scene seeds
        come from that split only, checked here.
    identities: [start, stop) identity range inside the split (default DEFAULT_IDENTITIES[split]).
    num_targets: how many target indices; needs num_targets <= images_per_identity * identities.
    styles: the styles targets are drawn from (uniformly).
    reference: "other" (another image of the same identity) or "target" (the target itself).
    hair_prompt_probability: chance a caption names the hair (`emojidiff.world.prompts`).
    """

    world = True

    def __init__(
        self,
        split: str = "train",
        identities: tuple[int, int] | None = None,
        num_targets: int = 1000,
        images_per_identity: int = 12,
        styles: Sequence[str] = STYLES,
        size: int = 64,
        reference: str = "other",
        hair_prompt_probability: float = 0.5,
        seed: int = 0,
    ):
        self.split = get_split(split)
        self.identities = check_split(self.split, tuple(identities or DEFAULT_IDENTITIES[split]))
        unknown = [s for s in styles if s not in STYLES]
        if unknown:
            raise ValueError(f"world source: unknown styles {unknown}; styles: {', '.join(STYLES)}")
        if reference not in REFERENCE_MODES:
            raise ValueError(f"world source: reference must be one of {REFERENCE_MODES}, got {reference!r}")
        if images_per_identity < 1 or (reference == "other" and images_per_identity < 2):
            raise ValueError(
                "world source: images_per_identity must be >= 2 for reference='other' (>= 1 otherwise)"
            )
        capacity = images_per_identity * (self.identities[1] - self.identities[0])
        if not 0 < num_targets <= capacity:
            raise ValueError(
                f"world source: num_targets={num_targets} does not fit {self.identities} x {images_per_identity} images "
                f"per identity (at most {capacity})"
            )
        self.num_targets, self.per_identity = int(num_targets), int(images_per_identity)
        self.styles, self.size, self.reference = tuple(styles), int(size), reference
        self.hair_prompt_probability, self.seed = float(hair_prompt_probability), int(seed)

    def __len__(self) -> int:
        return self.num_targets

    @property
    def group_size(self) -> int:
        """Consecutive indices that share an identity (job blocks are multiples of it)."""
        return self.per_identity

    def identity_of(self, index: int) -> int:
        return self.identities[0] + index // self.per_identity

    def reference_of(self, index: int) -> int:
        """Index of target `index`'s reference: the next image of the same identity (wrapping in its group)."""
        if self.reference == "target":
            return index
        start = (index // self.per_identity) * self.per_identity
        stop = min(start + self.per_identity, self.num_targets)
        return index if stop - start < 2 else start + (index - start + 1) % (stop - start)

    def draw(self, index: int) -> dict[str, Any]:
        """The seeded choices of target `index`: identity, expression seed, scene seed, style, caption rng."""
        if not 0 <= index < self.num_targets:
            raise IndexError(f"world source has {self.num_targets} targets, asked for index {index}")
        rng = np.random.default_rng([self.seed, int(index), _TARGET_SALT])
        lo, hi = self.split.seeds
        return {
            "identity": self.identity_of(index),
            "expression_seed": int(rng.integers(lo, hi)),
            "scene_seed": int(rng.integers(lo, hi)),
            "style": self.styles[int(rng.integers(len(self.styles)))],
            "rng": rng,
        }

    def load(self, indices: Sequence[int]) -> Targets:
        indices = [int(i) for i in indices]
        refs = [self.reference_of(i) for i in indices]
        needed = sorted(set(indices) | set(refs))
        draws = {i: self.draw(i) for i in needed}
        identities = {i: Identity.sample(d["identity"]) for i, d in draws.items()}
        expressions = {i: Expression.sample(d["expression_seed"]) for i, d in draws.items()}
        images, masks = render_chunked(
            [identities[i] for i in needed],
            [expressions[i] for i in needed],
            [draws[i]["style"] for i in needed],
            self.size,
            [draws[i]["scene_seed"] for i in needed],
        )
        row = {i: k for k, i in enumerate(needed)}
        at, ref_at = [row[i] for i in indices], [row[j] for j in refs]
        meta, prompts = [], []
        for i, j in zip(indices, refs, strict=True):
            d, r = draws[i], draws[j]
            prompts.append(sample_prompt(d["style"], identities[i], d["rng"], self.hair_prompt_probability))
            meta.append(
                {
                    "source": "world",
                    "identity": d["identity"],
                    "expression_seed": d["expression_seed"],
                    "scene_seed": d["scene_seed"],
                    "style": d["style"],
                    "reference": {
                        "index": j,
                        "expression_seed": r["expression_seed"],
                        "scene_seed": r["scene_seed"],
                        "style": r["style"],
                    },
                }
            )
        return Targets(
            indices=np.asarray(indices, dtype=np.int64),
            images=images[at],
            masks=masks[at],
            references=images[ref_at],
            prompts=prompts,
            persons=[str(draws[i]["identity"]) for i in indices],
            meta=meta,
            identity_params=stack_vectors([identities[i] for i in indices]),
            expression_params=stack_vectors([expressions[i] for i in indices]),
            styles=[draws[i]["style"] for i in indices],
            scene_seeds=[draws[i]["scene_seed"] for i in indices],
            reference_expression_params=stack_vectors([expressions[j] for j in refs]),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "split": self.split.name,
            "identities": list(self.identities),
            "targets": self.num_targets,
            "images_per_identity": self.per_identity,
            "styles": list(self.styles),
            "size": self.size,
            "reference": self.reference,
            "seed": self.seed,
        }
