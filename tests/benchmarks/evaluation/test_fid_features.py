"""The TF-FID Inception feature extractor and the FID/KID built on it, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from benchmarks.evaluation.fid_features import (
    TFInceptionFeatures,
    default_weights,
    make_fid,
    tf1_resize_bilinear,
)
from emojidiff.world import Expression, Identity, render_batch

NOISE = (0.05, 0.15, 0.4)


@pytest.fixture(scope="module")
def inception() -> TFInceptionFeatures:
    return TFInceptionFeatures()


@pytest.fixture(scope="module")
def image_sets() -> dict[float, torch.Tensor]:
    """8 world portraits (float (8, 3, 64, 64) in [0, 1]) and copies with Gaussian noise of each std in NOISE."""
    n = 8
    out = render_batch(
        [Identity.sample(i) for i in range(n)],
        [Expression.sample(i) for i in range(n)],
        "shaded",
        size=64,
        seeds=list(range(n)),
    )
    base = out.images.permute(0, 3, 1, 2).float() / 255.0
    gen = torch.Generator().manual_seed(0)
    return {0.0: base, **{s: (base + s * torch.randn(base.shape, generator=gen)).clamp(0, 1) for s in NOISE}}


@pytest.fixture(scope="module")
def features(inception, image_sets) -> dict[float, torch.Tensor]:
    """(8, 2048) features of each set from a bare forward of the TorchScript."""
    bare = torch.jit.load(str(default_weights()), map_location="cpu").eval()
    with torch.no_grad():
        return {s: bare(inception.preprocess(x)) for s, x in image_sets.items()}


class _Given(nn.Module):
    """A pass-through 'extractor': lets FID/KID consume precomputed (B, 2048) features."""

    num_features = 2048

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _hand_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID of feature sets a (n, d), b (m, d) in float64 with scipy's sqrtm.

    tr sqrtm(cov_a cov_b) is taken on the (n, n) matrix M M^T, M = A_c B_c^T / sqrt((n-1)(m-1))
    with centred features: it has the same non-zero eigenvalues as the (d, d) product (the
    covariances have rank < n), and sqrtm of 2048 x 2048 takes minutes on one core.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    m = (a - mu_a) @ (b - mu_b).T / np.sqrt((len(a) - 1) * (len(b) - 1))
    tr_covmean = np.trace(scipy.linalg.sqrtm(m @ m.T).real)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def test_module_equals_a_bare_forward_of_the_torchscript(inception):
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))  # 299 px: no resize
    bare = torch.jit.load(str(default_weights()), map_location="cpu").eval()
    with torch.no_grad():
        expected = bare(x * 255.0 / 128.0 - 1.0)  # TF-FID input: (pixel - 128) / 128
    got = inception(x)
    assert got.shape == (2, 2048) and inception.num_features == 2048
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_uint8_and_float_images_give_the_same_network_input(inception):
    u8 = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    pre = inception.preprocess(u8)
    torch.testing.assert_close(pre, inception.preprocess(u8.float() / 255.0))
    assert pre.shape == (2, 3, 299, 299) and pre.min() >= -1.0 and pre.max() <= 0.9921875


def test_resize_is_tf1_bilinear():
    x = torch.rand(1, 1, 7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = tf1_resize_bilinear(x, 11)[0, 0].numpy()
    # TF1 resize_bilinear(align_corners=False): output j samples input j * in / out, clamped at the edge
    img, expected = x[0, 0].numpy(), np.zeros((11, 11))
    for i in range(11):
        for j in range(11):
            y, xx = i * 7 / 11, j * 5 / 11
            y0, x0 = int(y), int(xx)
            y1, x1 = min(y0 + 1, 6), min(x0 + 1, 4)
            dy, dx = y - y0, xx - x0
            top = img[y0, x0] * (1 - dx) + img[y0, x1] * dx
            bottom = img[y1, x0] * (1 - dx) + img[y1, x1] * dx
            expected[i, j] = top * (1 - dy) + bottom * dy
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_fid_metric_equals_the_hand_computation(image_sets, features):
    fid = make_fid()
    fid.update(image_sets[0.0], real=True)
    fid.update(image_sets[0.15], real=False)
    expected = _hand_fid(features[0.0].double().numpy(), features[0.15].double().numpy())
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-3)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(features):
    fid = FrechetInceptionDistance(feature=_Given(), normalize=True, reset_real_features=False)
    fid.update(features[0.0], real=True)
    values = []
    for s in (0.0, *NOISE):
        fid.reset()  # keeps the real features
        fid.update(features[s], real=False)
        values.append(float(fid.compute()))
    assert abs(values[0]) < 1e-2  # measured -8e-5: eigvals' numerical floor at 2048 dims
    assert values[1] < values[2] < values[3]


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_grows_with_noise(features):
    torch.manual_seed(0)
    kid = KernelInceptionDistance(
        feature=_Given(), subsets=10, subset_size=8, normalize=True, reset_real_features=False
    )
    kid.update(features[0.0], real=True)
    means = []
    for s in (0.0, *NOISE):
        kid.reset()
        kid.update(features[s], real=False)
        means.append(float(kid.compute()[0]))
    # the unbiased estimator of a set against itself is slightly negative at n = 8, not 0
    assert means[0] < means[1] < means[2] < means[3]


def test_frechet_distance_equals_torchmetrics_formula():
    from torchmetrics.image.fid import _compute_fid

    from benchmarks.evaluation.fid_features import frechet_distance

    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(40, 16, generator=g, dtype=torch.float64),
        torch.randn(30, 16, generator=g, dtype=torch.float64) * 1.3 + 0.2,
    )
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    assert float(frechet_distance(mu1, s1, mu2, s2)) == pytest.approx(
        float(_compute_fid(mu1, s1, mu2, s2)), rel=1e-6
    )
