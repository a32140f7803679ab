"""Interfaces of the face-analysis layer: aligners, identity encoders, expression analysers.

Every backend (real photo models here, the synthetic "world" CNNs elsewhere) implements one of
these, and configs pick it by name from the registries below.

Conventions:
- images handed to models are float tensors (B, 3, H, W), RGB, values in [0, 1];
- images handed to aligners are numpy uint8 (H, W, 3) RGB;
- pixel coordinates are (x, y) with the centre of pixel (i, j) at x=j, y=i (OpenCV's convention).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emojidiff.errors import FaceNotFoundError
from emojidiff.images import to_tensor, to_uint8
from emojidiff.registry import Registry

__all__ = [
    "EXPRESSION_ANALYSERS",
    "FACE_ALIGNERS",
    "IDENTITY_ENCODERS",
    "AlignedFace",
    "ExpressionAnalyser",
    "FaceAligner",
    "FaceDetection",
    "IdentityEncoder",
    "as_rgb_uint8",
    "build_expression_analyser",
    "build_face_aligner",
    "build_identity_encoder",
    "resize_square",
    "tensor_to_images",
    "warp_faces",
    "warp_image",
]


# --------------------------------------------------------------------------------------------
# image helpers


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Return `image` as a C-contiguous uint8 (H, W, 3) RGB array.

    Accepts (H, W) grayscale, (H, W, 3) RGB and (H, W, 4) RGBA (alpha dropped), uint8 or float
    in [0, 1].
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"expected a uint8 or float image, got dtype {image.dtype}")
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])


def tensor_to_images(images: Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) float [0, 1] -> list of B uint8 (H, W, 3) RGB arrays (no gradient): `to_uint8`
    as the list that per-image loops and dlib's batch call take."""
    return list(to_uint8(images))


def images_to_tensor(images: Sequence[np.ndarray]) -> Tensor:
    """List of equally sized (H, W, 3) RGB images, or what `as_rgb_uint8` accepts -> (B, 3, H, W)
    float32 in [0, 1]."""
    return to_tensor([as_rgb_uint8(im) for im in images])


def resize_square(images: Tensor, size: int) -> Tensor:
    """Resize (B, 3, H, W) to (B, 3, size, size), bilinear, antialiased when shrinking."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[-2:] == (size, size):
        return images
    shrink = min(images.shape[-2:]) > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


# --------------------------------------------------------------------------------------------
# affine warps shared by the numpy (aligner) path and the differentiable torch path


def _antialias_factor(scale: float) -> int:
    """Power-of-two box-filter factor applied before a bilinear warp that shrinks by `scale`."""
    if scale >= 0.5:
        return 1
    return 2 ** int(math.floor(math.log2(1.0 / scale)))


def _warp_scale(transform: np.ndarray) -> float:
    return float(math.sqrt(abs(np.linalg.det(np.asarray(transform, np.float64)[:, :2]))))


def _compose_pool(transform: np.ndarray, factor: int) -> np.ndarray:
    """Transform of the `factor`x box-pooled image: pooled pixel p sits at factor*p+(factor-1)/2."""
    pool = np.array([[factor, 0, (factor - 1) / 2], [0, factor, (factor - 1) / 2], [0, 0, 1]])
    return (np.asarray(transform, np.float64) @ pool)[:2]


def warp_image(image: np.ndarray, transform: np.ndarray, size: int, antialias: bool = True) -> np.ndarray:
    """Crop `image` (uint8 (H, W, 3)) with the affine `transform` ((2, 3), source pixel -> crop pixel).

    Bilinear, zero border. When the warp shrinks by more than 2x and `antialias` is set, the image
    is first box-pooled by a power of two (exactly as `warp_faces` does), so crops are not aliased.
    Returns uint8 (size, size, 3).
    """
    image = as_rgb_uint8(image)
    transform = np.asarray(transform, np.float64)
    factor = _antialias_factor(_warp_scale(transform)) if antialias else 1
    src: np.ndarray = image
    if factor > 1:
        h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
        src = (
            image[:h, :w]
            .astype(np.float32)
            .reshape(h // factor, factor, w // factor, factor, 3)
            .mean(axis=(1, 3))
        )
        transform = _compose_pool(transform, factor)
    out = cv2.warpAffine(
        src, transform, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if out.dtype != np.uint8 else out


def _pixel_to_norm(width: int, height: int) -> np.ndarray:
    """3x3 matrix mapping pixel-centre coords to grid_sample's [-1, 1] (align_corners=False)."""
    return np.array([[2.0 / width, 0, 1.0 / width - 1], [0, 2.0 / height, 1.0 / height - 1], [0, 0, 1]])


