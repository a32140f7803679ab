"""The "folder" IDI source: a folder of real portraits, aligned to square face crops.

Layout (both may be mixed):

    root/photo.jpg            a file directly in `root` is its own person (person = the file stem)
    root/person/photo.jpg     files below one sub-folder are one person (person = the sub-folder)

Target index i is the i-th image file in the sorted list of relative paths (suffixes
`emojidiff.images.IMAGE_SUFFIXES`, hidden files ignored), so a listing is the same on
every machine. Each target is the aligned crop of the largest face of its file; its reference is
the next photo of the same person (cyclically, in sorted order), aligned the same way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_gen.base import SOURCES, Source, Targets
from emojidiff.face import AlignedFace, FaceAligner, build_face_aligner
from emojidiff.face.base import apply_transform
from emojidiff.face.insightface_backend import five_points_from_68
from emojidiff.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a portrait photo of a person"


class UnusableImageError(ValueError):
    """An image file that cannot be read or holds no face; the message names the file."""


@dataclass
class Portrait:
    """One aligned photo: crop uint8 (S, S, 3), mask float32 (S, S) in {0, 1}, landmarks5 float32
    (5, 2) crop pixels or None, and the detector's score."""

    crop: np.ndarray
    mask: np.ndarray
    landmarks5: np.ndarray | None
    score: float


