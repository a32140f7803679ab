"""The training losses against hand-written references (emojidiff.losses)."""

import torch
from diffusers import DDPMScheduler

from emojidiff.face.world_models import WorldExpressionRegressor
from emojidiff.losses import (
    alignment_layout_loss,
    alignment_semantic_loss,
    attended_queries,
    diffusion_loss,
    identity_loss,
    min_snr_weights,
    predicted_x0,
    snr,
)


def test_min_snr_weights_follow_the_formula():
    s = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(
        min_snr_weights(s, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51])
    )


def test_predicted_x0_inverts_the_forward_noising_for_epsilon_and_v():
    sched = DDPMScheduler(num_train_timesteps=1000)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    xt = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(
        predicted_x0(xt, noise, sched.alphas_cumprod, t, "epsilon"), x0, atol=2e-3, rtol=1e-3
    )
    v = sched.get_velocity(x0, noise, t)
    torch.testing.assert_close(
        predicted_x0(xt, v, sched.alphas_cumprod, t, "v_prediction"), x0, atol=1e-4, rtol=1e-4
    )
    assert snr(sched.alphas_cumprod, t).shape == (3,)


def test_diffusion_loss_weights_keep_the_scale():
    pred, target = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    assert torch.equal(diffusion_loss(pred, target), torch.ones(2))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    torch.testing.assert_close(diffusion_loss(pred, target, pixel_weights=1 + 3 * mask), torch.ones(2))
    pred[:, :, :2] = 0  # error only outside the up-weighted region
    torch.testing.assert_close(
        diffusion_loss(pred, target, pixel_weights=1 + 3 * mask), torch.full((2,), 0.5 * 2 / 5 * 1)
    )
    torch.testing.assert_close(
        diffusion_loss(pred, target, weights=torch.tensor([2.0, 0.0])), torch.tensor([1.0, 0.0])
    )


def test_identity_and_expression_losses():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(identity_loss(a, b), torch.tensor([0.0, 1.0]))
    # ICA's expression term is the analyser's own distance: for the world analysers the mean absolute difference
    torch.testing.assert_close(WorldExpressionRegressor.distance(None, a, b), torch.tensor([0.5, 1.0]))


def test_attended_queries_match_the_written_formula_and_alignment_is_zero_on_equal_passes():
    k, q, q2 = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    manual = torch.softmax(k @ q.transpose(1, 2) / 8**0.5, dim=-1) @ q
    torch.testing.assert_close(attended_queries(k, q), manual)
    assert torch.equal(alignment_semantic_loss(k, q, q), torch.zeros(2))
    assert torch.equal(alignment_layout_loss(q, q), torch.zeros(2))
    assert (alignment_semantic_loss(k, q, q2) > 0).all() and (alignment_layout_loss(q, q2) > 0).all()
