"""IDI filters: score every candidate template, accept or reject it with a reason, keep every score.

Scores (one value per candidate, all stored in the sample's json):

- `expression_distance`: expression-analyser distance between template and target (must be low:
  the template carries the target's expression);
- `identity_similarity`: cosine of the template's identity embedding with A's (from the
  reference; must be low: the template must not look like A);
- `face_found`: a face is found in the template (world: its face mask covers at least
  `min_face_fraction` of the image; real photos: the aligner detects one);
- `pixel_std` / `saturated_fraction`: image sanity (not blank, not blown out).

In the world, `ground_truth` adds what each filter tries to predict, from the render parameters:
`gt_expression_error` (mean absolute difference of the template's and the target's 10
expression parameters, natural units) and `gt_identity_distance` (mean range-normalised
difference of the 18 identity parameters, divided by its expectation for two random people:
0 = A, about 1 = a stranger; a world-swap with no blending lands near 0.5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from data_gen.base import Targets, Templates
from emojidiff.errors import FaceNotFoundError
from emojidiff.face.analyse import describe_expressions, embed_identities
from emojidiff.images import to_tensor
from emojidiff.world import Identity

#: Rejection reasons, in the order they are checked (the first that applies is reported).
REASONS: tuple[str, ...] = ("alter_error", "no_face", "sanity", "expression", "identity")


@dataclass
class FilterConfig:
    """Thresholds (and the ground-truth tolerances the world report judges the filters by).

    max_expression_distance: accept when the analyser distance template-target is <= this.
    max_identity_similarity: accept when the template's similarity to A is <= this (None: the
        identity encoder's own same-person threshold, its verification EER point).
    min_face_fraction: world only: least fraction of the image the template's face mask covers.
    min_pixel_std / max_saturated_fraction: sanity on uint8 pixels (std over the image; share of
        pixels at 0 or 255 in every channel).
    gt_expression_tolerance / gt_min_identity_distance: world ground truth of a good template:
        gt_expression_error <= tolerance and gt_identity_distance >= min distance.
    """

    max_expression_distance: float = 0.10
    max_identity_similarity: float | None = None
    min_face_fraction: float = 0.05
    min_pixel_std: float = 6.0
    max_saturated_fraction: float = 0.5
    gt_expression_tolerance: float = 0.10
    gt_min_identity_distance: float = 0.4


def _chunked(model, images: np.ndarray, device, chunk: int = 256) -> np.ndarray:
    """model over uint8 (B, S, S, 3) images in chunks -> (B, D) float32 numpy."""
    return np.concatenate(
        [
            model(to_tensor(images[a : a + chunk], device)).float().cpu().numpy()
            for a in range(0, len(images), chunk)
        ]
    )


def _expected_random_identity_gap() -> np.ndarray:
    """(18,) expected |a - b| / range for two random identities: 1/3 for uniform continuous
    parameters, (n - 1) / n for a categorical one with n choices (counted as a mismatch)."""
    return np.array(
        [(len(p.choices) - 1) / len(p.choices) if p.categorical else 1.0 / 3.0 for p in Identity.SPACE]
    )


def identity_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ground-truth identity distance of (B, 18) parameter vectors -> (B,): 0 = same person,
    about 1 = two random people (see module docstring)."""
    span = Identity.highs() - Identity.lows()
    gap = np.abs(a - b) / np.where(span > 0, span, 1.0)
    cat = np.array([p.categorical for p in Identity.SPACE])
    gap[:, cat] = (np.abs(a[:, cat] - b[:, cat]) > 0.5).astype(np.float64)
    return (gap.mean(axis=1) / _expected_random_identity_gap().mean()).astype(np.float32)


