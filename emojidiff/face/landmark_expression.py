"""The "LMS" expression descriptor: scale- and pose-normalised amplitude ratios of 68 landmarks.

Landmarks use dlib's 68-point (iBUG 300-W) indexing: jaw 0-16, brows 17-21 / 22-26, nose 27-35,
eyes 36-41 / 42-47, outer lips 48-59, inner lips 60-67. "_r"/"_l" in component names are the
subject's own right/left: points 36-41 are the subject's right eye, on the image's left.
Vertical quantities are measured in a face frame whose x axis runs from eye to eye, so in-plane
rotation, translation and scale cancel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from emojidiff.errors import FaceNotFoundError
from emojidiff.face.base import EXPRESSION_ANALYSERS, ExpressionAnalyser, tensor_to_images
from emojidiff.face.dlib_backend import DlibLandmarker

__all__ = ["LMS_MIRROR", "LMS_NAMES", "MIRROR_68", "DlibLMSAnalyser", "lms_descriptor", "mirror_landmarks68"]

LMS_NAMES: list[str] = [
    "eye_open_r",  # eye height / eye width
    "eye_open_l",
    "brow_raise_r",  # brow above the eye-corner line / inter-ocular distance
    "brow_raise_l",
    "brow_inner_gap",  # inner brow ends apart / inter-ocular (frown squeezes it)
    "mouth_open",  # inner-lip gap / mouth width
    "mouth_width",  # corner to corner / inter-ocular
    "corner_lift_r",  # mouth corner above the lip centre / inter-ocular (smile > 0, frown < 0)
    "corner_lift_l",
    "lip_height",  # outer upper-lip top to lower-lip bottom / inter-ocular
    "upper_lip_raise",  # nose base to upper-lip top / inter-ocular (shrinks when the lip rises)
    "jaw_drop",  # nose base to chin / inter-ocular
]


def _other_side(name: str) -> str:
    side = {"_r": "_l", "_l": "_r"}.get(name[-2:])
    return name[:-2] + side if side else name


# Descriptor permutation under a horizontal mirror: right and left components swap.
LMS_MIRROR: list[int] = [LMS_NAMES.index(_other_side(n)) for n in LMS_NAMES]


def _mirror_68() -> list[int]:
    """Index permutation of the 68 points under a horizontal flip of the image."""
    perm = list(range(68))
    pairs = [(i, 16 - i) for i in range(8)]  # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]  # brows
    pairs += [(31, 35), (32, 34)]  # nostrils
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lips
    pairs += [(60, 64), (61, 63), (65, 67)]  # inner lips
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


MIRROR_68: list[int] = _mirror_68()


def mirror_landmarks68(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Landmarks (..., 68, 2) of an image `width` pixels wide -> those of its horizontal mirror."""
    lm = np.asarray(landmarks, np.float32).copy()
    lm[..., 0] = (width - 1) - lm[..., 0]
    return lm[..., MIRROR_68, :]


def lms_descriptor(landmarks68: np.ndarray) -> np.ndarray:
    """Landmarks (N, 68, 2) (or (68, 2)) in pixels -> LMS descriptor (N, 12) float32, see LMS_NAMES."""
    lm = np.asarray(landmarks68, np.float64)
    if lm.ndim == 2:
        lm = lm[None]
    if lm.shape[1:] != (68, 2):
        raise ValueError(f"expected landmarks of shape (N, 68, 2), got {lm.shape}")

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.linalg.norm(a - b, axis=-1)

    eye_r, eye_l = lm[:, 36:42].mean(1), lm[:, 42:48].mean(1)
    iod = dist(eye_r, eye_l)
    x_axis = (eye_l - eye_r) / iod[:, None]
    y_axis = np.stack([-x_axis[:, 1], x_axis[:, 0]], axis=1)  # x rotated +90 deg: points down the face

    def height(p: np.ndarray) -> np.ndarray:
        """Vertical coordinate (down positive) in the face frame, in inter-ocular units."""
        return ((p - eye_r) * y_axis).sum(-1) / iod

    def pt(i: int) -> np.ndarray:
        return lm[:, i]

    def eye_open(a: int) -> np.ndarray:  # a = first index of the eye's 6 points
        vertical = (dist(pt(a + 1), pt(a + 5)) + dist(pt(a + 2), pt(a + 4))) / 2
        return vertical / dist(pt(a), pt(a + 3))

    def brow_raise(brow: slice, corner_a: int, corner_b: int) -> np.ndarray:
        eye_line = height((pt(corner_a) + pt(corner_b)) / 2)
        return eye_line - height(lm[:, brow].mean(1))

    mouth_w = dist(pt(48), pt(54))
    inner_gap = (dist(pt(61), pt(67)) + dist(pt(62), pt(66)) + dist(pt(63), pt(65))) / 3
    lip_centre = height((pt(62) + pt(66)) / 2)
    nose_base = height(pt(33))
    desc = np.stack(
        [
            eye_open(36),
            eye_open(42),
            brow_raise(slice(17, 22), 36, 39),
            brow_raise(slice(22, 27), 42, 45),
            dist(pt(21), pt(22)) / iod,
            inner_gap / mouth_w,
            mouth_w / iod,
            lip_centre - height(pt(48)),
            lip_centre - height(pt(54)),
            height(pt(57)) - height(pt(51)),
            height(pt(51)) - nose_base,
            height(pt(8)) - nose_base,
        ],
        axis=1,
    )
    return desc.astype(np.float32)


@EXPRESSION_ANALYSERS.register("dlib-lms")
class DlibLMSAnalyser(ExpressionAnalyser):
    """LMS descriptor from dlib's 68-point predictor, run on whole images (it finds the face).

    on_missing: "raise" raises FaceNotFoundError naming the batch index; "nan" gives a NaN row.
    Not differentiable (dlib, on detached uint8 copies).
    """

    descriptor_dim = len(LMS_NAMES)
    names = LMS_NAMES
    differentiable = False
    aligner_name = "none"

    def __init__(
        self,
        models_dir: str | Path | None = None,
        detector: Literal["hog", "cnn"] = "hog",
        upsample: int = 0,
        on_missing: Literal["raise", "nan"] = "raise",
    ):
        super().__init__()
        if on_missing not in ("raise", "nan"):
            raise ValueError(f"on_missing must be 'raise' or 'nan', got {on_missing!r}")
        self.on_missing = on_missing
        self.landmarker = DlibLandmarker(models_dir, detector, 68, upsample)

    def landmarks(self, images: Tensor) -> np.ndarray:
        """(B, 3, H, W) [0, 1] -> (B, 68, 2) float32 landmarks of the largest face (NaN if none)."""
        out = np.full((images.shape[0], 68, 2), np.nan, np.float32)
        for i, image in enumerate(tensor_to_images(images)):
            dets = self.landmarker.detect(image)
            if dets:
                out[i] = dets[0].landmarks
            elif self.on_missing == "raise":
                raise FaceNotFoundError(f"<image {i}>", "dlib-lms found no face")
        return out

    def describe(self, images: Tensor) -> Tensor:
        desc = lms_descriptor(self.landmarks(images))
        return torch.from_numpy(desc).to(images.device)
