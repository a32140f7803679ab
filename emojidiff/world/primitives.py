"""Resolution-independent drawing primitives on batched coordinate grids.

Shapes are implicit functions of face-local coordinates x, y (tensors (B, H, W), y pointing down).
`coverage` turns a signed distance (negative inside) into an anti-aliased alpha in [0, 1] about one
pixel wide, so the same scene renders cleanly at 32 px and at 512 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def coverage(sdf: Tensor, px: Tensor) -> Tensor:
    """Alpha in [0, 1] from a signed distance (<0 inside); `px` is the pixel size in the same units."""
    return (0.5 - sdf / px).clamp(0.0, 1.0)


def implicit_coverage(f: Tensor, px: Tensor) -> Tensor:
    """Alpha from an implicit function f (<0 inside) that is not a true distance.

    Dividing by |grad f| (finite differences on the pixel grid) turns f into an approximate signed
    distance near the boundary, which is all anti-aliasing needs.
    """
    gy, gx = torch.gradient(f, dim=(-2, -1))
    grad = torch.sqrt(gx * gx + gy * gy).clamp_min(1e-6) / px
    return coverage(f / grad, px)


def sd_ellipse(x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, rx: Tensor, ry: Tensor) -> Tensor:
    """Approximate signed distance to an axis-aligned ellipse (exact for circles)."""
    k = torch.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return (k - 1.0) * torch.minimum(rx, ry).expand_as(k)


def sd_band(y: Tensor, y_top: Tensor, y_bottom: Tensor) -> Tensor:
    """Signed vertical distance to the band y_top < y < y_bottom."""
    return torch.maximum(y_top - y, y - y_bottom)


def intersect(*sdfs: Tensor) -> Tensor:
    out = sdfs[0]
    for s in sdfs[1:]:
        out = torch.maximum(out, s)
    return out


def smoothstep(e0: float | Tensor, e1: float | Tensor, x: Tensor) -> Tensor:
    t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class NoiseField:
    """Smooth value noise for a batch: each sample draws its own random lattices from its seed.

    A lattice is a (L+1)x(L+1) grid of uniform values whose last row and column repeat the first,
    so noise tiles without seams; `sample` reads it bilinearly at frequency `freq` (cells per
    face-local unit). Lattices come from a per-sample `torch.Generator`, so noise is deterministic
    for the seed and independent of batch composition.
    """

    def __init__(self, seeds: Tensor, channels: int = 8, lattice: int = 64):
        self.lattice = lattice
        grids = []
        g = torch.Generator()
        for seed in seeds.reshape(-1).tolist():
            g.manual_seed(int(seed))
            grids.append(torch.rand(channels, lattice, lattice, generator=g))
        grid = torch.stack(grids)
        self.grids = torch.cat([grid, grid[:, :, :1]], dim=2)
        self.grids = torch.cat([self.grids, self.grids[:, :, :, :1]], dim=3)  # (B, C, L+1, L+1)

    def sample(self, x: Tensor, y: Tensor, freq: float, channel: int) -> Tensor:
        """(B, H, W) noise in [0, 1) at face-local coordinates x, y (B, H, W)."""
        lat = self.lattice
        u = torch.remainder(x * freq, lat) * (2.0 / lat) - 1.0
        v = torch.remainder(y * freq, lat) * (2.0 / lat) - 1.0
        grid = torch.stack([u, v], dim=-1)
        src = self.grids[:, channel : channel + 1]
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]

    def fractal(self, x: Tensor, y: Tensor, freq: float, channel: int, octaves: int = 3) -> Tensor:
        """Octaves of `sample` (each twice the frequency at half the weight), in [0, 1)."""
        total, weight, norm = torch.zeros_like(x), 1.0, 0.0
        for o in range(octaves):
            total = total + weight * self.sample(x, y, freq * 2**o, channel + o)
            norm += weight
            weight *= 0.5
        return total / norm
