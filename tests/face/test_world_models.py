"""The world analysers: packaged weights separate identities and recover expressions on held-out
identities, gradients reach the pixels, weights errors are clear. (Their training:
tests/lightning_modules/test_world_analysers.py; the evaluation pair: test_world_eval_models.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics import R2Score
from torchmetrics.classification import BinaryEER

from datamodules.world_faces import expression_vectors, identity_vectors, render_images
from emojidiff.errors import MissingWeightsError
from emojidiff.face.base import build_expression_analyser, build_identity_encoder
from emojidiff.face.world_models import (
    DEFAULT_EXPR_WEIGHTS,
    DEFAULT_ID_WEIGHTS,
    WorldExpressionRegressor,
    WorldIdentityEncoder,
)
from emojidiff.splits import TEST_IDENTITIES
from emojidiff.world import STYLES, Expression

# The robustness figures measured at installation on the fixed set of the last test (96 renders):
# expression MAE clean 0.080, blur 0.8 px 0.085, packaged-base VAE reconstructions 0.106; identity
# cosine of reconstructions to their renders 0.997. The bounds leave room for float differences.
CLEAN_MAX, BLUR_MAX, VAE_MAX, ID_SIM_MIN = 0.09, 0.10, 0.12, 0.99

# Held-out test identities far from the ones the analysers' report uses, and unseen seeds.
HELD_OUT = TEST_IDENTITIES[0] + 500_000
SEEDS = 1 << 40


def _renders(ids: np.ndarray, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Images (N, 3, 64, 64) of `ids` with random unseen expressions, styles and scene seeds."""
    rng = np.random.default_rng(seed)
    exprs = expression_vectors(SEEDS + rng.integers(0, 1 << 30, ids.size))
    styles = [STYLES[i] for i in rng.integers(0, len(STYLES), ids.size)]
    images = render_images(
        identity_vectors(ids), exprs, styles, SEEDS + rng.integers(0, 1 << 30, ids.size), 64
    )
    return images, exprs


@pytest.fixture(scope="module")
def id_encoder() -> WorldIdentityEncoder:
    return WorldIdentityEncoder()


@pytest.fixture(scope="module")
def expr_regressor() -> WorldExpressionRegressor:
    return WorldExpressionRegressor()


def test_packaged_identity_encoder_separates_held_out_identities(id_encoder: WorldIdentityEncoder) -> None:
    ids = np.repeat(HELD_OUT + np.arange(30), 4)
    images, _ = _renders(ids, seed=1)
    with torch.no_grad():
        emb = id_encoder(images).numpy()
    assert emb.shape == (120, 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    iu, ju = np.triu_indices(len(ids), k=1)
    same = ids[iu] == ids[ju]
    genuine, impostor = sim[iu, ju][same], sim[iu, ju][~same]
    assert genuine.mean() > impostor.mean() + 0.3
    scores = torch.from_numpy(np.concatenate([genuine, impostor]) / 2 + 0.5).clamp(0, 1)
    assert (
        float(
            BinaryEER()(
                scores, torch.from_numpy(np.r_[np.ones(genuine.size), np.zeros(impostor.size)]).long()
            )
        )
        < 0.05
    )
    threshold = id_encoder.same_person_threshold
    assert threshold is not None and -1.0 < threshold < 1.0
    assert (genuine >= threshold).mean() > 0.9
    assert (impostor < threshold).mean() > 0.95


def test_packaged_expression_regressor_recovers_expressions(expr_regressor: WorldExpressionRegressor) -> None:
    ids = HELD_OUT + 1000 + np.arange(200)
    images, exprs = _renders(ids, seed=2)
    with torch.no_grad():
        pred = expr_regressor(images).numpy()
    assert pred.shape == (200, 10) and expr_regressor.names == Expression.names()
    r2 = R2Score(multioutput="raw_values")(torch.from_numpy(pred).double(), torch.from_numpy(exprs)).numpy()
    assert r2.mean() > 0.85, dict(zip(Expression.names(), r2.round(3), strict=True))
    # distance is the mean absolute error in natural units
    mae = expr_regressor.distance(torch.from_numpy(pred), torch.from_numpy(exprs)).mean().item()
    assert mae == pytest.approx(np.abs(pred - exprs).mean(), rel=1e-5)


@pytest.mark.parametrize("size", [64, 96])
def test_gradients_reach_the_pixels(
    id_encoder: WorldIdentityEncoder, expr_regressor: WorldExpressionRegressor, size: int
) -> None:
    images, _ = _renders(HELD_OUT + np.arange(2), seed=3)
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear")
    for model, out_dim in ((id_encoder, 128), (expr_regressor, 10)):
        assert model.differentiable and model.aligner_name == "none"
        assert not any(p.requires_grad for p in model.parameters())  # frozen, yet differentiable
        model.train()
        assert not model.net.training  # a frozen analyser keeps eval-mode BatchNorm
        x = images.clone().requires_grad_(True)
        out = model(x)
        assert out.shape == (2, out_dim)
        out.square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        model.eval()


def test_save_and_load_round_trip(tmp_path) -> None:
    model = WorldExpressionRegressor(weights=None, arch={"channels": [8, 16, 16], "hidden": 0})
    path = model.save(tmp_path / "expr.safetensors")
    assert path.with_suffix(".json").is_file()
    loaded = WorldExpressionRegressor(path)
    assert loaded.freeze and loaded.net.config == model.net.config
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=2e-2, rtol=2e-2)  # fp16 storage
    with pytest.raises(ValueError, match="world-expr"):
        WorldIdentityEncoder(path)


