"""Template face masks: the convex hull of a face aligner's landmarks on photos, the fixed face
region on world portraits, as a model's `mask_from` says."""

from __future__ import annotations

import functools

import cv2
import numpy as np

from emojidiff.errors import FaceNotFoundError
from emojidiff.face.base import build_face_aligner
from emojidiff.world.masks import world_prior_mask


def landmark_mask(image: np.ndarray, aligner, name: str) -> np.ndarray:
    """Face mask of `image` from a FaceAligner's largest detection: the convex hull of its
    landmarks (68 points cover jaw and brows) or, with fewer than 3, the ellipse in its box.

    Raises FaceNotFoundError(name) when there is no face.
    """
    dets = aligner.detect(image)
    if not dets:
        raise FaceNotFoundError(name, f"{type(aligner).__name__} found no face for the template mask")
    det = dets[0]
    mask = np.zeros(image.shape[:2], np.uint8)
    if len(det.landmarks) >= 3:
        hull = cv2.convexHull(np.round(det.landmarks).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 1)
    else:
        x0, y0, x1, y1 = (float(v) for v in det.box)
        centre = (int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2)))
        axes = (max(1, int(round((x1 - x0) / 2))), max(1, int(round((y1 - y0) / 2))))
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
    return mask.astype(np.float32)


@functools.lru_cache(maxsize=4)
def mask_aligner(name: str = "dlib-chip"):
    """The aligner `--mask_from aligner` uses (dlib with 68 landmarks by default)."""
    init_args = {"landmarks": 68} if name == "dlib-chip" else {}
    return build_face_aligner({"name": name, "init_args": init_args})


def template_mask(image: np.ndarray, mode: str, size: int, name: str) -> np.ndarray:
    """float32 (size, size) face mask of an expression template by `mode` (a model's mask_from):
    "world" the world's fixed face region, "aligner" the landmark hull detected on `image` at its
    full resolution, "none" all ones. Raises FaceNotFoundError(name) when the aligner finds no face."""
    if mode == "world":
        return world_prior_mask(size)
    if mode == "aligner":
        mask = landmark_mask(image, mask_aligner(), name)
        return cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA) if mask.shape[0] != size else mask
    if mode == "none":
        return np.ones((size, size), np.float32)
    raise ValueError(f"unknown mask source {mode!r}: none, world or aligner")
