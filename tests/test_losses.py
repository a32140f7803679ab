"""Losses: the perceptual term in a frozen analyser's feature space; timestep sampling."""

import pytest
import torch

from emojidiff.face.world_models import WorldExpressionRegressor
from emojidiff.losses import perceptual_loss, sample_timesteps
from emojidiff.world import Expression, Identity, render_batch


def _renders(expressions):
    n = len(expressions)
    out = render_batch([Identity.sample(3)] * n, expressions, "shaded", 64, [0] * n)
    return out.images.permute(0, 3, 1, 2).float() / 255


def test_perceptual_loss_is_zero_on_itself_and_grows_with_the_expression_change():
    analyser = WorldExpressionRegressor()
    neutral = _renders([Expression.preset("neutral")] * 3)
    changed = _renders(
        [Expression.preset("neutral"), Expression.preset("happy"), Expression.preset("surprised")]
    )
    loss = perceptual_loss(analyser.feature_maps, changed, neutral)
    assert loss.shape == (3,)
    assert float(loss[0]) < 1e-6 < float(loss[1]) and float(loss[2]) > 1e-3


def test_perceptual_loss_reaches_the_images_and_not_the_frozen_analyser():
    analyser = WorldExpressionRegressor()
    target = _renders([Expression.preset("happy")])
    images = _renders([Expression.preset("neutral")]).requires_grad_(True)
    perceptual_loss(analyser.feature_maps, images, target).sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in analyser.parameters())


def test_cubic_timesteps_favour_the_noisy_half_as_their_distribution_says():
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(40_000, 100, 900, "uniform", g)
    cubic = sample_timesteps(40_000, 100, 900, "cubic", g)
    for t in (uniform, cubic):
        assert t.dtype == torch.long and t.min() >= 100 and t.max() <= 899
    # P(t >= mid) = P(1 - u^3 >= 1/2) = P(u <= 2^(-1/3)) = 0.794; uniform: 1/2
    assert abs((uniform >= 500).float().mean().item() - 0.5) < 0.01
    assert abs((cubic >= 500).float().mean().item() - 2 ** (-1 / 3)) < 0.01
    with pytest.raises(ValueError, match="cubic"):
        sample_timesteps(4, 0, 10, "logit")
