"""Image degradations against SciPy's reference filters."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from emojidiff.degradations import down_up, gaussian_blur


def test_gaussian_blur_matches_scipy():
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    out = gaussian_blur(images, 0.8).numpy()
    for b in range(2):
        for c in range(3):
            ref = gaussian_filter(images[b, c].numpy().astype(np.float64), 0.8, radius=3, mode="mirror")
            np.testing.assert_allclose(out[b, c], ref, atol=1e-5)


def test_gaussian_blur_per_image_sigma_equals_one_call_per_image():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.4, 0.9, 1.3])
    batched = gaussian_blur(images, sigmas)
    for k in range(3):
        # the batch shares the widest radius, so narrow kernels differ only by their truncated tails
        torch.testing.assert_close(
            batched[k : k + 1], gaussian_blur(images[k : k + 1], float(sigmas[k])), atol=1e-4, rtol=0
        )
    with pytest.raises(ValueError, match="sigma > 0"):
        gaussian_blur(images, 0.0)


def test_down_up_keeps_size_and_removes_the_finest_detail():
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2
    images = checker.float().expand(1, 3, 32, 32)
    out = down_up(images, 2.0)
    assert out.shape == images.shape
    assert float(out.std()) < 0.05 * float(images.std())  # a one-pixel checkerboard does not survive 2x
    flat = torch.full((1, 3, 32, 32), 0.3)
    torch.testing.assert_close(down_up(flat, 1.7), flat)
