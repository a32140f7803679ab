"""Image files and the one conversion between numpy uint8 images and model tensors.

Images are numpy uint8 (H, W, 3) RGB; masks float32 (H, W) in [0, 1] (1 = face); tensors handed
to models are (B, 3, H, W) float in [0, 1], as everywhere in emojidiff.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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
