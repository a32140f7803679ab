"""Image degradations of the kind a latent-diffusion generator makes: blur and lost resolution.

Used to measure how much of a face survives (`benchmarks.diagnostics.latent_ceiling`) and to train the world
analysers to read generated images (`datamodules.world_faces.augment`). Images are
(B, C, H, W) floats; nothing here clamps or changes the value range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_blur(images: Tensor, sigma: float | Tensor) -> Tensor:
    """(B, C, H, W) blurred by a separable Gaussian of `sigma` px (one float, or (B,) per image;
    kernel radius ceil(3 * max sigma), reflect padding). Same shape."""
    b, c, h, w = images.shape
    sigmas = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).reshape(-1).expand(b)
    if bool((sigmas <= 0).any()):
        raise ValueError(f"gaussian_blur needs sigma > 0, got {sigmas.min().item():g}")
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x[None, :] / sigmas[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 2r+1)
    out = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(b * c, 1, 1, -1), groups=b * c)
    out = F.conv2d(out, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return out.reshape(b, c, h, w)


def down_up(images: Tensor, factor: float = 2.0) -> Tensor:
    """(B, C, H, W) downsampled by `factor` (antialiased bilinear) and bilinearly upsampled back:
    the image at 1/factor of its resolution, at its own size."""
    h, w = images.shape[-2:]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    out = F.interpolate(images, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
