"""The coarse controls peers use, as expression encoders: landmarks and an emotion label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emojidiff.errors import FaceNotFoundError
from emojidiff.images import to_tensor
from emojidiff.models.bundle import build_expression_encoder, fresh_model
from emojidiff.world import Expression, Identity, render_batch
from emojidiff.world.expression import PRESET_NAMES, nearest_preset
from emojidiff.world.landmarks import landmarks68


def _renders(expressions: list[Expression], seed: int = 5, identity: int = 3) -> torch.Tensor:
    ids = [Identity.sample(identity)] * len(expressions)
    return to_tensor(render_batch(ids, expressions, "shaded", 64, seed).images)


def test_nearest_preset_labels_each_preset_and_measures_intensity_along_it():
    presets = np.stack([Expression.preset(n).to_vector() for n in PRESET_NAMES])
    label, intensity = nearest_preset(torch.from_numpy(presets))
    assert label.tolist() == list(range(len(PRESET_NAMES)))
    neutral, happy = presets[PRESET_NAMES.index("neutral")], presets[PRESET_NAMES.index("happy")]
    half = neutral + 0.5 * (happy - neutral)
    label, intensity = nearest_preset(torch.from_numpy(half[None]))
    assert PRESET_NAMES[int(label)] == "happy" and float(intensity) == pytest.approx(0.5, abs=1e-5)


def test_emotion_label_is_a_one_hot_preset_and_an_intensity_read_off_the_template():
    enc = build_expression_encoder("emotion_label")
    assert not enc.trainable and (enc.num_tokens, enc.feature_dim) == (1, len(PRESET_NAMES) + 1)
    names = ["happy", "surprised", "angry", "sad"]
    features = enc(_renders([Expression.preset(n) for n in names]))
    assert features.shape == (4, 1, len(PRESET_NAMES) + 1)
    onehot, intensity = features[:, 0, :-1], features[:, 0, -1]
    assert (onehot.sum(-1) == 1).all()
    assert [PRESET_NAMES[i] for i in onehot.argmax(-1).tolist()] == names
    assert (intensity > 0.6).all()
    with pytest.raises(ValueError, match="emotion"):
        build_expression_encoder({"name": "emotion_label", "init_args": {"analyser": "dlib-lms"}})


def test_landmark_detector_reads_the_renderers_landmarks_off_the_image():
    """The packaged world-lms detector against the renderer's geometry (its training target, on
    identities and seeds it trained on with probability ~0)."""
    from emojidiff.face.world_landmarks import WorldLandmarkDetector

    exprs = [Expression.sample(900_000 + k) for k in range(16)]
    ids = [Identity.sample(700_000 + k) for k in range(16)]
    seeds = list(range(800_000, 800_016))
    images = to_tensor(render_batch(ids, exprs, "shaded", 64, seeds).images)
    truth = landmarks68(ids, exprs, "shaded", 64, seeds)
    with torch.no_grad():
        found = WorldLandmarkDetector()(images)
    assert found.shape == (16, 68, 2)
    assert float((found - truth).norm(dim=-1).mean()) < 1.5  # pixels of a 64 px portrait


def test_landmark_tokens_change_with_the_template_expression_and_drop_its_pose():
    model = fresh_model(
        "emojidiff:tiny-sd15", "world-id", "landmarks", {"expr_resampler_depth": 0, "num_expr_tokens": 16}
    )
    enc, adapter = model.pipeline.expression_encoder, model.pipeline.adapter
    assert adapter.config.expr_feature_dim == 136 and not enc.trainable
    neutral, surprised = _renders([Expression(), Expression.preset("surprised")])
    with torch.no_grad():
        feats = enc(torch.stack([neutral, surprised]))
        tokens = adapter.expr_proj(feats)
    assert feats.shape == (2, 1, 136) and tokens.shape[:2] == (2, 16)
    assert (tokens[0] - tokens[1]).norm() > 0.05 * tokens[0].norm()
    lms = feats.view(2, 68, 2)
    assert lms[1, 57, 1] - lms[1, 51, 1] > lms[0, 57, 1] - lms[0, 51, 1] + 0.1  # the mouth opened
    five = build_expression_encoder({"name": "landmarks", "init_args": {"points": 5}})
    assert five(neutral[None]).shape == (1, 1, 10)


def test_a_photo_without_a_face_is_named_in_the_error():
    enc = build_expression_encoder({"name": "landmarks", "init_args": {"detector": "dlib-68"}})
    with pytest.raises(FaceNotFoundError, match="image 0"):
        enc(torch.full((1, 3, 128, 128), 0.5))
