"""Alterers of round 0 and of the embedded world.

- "self": round 0's self pair: the template is the target's own masked face (background black,
  as the expression encoders mask it), so a model trained on it learns to copy the face.
- "world-swap": a face-swapper simulator with a real swapper's flaw: the inner face (skin tone,
  eyes, iris, brows, nose, mouth, lips) becomes a donor's, but the head outline, jaw, face ratios
  (face width/length, chin, eye spacing), ears and hair stay the target's, and a random fraction
  of the target's inner-face parameters is blended back in. Re-rendered in the target's scene and
  style with the target's exact expression.
- "world-resynth": reads the expression from the target with an expression analyser (never the
  ground truth) and renders another identity wearing it in a random style and scene, so its
  templates carry a real pipeline's expression errors.

Ground truth of each template (identity and expression parameters) is returned with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from data_gen.base import ALTERERS, Alterer, Source, Targets, Templates, donor_rows
from data_gen.sources.world import render_chunked
from emojidiff.face import build_expression_analyser
from emojidiff.images import to_tensor
from emojidiff.world import STYLES, Expression, Identity

#: Identity parameters a swapper replaces: the inner face.
INNER_FACE: tuple[str, ...] = (
    "skin_tone",
    "eye_size",
    "iris_colour",
    "brow_thickness",
    "brow_arch",
    "nose_length",
    "nose_width",
    "mouth_width",
    "lip_thickness",
)
#: Identity parameters a swapper keeps from the target: outline, ratios, ears, hair.
KEPT_BY_SWAP: tuple[str, ...] = tuple(n for n in Identity.names() if n not in INNER_FACE)


def masked_face(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) images times float (B, S, S) masks in [0, 1]: the face, on black."""
    return (images.astype(np.float32) * masks[..., None] + 0.5).astype(np.uint8)


def _require_world(targets: Targets, name: str) -> None:
    if targets.identity_params is None or targets.expression_params is None or targets.scene_seeds is None:
        raise ValueError(f"alterer {name!r} needs world targets (ground-truth parameters and scene seeds)")


@ALTERERS.register("self")
class SelfPair(Alterer):
    """Round 0: template = the target's masked face (same identity, same expression)."""

    name = "self"

    def alter(self, targets: Targets, rng: np.random.Generator) -> Templates:
        b = len(targets)
        return Templates(
            images=masked_face(targets.images, targets.masks),
            masks=targets.masks.copy(),
            ok=np.ones(b, bool),
            meta=[{"alterer": self.name} for _ in range(b)],
            identity_params=None if targets.identity_params is None else targets.identity_params.copy(),
            expression_params=None if targets.expression_params is None else targets.expression_params.copy(),
        )


@ALTERERS.register("world-swap")
class WorldSwap(Alterer):
    """Face-swapper simulator (module docstring).

    keep_fraction: [low, high]: per template, the fraction alpha ~ U(low, high) of the target's
        inner-face parameters blended back in (inner = (1 - alpha) * donor + alpha * target).
    """

    name = "world-swap"
    world_only = True

    def __init__(self, keep_fraction: Sequence[float] = (0.0, 0.6)):
        lo, hi = (float(v) for v in keep_fraction)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"world-swap: keep_fraction must be 0 <= low <= high <= 1, got {keep_fraction}")
        self.keep_fraction = (lo, hi)
        names = Identity.names()
        self._inner = np.array([names.index(n) for n in INNER_FACE])

    def swap_params(self, target_ids: np.ndarray, donor_ids: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """(B, 18) identity vectors: the target's outside the inner face; inside, the donor's with
        `alpha` (B,) of the target's blended back in."""
        out = target_ids.copy()
        a = alpha[:, None].astype(np.float32)
        out[:, self._inner] = (1.0 - a) * donor_ids[:, self._inner] + a * target_ids[:, self._inner]
        return out

    def alter(self, targets: Targets, rng: np.random.Generator) -> Templates:
        _require_world(targets, self.name)
        donors = donor_rows(targets.persons, rng)
        alpha = rng.uniform(*self.keep_fraction, size=len(targets)).astype(np.float32)
        ids = self.swap_params(targets.identity_params, targets.identity_params[donors], alpha)
        images, masks = render_chunked(
            ids, targets.expression_params, targets.styles, targets.images.shape[1], targets.scene_seeds
        )
        meta = [
            {
                "alterer": self.name,
                "donor": targets.persons[d],
                "donor_index": int(targets.indices[d]),
                "keep_fraction": float(a),
            }
            for d, a in zip(donors, alpha, strict=True)
        ]
        return Templates(
            images=images,
            masks=masks,
            ok=np.ones(len(targets), bool),
            meta=meta,
            identity_params=ids,
            expression_params=targets.expression_params.copy(),
        )


@ALTERERS.register("world-resynth")
class WorldResynth(Alterer):
    """Re-render the analysed expression on another identity (module docstring).

    expression_analyser: `emojidiff.face` spec of the analyser that reads the target (default
        "world-expr"; it must output the world's 10 Expression parameters).
    styles: styles the template is drawn in (uniformly).
    device: where the analyser runs.
    """

    name = "world-resynth"
    world_only = True

    def __init__(
        self,
        expression_analyser: str | Mapping[str, Any] = "world-expr",
        styles: Sequence[str] = STYLES,
        device: str = "cpu",
    ):

        self.analyser = build_expression_analyser(expression_analyser).eval().to(device)
        if list(getattr(self.analyser, "names", [])) != Expression.names():
            raise ValueError(
                f"world-resynth: analyser {expression_analyser!r} does not output the world's Expression parameters"
            )
        self.spec, self.styles, self.device = expression_analyser, tuple(styles), device
        self.seeds: tuple[int, int] | None = None

    def setup(self, source: Source) -> None:
        super().setup(source)
        self.seeds = source.split.seeds  # template scenes stay inside the source's split

    @torch.no_grad()
    def read_expressions(self, images: np.ndarray, chunk: int = 256) -> np.ndarray:
        """uint8 (B, S, S, 3) -> (B, 10) float32 analysed expressions, clipped to the world's ranges."""
        est = np.concatenate(
            [
                self.analyser(to_tensor(images[a : a + chunk]).to(self.device)).float().cpu().numpy()
                for a in range(0, len(images), chunk)
            ]
        )
        return np.clip(est, Expression.lows(), Expression.highs()).astype(np.float32)

    def alter(self, targets: Targets, rng: np.random.Generator) -> Templates:
        _require_world(targets, self.name)
        b = len(targets)
        donors = donor_rows(targets.persons, rng)
        # Rows often repeat a target (several templates per target): read each target once.
        _, first, again = np.unique(targets.indices, return_index=True, return_inverse=True)
        expressions = self.read_expressions(targets.images[first])[again.reshape(-1)]
        styles = [self.styles[int(k)] for k in rng.integers(len(self.styles), size=b)]
        lo, hi = self.seeds or (0, 1 << 31)
        scenes = [int(s) for s in rng.integers(lo, hi, size=b)]
        ids = targets.identity_params[donors]
        images, masks = render_chunked(ids, expressions, styles, targets.images.shape[1], scenes)
        meta = [
            {
                "alterer": self.name,
                "donor": targets.persons[d],
                "donor_index": int(targets.indices[d]),
                "style": s,
                "scene_seed": sc,
            }
            for d, s, sc in zip(donors, styles, scenes, strict=True)
        ]
        return Templates(
            images=images,
            masks=masks,
            ok=np.ones(b, bool),
            meta=meta,
            identity_params=ids.copy(),
            expression_params=expressions,
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "expression_analyser": self.spec, "styles": list(self.styles)}
