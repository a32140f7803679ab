"""Losses shared by training stages: one function per loss, shapes and ranges in the docstring."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

FeatureMaps = Callable[[Tensor], list[Tensor]]


def perceptual_loss(feature_maps: FeatureMaps, images: Tensor, target: Tensor) -> Tensor:
    """LPIPS-style distance in a frozen network's own feature space, per image.

    feature_maps: images (B, 3, H, W) [0, 1] -> list of (B, C, h, w) maps and/or (B, D) vectors
        (e.g. `WorldExpressionRegressor.feature_maps`: what the world's expression analyser sees).
    images: (B, 3, H, W) in [0, 1], differentiable (a reconstruction); target: the same shape.
    Returns (B,): the mean over layers of the squared distance of channel-normalised maps
    (summed over channels, averaged over positions; as LPIPS without learned weights) and, for
    vectors, their mean squared difference. Gradients flow into `images` only.
    """
    with torch.no_grad():
        wanted = feature_maps(target)
    got = feature_maps(images)
    terms = []
    for a, b in zip(got, wanted, strict=True):
        if a.ndim == 4:
            terms.append((F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1).mean(dim=(1, 2)))
        else:
            terms.append((a - b).pow(2).mean(1))
    return torch.stack(terms, dim=1).mean(1)
