"""Losses shared by training stages: one function per loss, shapes and ranges in the docstring."""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------------------------
# Diffusion (stage 1, and ICA's regulariser)
# ---------------------------------------------------------------------------------------------


def snr(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of integer `timesteps` (B,) -> (B,) float32."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


#: Timestep sampling strategies of `sample_timesteps`.
TIMESTEP_SAMPLING = ("uniform", "cubic")


def sample_timesteps(
    n: int,
    low: int,
    high: int,
    strategy: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(n,) integer timesteps in [low, high).

    uniform: every timestep alike. cubic: t = low + (1 - u^3) (high - low) with u ~ U(0, 1), so the
    noisy half of the range is drawn 79% of the time (T2I-Adapter's sampling, which favours the
    early, high-noise steps where a sample's layout and colours are decided).
    """
    if strategy == "uniform":
        return torch.randint(low, high, (n,), device=device, generator=generator)
    if strategy == "cubic":
        u = torch.rand(n, device=device, generator=generator)
        return (low + (1.0 - u**3) * (high - low)).long().clamp_(low, high - 1)
    raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLING}, got {strategy!r}")


def min_snr_weights(snr_t: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an epsilon or v-prediction loss: (B,) -> (B,).

    epsilon: min(SNR, gamma) / SNR; v_prediction: min(SNR, gamma) / (SNR + 1).
    """
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    raise ValueError(f"Min-SNR weighting needs an epsilon or v_prediction scheduler, got {prediction_type!r}")


def diffusion_loss(
    pred: Tensor, target: Tensor, weights: Tensor | None = None, pixel_weights: Tensor | None = None
) -> Tensor:
    """Per-sample weighted MSE of a noise/velocity prediction.

    pred, target: (B, C, h, w) latents-space predictions and targets (epsilon or v).
    weights: (B,) per-sample weights (e.g. Min-SNR) or None.
    pixel_weights: (B, 1, h, w) non-negative per-position weights (e.g. a face mask weighting),
        normalised so each sample's mean weight is 1 (the loss scale does not change with the mask).
    Returns (B,) float32.
    """
    err = (pred.float() - target.float()).pow(2)
    if pixel_weights is not None:
        w = pixel_weights.float()
        err = err * (w / w.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8))
    loss = err.mean(dim=(1, 2, 3))
    return loss if weights is None else loss * weights.float()


def predicted_x0(
    noisy: Tensor, pred: Tensor, alphas_cumprod: Tensor, timesteps: Tensor, prediction_type: str
) -> Tensor:
    """One-step reconstruction x0 of `noisy` latents x_t (B, C, h, w) from the model's prediction.

    epsilon: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a); v_prediction: x0 = sqrt(a) x_t - sqrt(1 - a) v;
    sample: the prediction itself. a = alpha_bar of each sample's timestep. Differentiable in `pred`.
    """
    if prediction_type == "sample":
        return pred
    a = alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
    x, p = noisy.float(), pred.float()
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * p) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * p
    raise ValueError(f"unknown prediction type {prediction_type!r}")


# ---------------------------------------------------------------------------------------------
# ICA: identity, expression and contrast alignment
# ---------------------------------------------------------------------------------------------


def identity_loss(embeddings: Tensor, targets: Tensor) -> Tensor:
    """1 - cos(embeddings, targets): (B, D), (B, D) -> (B,) in [0, 2]; 0 when they point the same way."""
    return 1.0 - F.cosine_similarity(embeddings.float(), targets.float(), dim=-1)


def attended_queries(keys: Tensor, queries: Tensor) -> Tensor:
    """softmax(K Q^T / sqrt(d)) Q: each identity token's attention-weighted summary of the image.

    keys: (B, N, d) identity keys of one cross-attention layer; queries: (B, L, d) the layer's
    image queries. Returns (B, N, d): what the layer's image features say about each identity token.
    """
    scores = keys.float() @ queries.float().transpose(1, 2) / math.sqrt(keys.shape[-1])
    return scores.softmax(dim=-1) @ queries.float()


def alignment_semantic_loss(keys: Tensor, queries_on: Tensor, queries_off: Tensor) -> Tensor:
    """PuLID's semantic alignment term for one layer: mean |softmax(K Q_on^T/sqrt d) Q_on - the same with Q_off|.

    keys (B, N, d); queries_on / queries_off (B, L, d) from two passes that differ only in one
    branch (here: the expression branch on / off). Returns (B,) float32.
    """
    return (attended_queries(keys, queries_on) - attended_queries(keys, queries_off)).abs().mean(dim=(1, 2))


def alignment_layout_loss(queries_on: Tensor, queries_off: Tensor) -> Tensor:
    """PuLID's layout alignment term for one layer: mean |Q_on - Q_off|, (B, L, d) x 2 -> (B,)."""
    return (queries_on.float() - queries_off.float()).abs().mean(dim=(1, 2))