def warp_faces(images: Tensor, transforms: Tensor | np.ndarray, size: int, antialias: bool = True) -> Tensor:
    """Differentiable crop: apply per-image affine `transforms` to `images`.

    images: (B, 3, H, W) float (any range; typically [0, 1]).
    transforms: (B, 2, 3) affine mapping source pixel coords -> crop pixel coords, e.g.
        `AlignedFace.transform` found on a reference image, re-applied to a generated image.
    Returns (B, 3, size, size), bilinear, zeros outside the image; gradients flow to `images`.
    Reproduces `warp_image` / `FaceAligner.align` crops up to interpolation rounding.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    tf = np.asarray(transforms.detach().cpu() if isinstance(transforms, Tensor) else transforms, np.float64)
    tf = tf.reshape(-1, 2, 3)
    if tf.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {tf.shape[0]} transforms")
    out = images.new_empty(images.shape[0], images.shape[1], size, size)
    factors = [_antialias_factor(_warp_scale(t)) if antialias else 1 for t in tf]
    to_crop_norm_inv = np.linalg.inv(_pixel_to_norm(size, size))
    for factor in sorted(set(factors)):
        idx = [i for i, f in enumerate(factors) if f == factor]
        src = images[idx]
        if factor > 1:
            src = F.avg_pool2d(src, kernel_size=factor, stride=factor)
        h, w = src.shape[-2:]
        thetas = []
        for i in idx:
            t = _compose_pool(tf[i], factor) if factor > 1 else tf[i]
            crop_to_src = np.linalg.inv(np.vstack([t, [0, 0, 1]]))
            thetas.append((_pixel_to_norm(w, h) @ crop_to_src @ to_crop_norm_inv)[:2])
        theta = torch.as_tensor(np.stack(thetas), dtype=src.dtype, device=src.device)
        grid = F.affine_grid(theta, [len(idx), src.shape[1], size, size], align_corners=False)
        out[idx] = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out


def apply_transform(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Map (K, 2) points with a (2, 3) affine transform; returns float32 (K, 2)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    t = np.asarray(transform, np.float64)
    return (points @ t[:, :2].T + t[:, 2]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# detection and alignment


@dataclass
class FaceDetection:
    """One detected face in an image.

    box: float32 (4,) x0, y0, x1, y1 in pixels; score: detector confidence (scale is
    detector-specific); landmarks: float32 (K, 2) pixel coords (K depends on the aligner, may be 0).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = (float(v) for v in self.box)
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass
class AlignedFace:
    """A canonical face crop.

    crop: uint8 (S, S, 3) RGB; transform: float32 (2, 3) affine, source pixel -> crop pixel;
    landmarks: float32 (K, 2) in crop coords; detection: the source detection (source coords).
    """

    crop: np.ndarray
    transform: np.ndarray
    landmarks: np.ndarray
    detection: FaceDetection


class FaceAligner(abc.ABC):
    """Finds faces and cuts canonical crops of side `output_size`.

    Subclasses implement `detect` and `estimate_transform`; `name` is the key encoders and
    analysers refer to through their `aligner_name`.
    """

    name: str = "abstract"
    output_size: int

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        """All faces in a uint8 (H, W, 3) RGB image, sorted by box area, largest first."""

    @abc.abstractmethod
    def estimate_transform(self, detection: FaceDetection) -> np.ndarray:
        """The (2, 3) float32 affine (source pixel -> crop pixel) of the canonical crop."""

    def align_detection(self, image: np.ndarray, detection: FaceDetection) -> AlignedFace:
        """Crop one given detection of `image`."""
        image = as_rgb_uint8(image)
        transform = np.asarray(self.estimate_transform(detection), np.float32)
        crop = warp_image(image, transform, self.output_size)
        return AlignedFace(crop, transform, apply_transform(detection.landmarks, transform), detection)

    def align(self, image: np.ndarray, name: str = "<array>") -> AlignedFace:
        """Crop the largest face; raises FaceNotFoundError(name) when there is none."""
        image = as_rgb_uint8(image)
        detections = self.detect(image)
        if not detections:
            raise FaceNotFoundError(name, f"{type(self).__name__} found no face")
        return self.align_detection(image, detections[0])

    def align_all(self, image: np.ndarray) -> list[AlignedFace]:
        """Crops of every face in `image`, largest first (empty list when none)."""
        image = as_rgb_uint8(image)
        return [self.align_detection(image, d) for d in self.detect(image)]

    def align_batch(
        self,
        images: Sequence[np.ndarray] | Tensor,
        names: Sequence[str] | None = None,
        on_missing: Literal["raise", "none"] = "raise",
    ) -> list[AlignedFace | None]:
        """`align` over a list of uint8 images or a (B, 3, H, W) [0, 1] tensor.

        on_missing="raise" raises FaceNotFoundError naming the image (from `names`, else its
        index); "none" puts None in its place.
        """
        arrays = tensor_to_images(images) if isinstance(images, Tensor) else list(images)
        names = list(names) if names is not None else [f"<image {i}>" for i in range(len(arrays))]
        if len(names) != len(arrays):
            raise ValueError(f"{len(arrays)} images but {len(names)} names")
        out: list[AlignedFace | None] = []
        for image, name in zip(arrays, names, strict=True):
            try:
                out.append(self.align(image, name))
            except FaceNotFoundError:
                if on_missing == "raise":
                    raise
                out.append(None)
        return out