def test_missing_weights_name_the_key_and_the_file(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "world_id.safetensors"
    with pytest.raises(MissingWeightsError) as info:
        WorldIdentityEncoder(missing)
    assert info.value.key == "weights"
    assert "`weights`" in str(info.value) and "world_id.safetensors" in str(info.value)
    assert "world_id.json" in str(info.value)
    with pytest.raises(MissingWeightsError, match="world_expr.safetensors"):
        WorldExpressionRegressor(tmp_path / "world_expr.safetensors")


def test_build_by_registry_name() -> None:
    enc = build_identity_encoder({"name": "world-id", "init_args": {"weights": str(DEFAULT_ID_WEIGHTS)}})
    assert isinstance(enc, WorldIdentityEncoder) and enc.embedding_dim == 128
    expr = build_expression_analyser(
        {"name": "world-expr", "init_args": {"weights": str(DEFAULT_EXPR_WEIGHTS)}}
    )
    assert isinstance(expr, WorldExpressionRegressor) and expr.descriptor_dim == 10
    fresh = build_identity_encoder({"name": "world-id", "init_args": {"pretrained": False}})
    assert fresh.weights is None and any(p.requires_grad for p in fresh.parameters())
    assert fresh.same_person_threshold is None


def test_packaged_analysers_read_what_the_packaged_base_decodes(
    id_encoder: WorldIdentityEncoder, expr_regressor: WorldExpressionRegressor
) -> None:
    """The training analysers on a fixed held-out set: clean renders, blurred renders and the
    packaged base's VAE reconstructions (what every generated image is). Thresholds: the figures
    measured when the analysers and the base were installed, plus a margin (see world_report.md
    and docs/base/latent_ceiling.md for the full-size measurements)."""
    from benchmarks.diagnostics.latent_ceiling import vae_reconstruct
    from emojidiff.degradations import gaussian_blur
    from emojidiff.models.backbone import Backbone
    from emojidiff.packaged import DEFAULT_BACKBONE

    images, exprs = _renders(HELD_OUT + 3000 + np.arange(96), seed=3)
    truth = torch.from_numpy(exprs)
    backbone = Backbone.from_folder(DEFAULT_BACKBONE)
    with torch.no_grad():
        recon = vae_reconstruct(backbone, images)
        blurred = gaussian_blur(images, 0.8).clamp(0, 1)
        errors = {
            name: float((expr_regressor(x) - truth).abs().mean())
            for name, x in (("clean", images), ("blur", blurred), ("vae", recon))
        }
        id_sim = float((id_encoder(recon) * id_encoder(images)).sum(-1).mean())
    assert errors["clean"] < CLEAN_MAX and errors["blur"] < BLUR_MAX and errors["vae"] < VAE_MAX, errors
    assert errors["clean"] < errors["vae"], errors
    assert id_sim > ID_SIM_MIN
