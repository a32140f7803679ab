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
    assert (
        tokens.shape
        == (2, enc.num_tokens, enc.feature_dim)
        == (2, reference.shape[2] * reference.shape[3], reference.shape[1])
    )
    torch.testing.assert_close(tokens, reference.flatten(2).transpose(1, 2))
    torch.testing.assert_close(enc(images, torch.zeros(2, 1, 64, 64)), enc(torch.zeros_like(images)))


def test_expression_params_are_the_analysers_unit_parameters_as_one_token():
    from emojidiff.face.world_models import WorldExpressionRegressor

    enc = build_expression_encoder("expression_params")
    assert not enc.trainable and (enc.num_tokens, enc.feature_dim) == (1, 10)
    images = torch.rand(2, 3, 64, 64)
    params = enc(images)
    assert params.shape == (2, 1, 10)
    torch.testing.assert_close(params[:, 0], WorldExpressionRegressor().describe_unit(images))
    # the mask is ignored (an action-unit detector reads the whole template); other sizes are resized
    torch.testing.assert_close(enc(images, torch.zeros(2, 1, 64, 64)), params)
    assert enc(torch.rand(1, 3, 96, 96)).shape == (1, 1, 10)


def test_expression_params_feed_an_mlp_projection_into_the_adapter_tokens():
    from emojidiff.models.bundle import fresh_model

    model = fresh_model(
        "emojidiff:tiny-sd15",
        "world-id",
        "expression_params",
        {"expr_resampler_depth": 0, "num_expr_tokens": 16},
    )
    adapter = model.pipeline.adapter
    assert adapter.config.expr_feature_dim == 10
    tmpl = torch.rand(2, 3, 64, 64)
    features = model.pipeline.expression_encoder(tmpl)
    tokens = adapter.expr_proj(features)
    assert tokens.shape == (2, 16, adapter.expr_proj.cross_attention_dim)