class TripletFilter:
    """Scores candidates with an identity encoder and an expression analyser (`emojidiff.face`).

    Both take whole images here (the world's analysers do); an encoder that needs an aligned crop
    gets one through `emojidiff.face.analyse` (a candidate without a detectable face gets a
    NaN similarity and is rejected as `no_face`).
    """

    def __init__(
        self,
        identity_encoder,
        expression_analyser,
        config: FilterConfig | None = None,
        device: str = "cpu",
        aligner=None,
    ):
        self.encoder = identity_encoder.eval().to(device)
        self.analyser = expression_analyser.eval().to(device)
        self.config = config or FilterConfig()
        self.device = device
        self.aligner = aligner
        threshold = self.config.max_identity_similarity
        if threshold is None:
            threshold = getattr(identity_encoder, "same_person_threshold", None)
            if threshold is None:
                raise ValueError(
                    "filters.max_identity_similarity is not set and the identity encoder has no same_person_threshold"
                )
        self.identity_threshold = float(threshold)

    def embed(self, images: np.ndarray, names: list[str]) -> np.ndarray:
        """(B, D) L2-normalised identity embeddings of uint8 images (NaN rows where no face)."""

        return self._apply(
            self.encoder, images, lambda: embed_identities(self.encoder, list(images), names, "nan")
        )

    def describe(self, images: np.ndarray, names: list[str]) -> np.ndarray:
        """(B, K) expression descriptors of uint8 images (NaN rows where no face)."""

        return self._apply(
            self.analyser, images, lambda: describe_expressions(self.analyser, list(images), names)
        )

    @torch.no_grad()
    def _apply(self, model, images: np.ndarray, per_image) -> np.ndarray:
        """Whole-image models run batched in chunks; models that align, or that find faces themselves
        and raise when one has none, go image by image through `per_image` (NaN where no face)."""
        if model.aligner_name == "none":
            try:
                return _chunked(model, images, self.device)
            except FaceNotFoundError:
                pass
        return per_image().numpy()

    def face_found(self, templates: Templates, world: bool) -> np.ndarray:
        if world or self.aligner is None:
            return templates.masks.reshape(len(templates), -1).mean(axis=1) >= self.config.min_face_fraction
        return np.array([bool(self.aligner.detect(im)) for im in templates.images])

    def score(
        self,
        targets: Targets,
        templates: Templates,
        reference_embeddings: np.ndarray,
        target_descriptors: np.ndarray,
        world: bool,
    ) -> dict[str, np.ndarray]:
        """Every score of B candidates: dict of (B,) arrays (see module docstring).

        reference_embeddings: (B, D) A's embeddings; target_descriptors: (B, K) the targets'
        expression descriptors (computed once per target by the job).
        """
        names = [f"template of target {int(i)}" for i in targets.indices]
        emb = self.embed(templates.images, names)
        desc = self.describe(templates.images, names)
        px = templates.images.reshape(len(templates), -1, 3)
        scores = {
            "identity_similarity": np.sum(emb * reference_embeddings, axis=1).astype(np.float32),
            "expression_distance": np.abs(desc - target_descriptors).mean(axis=1).astype(np.float32),
            "face_found": self.face_found(templates, world),
            "pixel_std": px.reshape(len(templates), -1).std(axis=1, dtype=np.float32),
            "saturated_fraction": ((px == 0).all(-1) | (px == 255).all(-1)).mean(axis=1).astype(np.float32),
            "alter_ok": templates.ok.copy(),
        }
        if world and templates.identity_params is not None and targets.identity_params is not None:
            scores["gt_identity_distance"] = identity_distance(
                templates.identity_params, targets.identity_params
            )
        if world and templates.expression_params is not None and targets.expression_params is not None:
            scores["gt_expression_error"] = np.abs(
                templates.expression_params - targets.expression_params
            ).mean(axis=1)
        return scores

    def passes(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """(B,) bool per filter: alter_error, no_face, sanity, expression, identity (True = passes)."""
        c = self.config
        with np.errstate(invalid="ignore"):
            return {
                "alter_error": scores["alter_ok"].astype(bool),
                "no_face": scores["face_found"].astype(bool) & np.isfinite(scores["identity_similarity"]),
                "sanity": (scores["pixel_std"] >= c.min_pixel_std)
                & (scores["saturated_fraction"] <= c.max_saturated_fraction),
                "expression": scores["expression_distance"] <= c.max_expression_distance,
                "identity": scores["identity_similarity"] <= self.identity_threshold,
            }

    def decide(self, scores: dict[str, np.ndarray]) -> list[str | None]:
        """Per candidate, None when accepted, else the first failed filter (REASONS order)."""
        passed = self.passes(scores)
        out: list[str | None] = []
        for i in range(len(scores["alter_ok"])):
            out.append(next((r for r in REASONS if not passed[r][i]), None))
        return out

    def ground_truth_good(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """World only: (B,) bool per filter of whether the candidate truly is good on that
        filter's criterion ("expression": carries e; "identity": is not A; "accept": both)."""
        c = self.config
        out = {}
        if "gt_expression_error" in scores:
            out["expression"] = scores["gt_expression_error"] <= c.gt_expression_tolerance
        if "gt_identity_distance" in scores:
            out["identity"] = scores["gt_identity_distance"] >= c.gt_min_identity_distance
        if len(out) == 2:
            out["accept"] = out["expression"] & out["identity"]
        return out

    def describe_config(self) -> dict[str, Any]:
        return {**asdict(self.config), "identity_threshold_used": self.identity_threshold}
