"""Expression encoders: the frozen VAE-patch encoder of the embedded world."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from emojidiff.errors import MissingWeightsError
from emojidiff.models.bundle import build_expression_encoder
from emojidiff.models.expression_encoder import VAEPatchExpressionEncoder


def test_vae_patches_are_the_backbone_vae_latents_cut_into_a_token_grid():
    enc = build_expression_encoder({"name": "vae_patches", "init_args": {"patch": 4}})
    assert isinstance(enc, VAEPatchExpressionEncoder) and not enc.trainable
    assert all(not p.requires_grad for p in enc.parameters())
    images = torch.rand(2, 3, 64, 64)
    tokens = enc(images)
    latents = enc.vae.encode(images * 2 - 1).latent_dist.mode() * enc.scaling  # (2, C, 16, 16)
    c = latents.shape[1]
    assert tokens.shape == (2, enc.num_tokens, enc.feature_dim) == (2, 16, c * 16)
    # token 1 is the second 4x4 patch of the first row of the latent grid, channels-major
    torch.testing.assert_close(tokens[:, 1], latents[:, :, 0:4, 4:8].reshape(2, -1))
    # a mask blacks out what is outside the face; another image size is resized to the same grid
    mask = torch.zeros(2, 1, 64, 64)
    torch.testing.assert_close(enc(images, mask), enc(torch.zeros_like(images)))
    assert enc(F.interpolate(images, size=128, mode="bilinear")).shape == tokens.shape


def test_vae_patches_name_the_missing_backbone(tmp_path):
    with pytest.raises(MissingWeightsError, match="init_args.backbone"):
        VAEPatchExpressionEncoder(backbone=str(tmp_path))


def test_world_expr_features_are_the_frozen_analyser_last_stage_as_tokens():
    from emojidiff.face.world_models import WorldExpressionRegressor

    enc = build_expression_encoder("world_expr_features")
    assert not enc.trainable and all(not p.requires_grad for p in enc.parameters())
    images = torch.rand(2, 3, 64, 64)
    reference = WorldExpressionRegressor().feature_maps(images)[-2]
    tokens = enc(images)
    assert tokens.shape == (2, enc.num_tokens, enc.feature_dim) == (2, reference.shape[2] * reference.shape[3], reference.shape[1])
    torch.testing.assert_close(tokens, reference.flatten(2).transpose(1, 2))
    torch.testing.assert_close(enc(images, torch.zeros(2, 1, 64, 64)), enc(torch.zeros_like(images)))
