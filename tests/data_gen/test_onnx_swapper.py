"""The "onnx-swapper" alterer on real photos, with random ONNX graphs of inswapper_128's and ArcFace's signatures."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from data_gen.alterers.onnx_swapper import OnnxSwapper, feathered_alpha
from data_gen.base import ALTERERS
from data_gen.sources.folder import FolderSource
from emojidiff.errors import MissingWeightsError
from emojidiff.face import build_face_aligner, build_identity_encoder, warp_image
from emojidiff.face.base import images_to_tensor
from emojidiff.face.insightface_backend import arcface_transform

SIZE = 192


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def targets(tmp_path_factory, photo):
    root = tmp_path_factory.mktemp("photos")
    for person, image in (
        ("astronaut", data.astronaut()),
        ("hanks", photo("Tom_Hanks_54745.png")),
        ("t1", photo("t1.jpg")),
    ):
        (root / person).mkdir()
        Image.fromarray(image).save(root / person / "1.png")
    t = FolderSource(root, size=SIZE).load(range(3))
    assert len(t) == 3 and t.landmarks5 is not None
    return t


class Recorder:
    """Wraps an onnxruntime session and keeps a copy of every feed (the real session still runs)."""

    def __init__(self, session):
        self.session, self.feeds, self.outputs = session, [], []

    def run(self, output_names, feeds):
        self.feeds.append({k: np.array(v) for k, v in feeds.items()})
        out = self.session.run(output_names, feeds)
        self.outputs.append(np.array(out[0]))
        return out

    def __getattr__(self, name):
        return getattr(self.session, name)


# ------------------------------------------------------------------------------------ tests


def test_swap_changes_the_face_only_and_feeds_the_emapped_donor(onnx_models, targets):
    swapper = ALTERERS.build(
        {
            "name": "onnx-swapper",
            "init_args": {
                "model_path": str(onnx_models["swapper"]),
                "identity_encoder": onnx_models["encoder"],
                "feather": 3,
            },
        }
    )
    assert isinstance(swapper, OnnxSwapper)
    np.testing.assert_array_equal(swapper.emap, onnx_models["emap"])
    swapper.session = recorder = Recorder(swapper.session)
    out = swapper.alter(targets, np.random.default_rng(0))

    assert out.images.shape == (3, SIZE, SIZE, 3) and out.images.dtype == np.uint8 and out.ok.all()
    np.testing.assert_array_equal(out.masks, targets.masks)
    assert out.identity_params is None and out.expression_params is None
    donors = [m["donor"] for m in out.meta]
    assert all(d != p for d, p in zip(donors, targets.persons, strict=True))
    assert all(m["alterer"] == "onnx-swapper" and "alter_error" not in m for m in out.meta)

    # an independent embedding of each donor's reference: arcface-112 crop, then the encoder
    encoder, aligner = build_identity_encoder(onnx_models["encoder"]), build_face_aligner("arcface-112")
    row_of = {p: i for i, p in enumerate(targets.persons)}
    for i, feeds in enumerate(recorder.feeds):
        donor = row_of[donors[i]]
        emb = encoder(images_to_tensor([aligner.align(targets.references[donor]).crop])).numpy()[0]
        latent = emb @ onnx_models["emap"].astype(np.float64)
        expected = latent / np.linalg.norm(latent)
        np.testing.assert_allclose(feeds["source"][0], expected, atol=2e-4)
        np.testing.assert_allclose(swapper.source_vector(emb)[0], expected, atol=1e-5)
        assert abs(np.linalg.norm(emb) - 1) < 1e-5 and (
            np.abs(expected - emb).max() > 0.05
        )  # the emap matters
        # the target input is the ArcFace 128 crop of the target's five points, RGB in [0, 1]
        crop = warp_image(targets.images[i], arcface_transform(targets.landmarks5[i], 128), 128)
        assert feeds["target"].shape == (1, 3, 128, 128)
        np.testing.assert_allclose(feeds["target"][0].transpose(1, 2, 0) * 255, crop, atol=1e-3)

    for i in range(3):
        changed = np.abs(out.images[i].astype(int) - targets.images[i]).max(-1) > 0
        assert not changed[targets.masks[i] == 0].any()  # outside the face mask: untouched
        inner = feathered_alpha(targets.masks[i], 3) == 1.0
        assert changed[inner].mean() > 0.9  # inside: repainted
        # ... by the session's own output, warped back with the inverse crop transform
        inverse = cv2.invertAffineTransform(arcface_transform(targets.landmarks5[i], 128))
        fake = np.clip(recorder.outputs[i][0].transpose(1, 2, 0) * 255, 0, 255)
        back = cv2.warpAffine(fake, inverse, (SIZE, SIZE), flags=cv2.INTER_LINEAR)
        covered = cv2.warpAffine(np.ones((128, 128), np.float32), inverse, (SIZE, SIZE)) > 0.999
        both = inner & covered
        assert both.sum() > 0.1 * inner.sum()
        assert np.abs(out.images[i][both] - back[both]).mean() < 1.0


def test_same_rng_same_templates_and_detection_without_landmarks(onnx_models, targets):
    swapper = OnnxSwapper(onnx_models["swapper"], onnx_models["encoder"])
    a = swapper.alter(targets, np.random.default_rng(7))
    b = swapper.alter(targets, np.random.default_rng(7))
    np.testing.assert_array_equal(a.images, b.images)
    assert [m["donor"] for m in a.meta] == [m["donor"] for m in b.meta]
    # without the source's points, the configured aligner finds them again (same photo, same face)
    c = swapper.alter(replace(targets, landmarks5=None), np.random.default_rng(7))
    assert c.ok.all() and np.abs(c.images.astype(int) - a.images).mean() < 2.0


def test_rows_without_a_face_are_not_ok(onnx_models, targets):
    grey = np.full_like(targets.images[0], 120)
    broken = replace(
        targets,
        images=np.stack([targets.images[0], targets.images[1], grey]),
        references=np.stack([targets.references[0], grey, targets.references[2]]),
        landmarks5=None,
    )
    swapper = OnnxSwapper(onnx_models["swapper"], onnx_models["encoder"], donor_image="reference")
    rng = np.random.default_rng(3)
    out = swapper.alter(broken, rng)
    donors = [m["donor"] for m in out.meta]
    for i, m in enumerate(out.meta):
        if i == 2:
            assert not out.ok[i] and "target" in m["alter_error"]
        elif donors[i] == broken.persons[1]:
            assert not out.ok[i] and "donor" in m["alter_error"]
        else:
            assert out.ok[i] and "alter_error" not in m
    np.testing.assert_array_equal(out.images[2], grey)


def test_missing_swapper_names_the_config_key(tmp_path, onnx_models):
    with pytest.raises(MissingWeightsError, match=r"`model_path`.*nope\.onnx") as info:
        OnnxSwapper(tmp_path / "nope.onnx", onnx_models["encoder"])
    assert info.value.key == "model_path"
    with pytest.raises(MissingWeightsError, match="`model_path` is not set"):
        ALTERERS.build(
            {"name": "onnx-swapper", "init_args": {"model_path": None, "identity_encoder": "dlib"}}
        )


def test_feathered_alpha_stays_inside_the_mask():
    mask = np.zeros((40, 40), np.float32)
    cv2.circle(mask, (20, 20), 12, 1, -1)
    mask[0:6, 0:10] = 1  # touching the border
    alpha = feathered_alpha(mask, 3)
    assert alpha.dtype == np.float32 and alpha.min() >= 0 and alpha.max() <= 1
    assert not alpha[mask == 0].any() and alpha[20, 20] == pytest.approx(1.0)
    assert 0 < alpha[20, 9] < 1  # a soft edge
    torch.testing.assert_close(torch.from_numpy(feathered_alpha(mask, 0)), torch.from_numpy(mask))
