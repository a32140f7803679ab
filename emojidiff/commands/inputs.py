"""Inputs of the commands: image files, template masks, identity embeddings, face-analyser outputs.

Images are numpy uint8 (H, W, 3) RGB; masks float32 (H, W) in [0, 1] (1 = face); tensors handed
to models are (B, 3, H, W) float in [0, 1], as everywhere in emojidiff.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from emojidiff.errors import FaceNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InputImageError(FileNotFoundError):
    """An input image is missing or unreadable; the message names the file and its role."""


def _open(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputImageError(f"{what} image not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise InputImageError(f"{what} image {path} cannot be read: {err}") from None
    return image


def square(image: Image.Image, size: int | None) -> Image.Image:
    """Centre-crop to a square, then resize to size x size (Lanczos) when `size` is given."""
    w, h = image.size
    if w != h:
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def load_image(path: str | Path, what: str = "input", size: int | None = None) -> np.ndarray:
    """An image file -> uint8 (S, S, 3) RGB (centre-cropped square; resized to `size` if given)."""
    return np.asarray(square(_open(path, what).convert("RGB"), size))


def load_mask(path: str | Path, size: int, what: str = "mask") -> np.ndarray:
    """A mask image (white = face) -> float32 (size, size) in [0, 1]."""
    return np.asarray(square(_open(path, what).convert("L"), size), np.float32) / 255.0


def save_image(image: np.ndarray, path: str | Path) -> Path:
    """uint8 (H, W, 3) or bool/float (H, W) mask -> PNG at `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(image).save(path)
    return path


def list_images(folder: str | Path, what: str) -> list[Path]:
    """Image files directly in `folder`, sorted by name; an error names an empty or missing folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputImageError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1]."""
    arr = np.ascontiguousarray(np.stack(list(images)))
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


# ---------------------------------------------------------------------------------------------
# Template masks
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def world_prior_mask(size: int, samples: int = 64) -> np.ndarray:
    """The embedded world's face region at `size`: pixels that are face in >= 5% of `samples`
    renders (varied identities, expressions and pose jitter). float32 (size, size) in {0, 1}.

    World portraits are centred, so this fixed region covers any world template's face.
    """
    from emojidiff.splits import VAL_IDENTITIES
    from emojidiff.world import Expression, Identity, render_batch

    ids = [Identity.sample(VAL_IDENTITIES[0] + i) for i in range(samples)]
    exprs = [Expression.sample(i) for i in range(samples)]
    out = render_batch(ids, exprs, "shaded", size=max(size, 32), seeds=list(range(samples)))
    freq = out.masks.float().mean(0).numpy()
    mask = (freq >= 0.05).astype(np.float32)
    if mask.shape[0] != size:
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
    return mask


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
    """The aligner `--mask-from aligner` uses (dlib with 68 landmarks by default)."""
    from emojidiff.face import build_face_aligner

    init_args = {"landmarks": 68} if name == "dlib-chip" else {}
    return build_face_aligner({"name": name, "init_args": init_args})


# ---------------------------------------------------------------------------------------------
# Identity embeddings and expression descriptors with alignment
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _aligner(name: str):
    from emojidiff.face import build_face_aligner

    return build_face_aligner(name)


def _crops(model, images: Sequence[np.ndarray], names: Sequence[str], size: int,
           on_missing: Literal["raise", "nan"]) -> tuple[torch.Tensor, list[bool]]:
    """Model input (B, 3, S, S) [0, 1] and which images had a face (all True for aligner "none")."""
    if model.aligner_name == "none":
        resized = [np.asarray(square(Image.fromarray(im), size)) for im in images]
        return to_tensor(resized), [True] * len(images)
    aligned = _aligner(model.aligner_name).align_batch(
        list(images), names=list(names), on_missing="raise" if on_missing == "raise" else "none"
    )
    found = [a is not None for a in aligned]
    crops = [a.crop if a is not None else np.zeros((size, size, 3), np.uint8) for a in aligned]
    crops = [np.asarray(square(Image.fromarray(c), size)) for c in crops]
    return to_tensor(crops), found


@torch.no_grad()
def embed_identities(encoder, images: Sequence[np.ndarray], names: Sequence[str],
                     on_missing: Literal["raise", "nan"] = "raise") -> torch.Tensor:
    """(B, D) L2-normalised embeddings of uint8 images, aligned as `encoder.aligner_name` asks.

    on_missing="raise": FaceNotFoundError naming the image; "nan": a NaN row for it.
    """
    device = next(encoder.parameters(), torch.empty(0)).device
    x, found = _crops(encoder, images, names, encoder.input_size, on_missing)
    emb = encoder(x.to(device)).float().cpu()
    emb[~torch.tensor(found)] = float("nan")
    return emb


@torch.no_grad()
def describe_expressions(analyzer, images: Sequence[np.ndarray], names: Sequence[str]) -> torch.Tensor:
    """(B, K) expression descriptors of uint8 images; a NaN row where no face was found."""
    device = next(analyzer.parameters(), torch.empty(0)).device
    size = images[0].shape[0]
    x, found = _crops(analyzer, images, names, size, "nan")
    try:
        desc = analyzer(x.to(device)).float().cpu()
    except FaceNotFoundError:  # an analyser that finds faces itself and raises: one image at a time
        rows = []
        for i in range(x.shape[0]):
            try:
                rows.append(analyzer(x[i : i + 1].to(device)).float().cpu())
            except FaceNotFoundError:
                rows.append(torch.full((1, analyzer.descriptor_dim), float("nan")))
        desc = torch.cat(rows)
    desc[~torch.tensor(found)] = float("nan")
    return desc
