"""ArcFace ONNX encoder (on a tiny random graph of the same signature) and the ArcFace 112 crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.transform import SimilarityTransform

import emojidiff.face as face
from emojidiff.errors import MissingWeightsError
from emojidiff.face.base import images_to_tensor
from emojidiff.face.insightface_backend import (
    ARCFACE_TEMPLATE_112,
    ArcFaceONNXEncoder,
    arcface_transform,
    five_points_from_68,
    umeyama_similarity,
)


def landmarks68(image: np.ndarray) -> np.ndarray:
    aligner = face.build_face_aligner({"name": "dlib-chip", "init_args": {"landmarks": 68}})
    return aligner.detect(image)[0].landmarks


def reference_embedding(params: dict[str, np.ndarray], net_input: torch.Tensor) -> torch.Tensor:
    h = F.conv2d(net_input, torch.from_numpy(params["conv_w"]), stride=8).flatten(1)
    return F.normalize(h @ torch.from_numpy(params["fc_w"]).T + torch.from_numpy(params["fc_b"]), dim=1)


@pytest.fixture(scope="module")
def arcface_crops(photo) -> torch.Tensor:
    aligner = face.build_face_aligner("arcface-112")
    return images_to_tensor(
        [aligner.align(photo("astronaut")).crop, aligner.align(photo("Tom_Hanks_54745.png")).crop]
    )


# ------------------------------------------------------------------------------------ geometry


def test_umeyama_matches_skimage():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 200, (5, 2))
    dst = src @ np.array([[0.8, -0.3], [0.3, 0.8]]).T + [10, -4] + rng.normal(0, 1, (5, 2))
    tform = SimilarityTransform.from_estimate(src, dst)
    np.testing.assert_allclose(umeyama_similarity(src, dst), tform.params[:2], atol=1e-8)


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # inside insightface
def test_arcface_crop_is_insightface_norm_crop(photo):
    from insightface.utils import face_align

    points = five_points_from_68(landmarks68(photo("astronaut")))
    np.testing.assert_allclose(arcface_transform(points), face_align.estimate_norm(points), atol=1e-4)
    aligned = face.build_face_aligner("arcface-112").align(photo("astronaut"))
    reference = face_align.norm_crop(photo("astronaut"), points)
    assert np.abs(aligned.crop.astype(int) - reference).max() <= 1
    # the five points land near ArcFace's template (her broad smile pulls the mouth corners out)
    error = np.linalg.norm(aligned.landmarks - ARCFACE_TEMPLATE_112, axis=1)
    assert error[:3].max() < 4.5 and error[3:].max() < 8.0
    np.testing.assert_allclose(
        arcface_transform(points, 224), face_align.estimate_norm(points, 224), atol=1e-4
    )
    with pytest.raises(ValueError, match="112"):
        arcface_transform(points, 100)


def test_five_points_follow_the_template_order(photo):
    points = five_points_from_68(landmarks68(photo("t1.jpg")))
    assert points[0, 0] < points[2, 0] < points[1, 0]  # eyes either side of the nose
    assert points[3, 0] < points[4, 0] and points[3:, 1].min() > points[2, 1]  # mouth below the nose


# ------------------------------------------------------------------------------------ ONNX encoder


def test_onnx_encoder_preprocessing_matches_manual_and_insightface(
    tmp_path, tiny_recognition_onnx, arcface_crops
):
    params = tiny_recognition_onnx(tmp_path / "tiny_rec.onnx")
    enc = face.build_identity_encoder(
        {"name": "insightface-arcface", "init_args": {"model_dir": str(tmp_path)}}
    )
    assert isinstance(enc, ArcFaceONNXEncoder) and enc.model_file.name == "tiny_rec.onnx"  # auto-picked
    assert (enc.input_size, enc.embedding_dim, enc.aligner_name, enc.differentiable) == (
        112,
        512,
        "arcface-112",
        False,
    )
    crops = arcface_crops
    emb = enc(crops)
    assert emb.shape == (2, 512) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    # manual reference: RGB, (x*255 - 127.5) / 127.5
    torch.testing.assert_close(
        emb, reference_embedding(params, (crops * 255 - 127.5) / 127.5), atol=1e-4, rtol=1e-4
    )
    # insightface's own ArcFaceONNX on the same crops as OpenCV BGR uint8 images
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    theirs = ArcFaceONNX(model_file=str(tmp_path / "tiny_rec.onnx"))
    bgr = [
        np.ascontiguousarray(c[:, :, ::-1]) for c in (crops.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    ]
    ref = F.normalize(torch.from_numpy(theirs.get_feat(bgr)), dim=1)
    torch.testing.assert_close(emb, ref, atol=1e-4, rtol=1e-4)
    # a 2x crop is resized to 112 first
    big = F.interpolate(crops, scale_factor=2, mode="bilinear")
    assert (enc(big) * emb).sum(1).min() > 0.99


def test_onnx_encoder_mxnet_graph_gets_raw_pixels(tmp_path, tiny_recognition_onnx, arcface_crops):
    tiny_recognition_onnx(tmp_path / "w600k_r50.onnx", mxnet_style=True, seed=3)
    enc = face.build_identity_encoder(
        {"name": "insightface-arcface", "init_args": {"model_file": str(tmp_path / "w600k_r50.onnx")}}
    )
    assert (enc.input_mean, enc.input_std) == (0.0, 1.0)
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    theirs = ArcFaceONNX(model_file=str(tmp_path / "w600k_r50.onnx"))
    assert (theirs.input_mean, theirs.input_std) == (0.0, 1.0)
    crops = arcface_crops
    bgr = [
        np.ascontiguousarray(c[:, :, ::-1]) for c in (crops.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    ]
    ref = F.normalize(torch.from_numpy(theirs.get_feat(bgr)), dim=1)
    torch.testing.assert_close(enc(crops), ref, atol=1e-4, rtol=1e-4)


def test_known_file_names_win_over_the_scan(tmp_path, tiny_recognition_onnx):
    tiny_recognition_onnx(tmp_path / "aaa_other.onnx", seed=1)
    tiny_recognition_onnx(tmp_path / "glintr100.onnx", seed=2)
    enc = ArcFaceONNXEncoder(model_dir=tmp_path)
    assert enc.model_file.name == "glintr100.onnx"


def test_onnx_missing_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="`model_dir` is not set") as info:
        face.build_identity_encoder("insightface-arcface")
    assert info.value.key == "model_dir"
    with pytest.raises(MissingWeightsError, match=r"glintr100\.onnx, w600k_r50\.onnx"):
        ArcFaceONNXEncoder(model_dir=tmp_path)
    with pytest.raises(MissingWeightsError, match="`model_file`.*nope.onnx"):
        ArcFaceONNXEncoder(model_file=tmp_path / "nope.onnx")
    with pytest.raises(MissingWeightsError, match="`scrfd_model_dir`.*det_10g.onnx"):
        face.build_face_aligner(
            {"name": "arcface-112", "init_args": {"detector": "scrfd", "scrfd_model_dir": str(tmp_path)}}
        )


def test_bgr_would_change_the_embedding(tmp_path, tiny_recognition_onnx, arcface_crops):
    """Guards the channel order: a swapped input gives a different embedding on a real face."""
    params = tiny_recognition_onnx(tmp_path / "tiny_rec.onnx")
    crops = arcface_crops
    enc = ArcFaceONNXEncoder(model_file=tmp_path / "tiny_rec.onnx")
    swapped = reference_embedding(params, (crops.flip(1) * 255 - 127.5) / 127.5)
    assert (enc(crops) - swapped).abs().max() > 1e-2
