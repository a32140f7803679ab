"""The world *evaluation* analysers ("world-id-eval", "world-expr-eval"): they load by name, differ
from the training pair, separate held-out identities, recover expressions on clean and blurred
held-out renders, and agree with the training pair where both are right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics import PearsonCorrCoef
from torchmetrics.classification import BinaryEER

from datamodules.world_faces import expression_vectors, identity_vectors, render_images
from emojidiff.degradations import gaussian_blur
from emojidiff.face.base import build_expression_analyser, build_identity_encoder
from emojidiff.face.world_models import (
    DEFAULT_EVAL_EXPR_WEIGHTS,
    DEFAULT_EVAL_ID_WEIGHTS,
    EVALUATION_ANALYSERS,
    TRAINING_ANALYSERS,
    WorldEvalExpressionRegressor,
    WorldEvalIdentityEncoder,
    WorldExpressionRegressor,
    WorldIdentityEncoder,
)
from emojidiff.splits import TEST_IDENTITIES, TEST_SEEDS
from emojidiff.world import STYLES

# Measured at installation on the fixed 96 renders of the expression tests (world_eval_report.md has
# the full-size report): expression MAE clean 0.093, blur 0.8 px 0.099, packaged-base VAE
# reconstructions 0.118 (the training pair: 0.084, 0.091, 0.108); identity cosine of reconstructions
# to their renders 0.997. The bounds leave room for float differences.
CLEAN_MAX, BLUR_MAX, VAE_MAX, ID_SIM_MIN = 0.11, 0.115, 0.13, 0.99

# Held-out test identities far from the ones the reports use, and unseen held-out seeds.
HELD_OUT = TEST_IDENTITIES[0] + 700_000
SEEDS = TEST_SEEDS[0] + (1 << 31)


def _renders(ids: np.ndarray, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Images (N, 3, 64, 64) of `ids` with random held-out expressions, styles and scene seeds."""
    rng = np.random.default_rng(seed)
    exprs = expression_vectors(SEEDS + rng.integers(0, 1 << 30, ids.size))
    styles = [STYLES[i] for i in rng.integers(0, len(STYLES), ids.size)]
    images = render_images(
        identity_vectors(ids), exprs, styles, SEEDS + rng.integers(0, 1 << 30, ids.size), 64
    )
    return images, exprs


@pytest.fixture(scope="module")
def id_encoder() -> WorldIdentityEncoder:
    return build_identity_encoder(EVALUATION_ANALYSERS["identity"])


@pytest.fixture(scope="module")
def expr_regressor() -> WorldExpressionRegressor:
    return build_expression_analyser(EVALUATION_ANALYSERS["expression"])


def test_evaluation_pair_loads_by_name_and_differs_from_the_training_pair(
    id_encoder: WorldIdentityEncoder, expr_regressor: WorldExpressionRegressor
) -> None:
    assert EVALUATION_ANALYSERS == {"identity": "world-id-eval", "expression": "world-expr-eval"}
    assert isinstance(id_encoder, WorldEvalIdentityEncoder) and id_encoder.weights == DEFAULT_EVAL_ID_WEIGHTS
    assert (
        isinstance(expr_regressor, WorldEvalExpressionRegressor)
        and expr_regressor.weights == DEFAULT_EVAL_EXPR_WEIGHTS
    )
    train_id = build_identity_encoder(TRAINING_ANALYSERS["identity"])
    train_expr = build_expression_analyser(TRAINING_ANALYSERS["expression"])
    assert id_encoder.net.config != train_id.net.config and expr_regressor.net.config != train_expr.net.config
    for path in (DEFAULT_EVAL_ID_WEIGHTS, DEFAULT_EVAL_EXPR_WEIGHTS):
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["role"] == "evaluation" and meta["dtype"] == "float16"
    images, _ = _renders(HELD_OUT + np.arange(4), seed=0)
    with torch.no_grad():
        emb, pred = id_encoder(images), expr_regressor(images)
    assert emb.shape == (4, 128) and pred.shape == (4, 10) and expr_regressor.descriptor_dim == 10
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert id_encoder.differentiable and id_encoder.aligner_name == "none"
    assert not any(p.requires_grad for p in id_encoder.parameters())
    x = images.clone().requires_grad_(True)
    expr_regressor(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # frozen, yet differentiable


def test_evaluation_identity_encoder_separates_held_out_identities(id_encoder: WorldIdentityEncoder) -> None:
    ids = np.repeat(HELD_OUT + 100 + np.arange(30), 4)
    images, _ = _renders(ids, seed=1)
    with torch.no_grad():
        emb = id_encoder(images)
    sim = emb @ emb.T
    iu, ju = torch.triu_indices(len(ids), len(ids), offset=1)
    same = torch.from_numpy(ids)[iu] == torch.from_numpy(ids)[ju]
    scores = sim[iu, ju]
    genuine, impostor = scores[same], scores[~same]
    assert genuine.mean() > impostor.mean() + 0.3
    assert float(BinaryEER()(((scores + 1) / 2).clamp(0, 1), same.long())) < 0.05
    threshold = id_encoder.same_person_threshold
    assert threshold is not None and -1.0 < threshold < 1.0
    assert (genuine >= threshold).float().mean() > 0.9 and (impostor < threshold).float().mean() > 0.95


def test_evaluation_regressor_recovers_held_out_expressions_and_agrees_with_the_training_one(
    expr_regressor: WorldExpressionRegressor,
) -> None:
    images, exprs = _renders(HELD_OUT + 1000 + np.arange(96), seed=2)
    truth = torch.from_numpy(exprs).float()
    train_expr = build_expression_analyser(TRAINING_ANALYSERS["expression"])
    with torch.no_grad():
        pred = expr_regressor(images)
        blurred = expr_regressor(gaussian_blur(images, 0.8).clamp(0, 1))
        reference = train_expr(images)
    errors = {"clean": float((pred - truth).abs().mean()), "blur": float((blurred - truth).abs().mean())}
    assert errors["clean"] < CLEAN_MAX and errors["blur"] < BLUR_MAX, errors
    # the two regressors, trained apart, read the same expressions (gaze, the hardest, included)
    agreement = PearsonCorrCoef(num_outputs=10)(pred, reference)
    assert float(agreement.mean()) > 0.9 and float(agreement.min()) > 0.8, agreement


def test_evaluation_pair_reads_what_the_packaged_base_decodes(
    id_encoder: WorldIdentityEncoder, expr_regressor: WorldExpressionRegressor
) -> None:
    """As robust to VAE reconstructions (what every generated image is) as the training pair."""
    from benchmarks.diagnostics.latent_ceiling import vae_reconstruct
    from emojidiff.models.backbone import Backbone
    from emojidiff.packaged import DEFAULT_BACKBONE

    images, exprs = _renders(HELD_OUT + 1000 + np.arange(96), seed=2)
    with torch.no_grad():
        recon = vae_reconstruct(Backbone.from_folder(DEFAULT_BACKBONE), images)
        error = float((expr_regressor(recon) - torch.from_numpy(exprs).float()).abs().mean())
        id_sim = float((id_encoder(recon) * id_encoder(images)).sum(-1).mean())
    assert error < VAE_MAX and id_sim > ID_SIM_MIN, (error, id_sim)