def list_portraits(root: Path) -> list[tuple[Path, str]]:
    """(relative path, person) of every image file below `root`, sorted by relative path.

    A file directly in `root` is its own person (its stem); deeper files belong to the person of
    their first-level sub-folder.
    """
    files = sorted(
        (
            p.relative_to(root)
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda rel: rel.as_posix(),
    )
    return [(rel, rel.stem if len(rel.parts) == 1 else rel.parts[0]) for rel in files]


def read_rgb(path: Path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB, EXIF orientation applied; UnusableImageError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UnusableImageError(f"{path} cannot be read as an image: {err}") from None


def points5(landmarks: np.ndarray, aligner_name: str) -> np.ndarray | None:
    """The ArcFace 5 points (5, 2) of an aligner's landmarks: from dlib's 68, or the 5 points of the
    "arcface-*" aligners as they are; None for other layouts (e.g. dlib's own 5-point order)."""
    if len(landmarks) == 68:
        return five_points_from_68(landmarks)
    if len(landmarks) == 5 and aligner_name.startswith("arcface"):
        return np.asarray(landmarks, np.float32)
    return None


def hull_mask(face: AlignedFace, size: int) -> np.ndarray:
    """float32 (size, size) {0, 1} face mask of an aligned face, in crop pixels: the convex hull of
    its landmarks, or with fewer than 3 the ellipse inscribed in its (transformed) box
    (the rule of `emojidiff.face.masks.landmark_mask`, without detecting again)."""
    mask = np.zeros((size, size), np.uint8)
    if len(face.landmarks) >= 3:
        cv2.fillConvexPoly(mask, cv2.convexHull(np.round(face.landmarks).astype(np.int32)), 1)
        return mask.astype(np.float32)
    x0, y0, x1, y1 = (float(v) for v in face.detection.box)
    corners = apply_transform(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), face.transform)
    (cx, cy), (w, h) = corners.mean(0), corners.max(0) - corners.min(0)
    axes = (max(1, int(round(w / 2))), max(1, int(round(h / 2))))
    cv2.ellipse(mask, (int(round(cx)), int(round(cy))), axes, 0, 0, 360, 1, -1)
    return mask.astype(np.float32)


@SOURCES.register("folder")
class FolderSource(Source):
    """Real portraits from an image folder, aligned to (size x size) face crops.

    root: the folder (see the module docstring for its layout).
    size: side S of the targets, masks and references.
    aligner: `emojidiff.face.build_face_aligner` spec; its `output_size` is set to `size`.
        "dlib-ffhq" (default) gives FFHQ-style portraits and 68 landmarks.
    prompt: the caption of every target.
    reference: "other" (the next photo of the same person; the target itself for a person with
        one photo) or "target" (always the target itself).

    `load` skips (and logs, naming the path) files that cannot be read or hold no face; masks are
    the hull of the aligner's landmarks in the crop; `Targets.landmarks5` holds the ArcFace 5
    points of each target in crop pixels (None when the aligner's landmarks do not give them).
    """

    world = False

    def __init__(
        self,
        root: str | Path,
        size: int = 512,
        aligner: str | dict[str, Any] = "dlib-ffhq",
        prompt: str = DEFAULT_PROMPT,
        reference: Literal["other", "target"] = "other",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder source: root {self.root} is not a folder")
        if reference not in ("other", "target"):
            raise ValueError(f"reference must be 'other' or 'target', got {reference!r}")
        self.size = int(size)
        self.aligner_spec = aligner
        self.prompt = prompt
        self.reference = reference
        self.files = list_portraits(self.root)
        if not self.files:
            raise FileNotFoundError(
                f"folder source: {self.root} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        self._photos_of: dict[str, list[int]] = {}
        for i, (_, person) in enumerate(self.files):
            self._photos_of.setdefault(person, []).append(i)

    # ---- pickling (workers): the dlib-backed aligner is rebuilt where it is used

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("aligner", None)
        return state

    @functools.cached_property
    def aligner(self) -> FaceAligner:
        return build_face_aligner(self.aligner_spec, output_size=self.size)

    # ---- Source

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "root": str(self.root),
            "size": self.size,
            "aligner": self.aligner_spec,
            "persons": len(self._photos_of),
            "reference": self.reference,
            "prompt": self.prompt,
        }

    def person(self, index: int) -> str:
        return self.files[index][1]

    def reference_index(self, index: int) -> int:
        """The photo used as `index`'s reference: the next one of the same person (cyclic), else itself."""
        if self.reference == "target":
            return index
        photos = self._photos_of[self.person(index)]
        return photos[(photos.index(index) + 1) % len(photos)]

    def portrait(self, index: int) -> Portrait:
        """The aligned crop of file `index`; UnusableImageError naming the file when unusable."""
        rel = self.files[index][0]
        image = read_rgb(self.root / rel)
        detections = self.aligner.detect(image)
        if not detections:
            raise UnusableImageError(f"{self.root / rel}: no face found ({type(self.aligner).__name__})")
        face = self.aligner.align_detection(image, detections[0])
        return Portrait(
            face.crop,
            hull_mask(face, self.size),
            points5(face.landmarks, self.aligner.name),
            float(face.detection.score),
        )

    def load(self, indices: Sequence[int]) -> Targets:
        """Targets at `indices` (see the class docstring); unusable files go to `skipped`."""
        rows: list[tuple[int, Portrait, np.ndarray, dict[str, Any]]] = []
        skipped: list[tuple[int, str, str]] = []
        for index in (int(i) for i in indices):
            if not 0 <= index < len(self):
                raise IndexError(f"folder source {self.root}: index {index} out of range [0, {len(self)})")
            rel = self.files[index][0]
            try:
                target = self.portrait(index)
            except UnusableImageError as err:
                log.warning("folder source: skipping target %d, %s", index, err)
                skipped.append((index, str(self.root / rel), str(err)))
                continue
            reference, meta = self._reference(index, target)
            rows.append((index, target, reference, meta))
        return self._targets(rows, skipped)

    def _reference(self, index: int, target: Portrait) -> tuple[np.ndarray, dict[str, Any]]:
        """The reference crop of `index` and the target's meta (paths, score, reference fallback)."""
        rel = self.files[index][0]
        ref_index = self.reference_index(index)
        meta: dict[str, Any] = {
            "path": rel.as_posix(),
            "reference_path": rel.as_posix(),
            "detection_score": target.score,
        }
        if ref_index == index:
            return target.crop, meta
        ref_rel = self.files[ref_index][0]
        try:
            crop = self.portrait(ref_index).crop
        except UnusableImageError as err:
            log.warning(
                "folder source: reference of target %d falls back to the target itself: %s", index, err
            )
            meta["reference_error"] = f"{ref_rel.as_posix()}: {err}; the target is its own reference"
            return target.crop, meta
        meta["reference_path"] = ref_rel.as_posix()
        return crop, meta

    def _targets(
        self,
        rows: list[tuple[int, Portrait, np.ndarray, dict[str, Any]]],
        skipped: list[tuple[int, str, str]],
    ) -> Targets:
        s = self.size
        lms = [p.landmarks5 for _, p, _, _ in rows]
        return Targets(
            indices=np.array([i for i, *_ in rows], np.int64),
            images=np.stack([p.crop for _, p, _, _ in rows]) if rows else np.zeros((0, s, s, 3), np.uint8),
            masks=np.stack([p.mask for _, p, _, _ in rows]) if rows else np.zeros((0, s, s), np.float32),
            references=np.stack([r for *_, r, _ in rows]) if rows else np.zeros((0, s, s, 3), np.uint8),
            prompts=[self.prompt] * len(rows),
            persons=[self.person(i) for i, *_ in rows],
            meta=[m for *_, m in rows],
            landmarks5=np.stack(lms).astype(np.float32)
            if rows and all(lm is not None for lm in lms)
            else None,
            skipped=skipped,
        )