def sort_by_area(detections: list[FaceDetection]) -> list[FaceDetection]:
    return sorted(detections, key=lambda d: d.area, reverse=True)


def stack_crops(faces: Sequence[AlignedFace]) -> tuple[Tensor, Tensor]:
    """Aligned faces -> crops (B, 3, S, S) float32 [0, 1] and transforms (B, 2, 3) float32."""
    crops = images_to_tensor([f.crop for f in faces])
    transforms = torch.from_numpy(np.stack([f.transform for f in faces]).astype(np.float32))
    return crops, transforms


# --------------------------------------------------------------------------------------------
# models


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], got {shape}")


class IdentityEncoder(nn.Module, abc.ABC):
    """Face-recognition embedding of aligned face crops.

    Attributes: `embedding_dim` D; `input_size` S, side of the square crop the network consumes;
    `differentiable`, whether gradients flow from the embedding to the input pixels;
    `aligner_name`, the FaceAligner whose canonical crop it expects ("none": whole images);
    `same_person_threshold`, the cosine similarity above which two faces count as one person
    for this model (None when unknown).
    """

    embedding_dim: int
    input_size: int
    differentiable: bool
    aligner_name: str
    same_person_threshold: float | None = None

    @abc.abstractmethod
    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) RGB [0, 1] crops at `input_size` -> (B, D) raw (unnormalised) embeddings."""

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB [0, 1] aligned crops -> (B, D) float32 L2-normalised embeddings.

        Crops whose side differs from `input_size` are resized first.
        """
        _check_images(images)
        emb = self.embed(resize_square(images, self.input_size))
        return F.normalize(emb.float(), dim=-1)

    @staticmethod
    def similarity(a: Tensor, b: Tensor) -> Tensor:
        """Cosine similarity of embeddings (B, D), (B, D) -> (B,)."""
        return F.cosine_similarity(a.float(), b.float(), dim=-1)


class ArcFaceEncoder(IdentityEncoder):
    """What every ArcFace implementation shares: 512-d embeddings of 112 px "arcface-112" crops,
    and the common verification cut (cosine 0.4; tune it per dataset)."""

    embedding_dim = 512
    input_size = 112
    aligner_name = "arcface-112"
    same_person_threshold = 0.4


class ExpressionAnalyser(nn.Module, abc.ABC):
    """Expression descriptor of face images.

    Attributes: `descriptor_dim` K; `names` (K component names); `differentiable`;
    `aligner_name` (the crop it expects; "none" for whole images, it finds the face itself).
    """

    descriptor_dim: int
    names: list[str]
    differentiable: bool
    aligner_name: str

    @abc.abstractmethod
    def describe(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB [0, 1] -> (B, K) descriptor."""

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB [0, 1] -> (B, K) float32 descriptor."""
        _check_images(images)
        return self.describe(images).float()

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Expression error of descriptor pairs (B, K), (B, K) -> (B,): mean absolute difference."""
        return (a.float() - b.float()).abs().mean(dim=-1)


# --------------------------------------------------------------------------------------------
# registries

IDENTITY_ENCODERS: Registry[IdentityEncoder] = Registry("identity encoder")
EXPRESSION_ANALYSERS: Registry[ExpressionAnalyser] = Registry("expression analyser")
FACE_ALIGNERS: Registry[FaceAligner] = Registry("face aligner")


def build_identity_encoder(spec: str | Mapping[str, Any], **overrides: Any) -> IdentityEncoder:
    """Build from "name" or {"name": ..., "init_args": {...}}; see IDENTITY_ENCODERS.names()."""
    return IDENTITY_ENCODERS.build(spec, **overrides)


def build_expression_analyser(spec: str | Mapping[str, Any], **overrides: Any) -> ExpressionAnalyser:
    """Build from "name" or {"name": ..., "init_args": {...}}; see EXPRESSION_ANALYSERS.names()."""
    return EXPRESSION_ANALYSERS.build(spec, **overrides)


def build_face_aligner(spec: str | Mapping[str, Any], **overrides: Any) -> FaceAligner:
    """Build from "name" or {"name": ..., "init_args": {...}}; see FACE_ALIGNERS.names()."""
    return FACE_ALIGNERS.build(spec, **overrides)
