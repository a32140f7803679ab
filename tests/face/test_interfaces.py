"""Interfaces of emojidiff.face: registries, warps, aligner/encoder/analyser base behaviour."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from skimage import data

import emojidiff.face as face
from emojidiff.errors import FaceNotFoundError
from emojidiff.face.base import (
    AlignedFace,
    ExpressionAnalyser,
    FaceDetection,
    IdentityEncoder,
    as_rgb_uint8,
    images_to_tensor,
    warp_faces,
    warp_image,
)


@functools.cache
def astronaut() -> np.ndarray:
    return data.astronaut()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return images_to_tensor([image])


# ------------------------------------------------------------------------------------ registry


def test_registries_hold_every_real_backend():
    assert {"dlib-chip", "dlib-ffhq", "arcface-112"} <= set(face.FACE_ALIGNERS.names())
    assert {"dlib", "insightface-arcface", "arcface-torch"} <= set(face.IDENTITY_ENCODERS.names())
    assert {"dlib-lms", "mediapipe-blendshapes"} <= set(face.EXPRESSION_ANALYSERS.names())


def test_build_by_name_with_init_args():
    aligner = face.build_face_aligner(
        {"name": "dlib-chip", "init_args": {"output_size": 200, "padding": 0.3}}
    )
    assert aligner.output_size == 200 and aligner.padding == 0.3
    assert aligner.align(astronaut()).crop.shape == (200, 200, 3)
    encoder = face.build_identity_encoder("dlib")
    assert (encoder.embedding_dim, encoder.input_size, encoder.aligner_name) == (128, 150, "dlib-chip")
    analyser = face.build_expression_analyser({"name": "dlib-lms", "init_args": {"on_missing": "nan"}})
    assert analyser.on_missing == "nan" and analyser.descriptor_dim == len(analyser.names)


def test_unknown_name_is_a_clear_key_error():
    with pytest.raises(KeyError, match=r"unknown identity encoder 'arcfase'.*dlib"):
        face.build_identity_encoder("arcfase")
    with pytest.raises(KeyError, match="unknown face aligner"):
        face.build_face_aligner({"name": "nope"})
    with pytest.raises(ValueError, match="init_args"):
        face.build_expression_analyser({"name": "dlib-lms", "args": {}})


def test_mediapipe_is_an_optional_extra():
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'emojidiff\[mediapipe\]'"):
            face.build_expression_analyser(
                {"name": "mediapipe-blendshapes", "init_args": {"model_asset_path": "x"}}
            )
    else:
        pytest.skip("mediapipe is installed; the real FaceLandmarker path needs a local .task file")


# ------------------------------------------------------------------------------------ images


def test_as_rgb_uint8_accepts_gray_float_and_rgba():
    gray = np.full((4, 5), 7, np.uint8)
    assert as_rgb_uint8(gray).shape == (4, 5, 3)
    assert as_rgb_uint8(np.full((4, 5, 3), 0.5, np.float32))[0, 0, 0] == 128
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 3] = 255
    assert as_rgb_uint8(rgba).shape == (4, 5, 3) and as_rgb_uint8(rgba).max() == 0
    with pytest.raises(ValueError):
        as_rgb_uint8(np.zeros((4, 5, 2), np.uint8))


# ------------------------------------------------------------------------------------ warps


@pytest.mark.parametrize("name", ["dlib-chip", "arcface-112", "dlib-ffhq"])
def test_warp_faces_reproduces_the_aligned_crop(name):
    aligned = face.build_face_aligner(name).align(astronaut(), "astronaut")
    crop = warp_faces(
        to_tensor(astronaut()), torch.from_numpy(aligned.transform)[None], aligned.crop.shape[0]
    )
    diff = (crop[0].permute(1, 2, 0) * 255 - torch.from_numpy(aligned.crop).float()).abs()
    assert diff.mean() < 0.5 and diff.max() <= 2.0


def test_warp_paths_agree_and_antialias_when_shrinking():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    shrink = np.array([[0.25, 0.0, -2.0], [0.0, 0.25, -3.0]], np.float32)  # 4x smaller, inside
    smooth = warp_image(noise, shrink, 48)
    aliased = warp_image(noise, shrink, 48, antialias=False)
    torch_crop = warp_faces(to_tensor(noise), shrink[None], 48)[0].permute(1, 2, 0) * 255
    assert np.abs(torch_crop.numpy() - smooth).max() <= 1.5
    # box pooling 4x4 divides the variance of white noise by ~16; plain bilinear sampling keeps it
    assert smooth.std() < 0.4 * aliased.std()


def test_warp_faces_is_differentiable_and_local():
    aligned = face.build_face_aligner("arcface-112").align(astronaut())
    image = to_tensor(astronaut()).requires_grad_(True)
    warp_faces(image, aligned.transform[None], 112).sum().backward()
    grad = image.grad[0].abs().sum(0)
    x0, y0, x1, y1 = aligned.detection.box.astype(int)
    assert grad[y0:y1, x0:x1].sum() > 0
    assert grad[:, :40].sum() == 0 and grad[-40:].sum() == 0  # far from the face: no influence


# ------------------------------------------------------------------------------------ aligners


def test_align_raises_naming_the_image_and_align_batch_can_skip():
    aligner = face.build_face_aligner("dlib-chip")
    grey = np.full((512, 512, 3), 128, np.uint8)
    with pytest.raises(FaceNotFoundError, match="grey.png") as info:
        aligner.align(grey, "grey.png")
    assert info.value.image == "grey.png"
    with pytest.raises(FaceNotFoundError, match="blank-1"):
        aligner.align_batch([astronaut(), grey], names=["astro", "blank-1"])
    out = aligner.align_batch(
        to_tensor(astronaut()).repeat(2, 1, 1, 1) * torch.tensor([1.0, 0.0]).view(2, 1, 1, 1),
        on_missing="none",
    )
    assert isinstance(out[0], AlignedFace) and out[1] is None


def test_aligned_landmarks_are_the_detection_mapped_by_the_transform():
    aligned = face.build_face_aligner("dlib-chip").align(astronaut())
    det = aligned.detection
    assert isinstance(det, FaceDetection) and det.area > 0
    src = np.hstack([det.landmarks, np.ones((len(det.landmarks), 1), np.float32)])
    np.testing.assert_allclose(aligned.landmarks, src @ aligned.transform.T, atol=1e-3)
    assert aligned.transform.shape == (2, 3) and aligned.transform.dtype == np.float32


# ------------------------------------------------------------------------------------ models


class _MeanColour(IdentityEncoder):
    embedding_dim, input_size, differentiable, aligner_name = 3, 8, True, "none"

    def embed(self, images):
        assert images.shape[-2:] == (8, 8)
        return images.mean(dim=(2, 3)) * 10


class _Brightness(ExpressionAnalyser):
    descriptor_dim, names, differentiable, aligner_name = 2, ["mean", "max"], True, "none"

    def describe(self, images):
        return torch.stack([images.mean(dim=(1, 2, 3)), images.amax(dim=(1, 2, 3))], dim=1)


def test_identity_encoder_base_resizes_and_normalises():
    enc = _MeanColour()
    x = torch.rand(4, 3, 30, 20, requires_grad=True)
    emb = enc(x)
    assert emb.shape == (4, 3) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    sim = enc.similarity(emb, emb.flip(0))
    assert sim.shape == (4,) and torch.allclose(enc.similarity(emb, emb), torch.ones(4))
    emb.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.rand(3, 8, 8))


def test_expression_analyser_default_distance_is_mean_abs():
    ana = _Brightness()
    a, b = torch.tensor([[0.0, 1.0], [0.5, 0.5]]), torch.tensor([[1.0, 0.0], [0.5, 0.7]])
    torch.testing.assert_close(ana.distance(a, b), torch.tensor([1.0, 0.1]))
    assert ana(torch.rand(2, 3, 5, 5)).shape == (2, 2)
