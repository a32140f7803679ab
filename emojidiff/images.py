"""Image files and the one set of pixel conversions between numpy uint8 images and model tensors.

Images are numpy uint8 (H, W, 3) RGB; masks float32 (H, W) in [0, 1] (1 = face); tensors handed
to models are (B, 3, H, W) float in [0, 1], as everywhere in emojidiff, and [-1, 1] where a VAE or
a pixel-space network reads them. The conversions, one function each:

    uint8 (B, H, W, 3)  --to_tensor-->  float (B, 3, H, W) in [0, 1]  --to_signed-->  [-1, 1]
    uint8 (B, H, W, 3)  <--to_uint8---  float (B, 3, H, W) in [0, 1]  <--to_unit----  [-1, 1]
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


def to_tensor(
    images: np.ndarray | Sequence[np.ndarray] | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1] (x / 255).

    images: a numpy or torch uint8 (B, H, W, 3) array, or a sequence of equally sized (H, W, 3).
    device: where to convert (the uint8 pixels are moved first, a quarter of the bytes); None: where
    `images` are (numpy: the CPU).
    """
    if isinstance(images, torch.Tensor):
        x = images
    else:
        if not isinstance(images, np.ndarray) or not images.flags.writeable:
            images = np.stack(list(images))  # from_numpy warns on read-only arrays (memmaps, PIL's)
        x = torch.from_numpy(np.ascontiguousarray(images))
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images of shape (B, H, W, 3), got {tuple(x.shape)}")
    if device is not None:
        x = x.to(device)
    return x.permute(0, 3, 1, 2).float().div(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [0, 1] -> C-contiguous numpy uint8 (B, H, W, 3) (clamped, rounded; no gradient)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    arr = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return np.ascontiguousarray(arr.permute(0, 2, 3, 1).cpu().numpy())


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]: (x + 1) / 2, any shape and float dtype (kept), differentiable."""
    return (images + 1) / 2


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: x * 2 - 1, any shape and float dtype (kept), differentiable."""
    return images * 2 - 1
