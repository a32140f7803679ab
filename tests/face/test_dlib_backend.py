"""dlib backend on real photos: detection counts, dlib-identical chips, same/different person."""

from __future__ import annotations

import functools

import dlib
import numpy as np
import pytest
import torch
from skimage import data

import emojidiff.face as face
from emojidiff.errors import FaceNotFoundError, MissingWeightsError
from emojidiff.face.base import images_to_tensor
from emojidiff.face.dlib_backend import DlibFaceEncoder
from emojidiff.face.weights import DLIB_FILES, packaged_dlib_models_dir, require_files

SAME_PERSON = 0.6  # dlib's rule: euclidean distance of raw descriptors


def mirror(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


@functools.cache
def aligner(**kwargs) -> face.FaceAligner:
    return face.build_face_aligner({"name": "dlib-chip", "init_args": kwargs})


@functools.cache
def encoder() -> DlibFaceEncoder:
    return face.build_identity_encoder("dlib")


def descriptors(images: list[np.ndarray]) -> torch.Tensor:
    """Raw dlib descriptors (N, 128) of the largest face of each image."""
    return encoder().descriptors(images_to_tensor([aligner().align(im).crop for im in images]))


def all_descriptors(image: np.ndarray) -> torch.Tensor:
    return encoder().descriptors(images_to_tensor([f.crop for f in aligner().align_all(image)]))


def test_packaged_models_are_found_without_importing_the_package():
    folder = packaged_dlib_models_dir()
    assert folder is not None
    assert all(p.is_file() for p in require_files("models_dir", folder, DLIB_FILES.values()))


def test_hog_finds_every_face(photo):
    t1 = aligner().detect(photo("t1.jpg"))
    assert len(t1) == 6
    areas = [d.area for d in t1]
    assert areas == sorted(areas, reverse=True)
    for det in t1:
        x0, y0, x1, y1 = det.box
        assert det.landmarks.shape == (5, 2)
        inside = (det.landmarks[:, 0] > x0 - 10) & (det.landmarks[:, 0] < x1 + 10)
        inside &= (det.landmarks[:, 1] > y0 - 10) & (det.landmarks[:, 1] < y1 + 10)
        assert inside.all()
    assert len(aligner().detect(photo("astronaut"))) == 1
    assert len(aligner().detect(photo("Tom_Hanks_54745.png"))) == 1


def test_cnn_detector_finds_a_face(photo):
    cnn = aligner(detector="cnn", upsample=1)
    dets = cnn.detect(photo("Tom_Hanks_54745.png"))
    assert len(dets) == 1 and dets[0].score > 0.5


@pytest.mark.parametrize("landmarks", [5, 68])
def test_chip_is_dlibs_own_face_chip(landmarks, photo):
    image = photo("astronaut")
    ours = aligner(landmarks=landmarks).align(image)
    assert ours.detection.landmarks.shape == (landmarks, 2)
    predictor = dlib.shape_predictor(str(packaged_dlib_models_dir() / DLIB_FILES[f"shape{landmarks}"]))
    shape = predictor(image, dlib.get_frontal_face_detector()(image, 0)[0])
    reference = dlib.get_face_chip(image, shape, 150, 0.25)
    assert np.abs(ours.crop.astype(int) - reference).max() <= 1  # rounding only


def test_no_face_raises_naming_the_image():
    with pytest.raises(FaceNotFoundError, match="coffee.png"):
        aligner().align(data.coffee(), "coffee.png")
    with pytest.raises(FaceNotFoundError, match="flat-grey"):
        aligner().align(np.full((300, 300, 3), 127, np.uint8), "flat-grey")


def test_missing_weights_name_the_key_and_files(tmp_path):
    with pytest.raises(MissingWeightsError, match="shape_predictor_5_face_landmarks.dat") as info:
        face.build_face_aligner({"name": "dlib-chip", "init_args": {"models_dir": str(tmp_path)}})
    assert info.value.key == "models_dir" and info.value.path == tmp_path
    with pytest.raises(MissingWeightsError, match=r"`models_dir`.*dlib_face_recognition_resnet_model_v1.dat"):
        face.build_identity_encoder({"name": "dlib", "init_args": {"models_dir": str(tmp_path)}})
    # a folder with the landmark model but not the CNN detector
    (tmp_path / DLIB_FILES["shape5"]).symlink_to(packaged_dlib_models_dir() / DLIB_FILES["shape5"])
    assert (
        face.build_face_aligner({"name": "dlib-chip", "init_args": {"models_dir": str(tmp_path)}}).output_size
        == 150
    )
    with pytest.raises(MissingWeightsError, match="mmod_human_face_detector.dat"):
        face.build_face_aligner(
            {"name": "dlib-chip", "init_args": {"models_dir": str(tmp_path), "detector": "cnn"}}
        )


def test_photo_and_its_mirror_are_the_same_person(photo):
    for name in ("astronaut", "Tom_Hanks_54745.png"):
        raw = descriptors([photo(name), mirror(photo(name))])
        assert (raw[0] - raw[1]).norm() < 0.4 < SAME_PERSON
        emb = encoder()(
            images_to_tensor([aligner().align(photo(name)).crop, aligner().align(mirror(photo(name))).crop])
        )
        assert encoder().similarity(emb[:1], emb[1:]).item() > 0.95


def test_different_people_are_not_the_same_person(photo):
    raw = descriptors([photo("astronaut"), photo("Tom_Hanks_54745.png")])
    assert (raw[0] - raw[1]).norm() > SAME_PERSON
    group = all_descriptors(photo("t1.jpg"))
    dist = torch.cdist(group, group)
    off_diagonal = dist[~torch.eye(6, dtype=torch.bool)]
    assert off_diagonal.min() > SAME_PERSON
    # every face of the mirrored group photo matches exactly one face of the original, closely
    mirrored = all_descriptors(mirror(photo("t1.jpg")))
    cross = torch.cdist(group, mirrored)
    best = cross.argmin(dim=1)
    assert sorted(best.tolist()) == list(range(6))
    assert cross.min(dim=1).values.max() < 0.4
    cosine = torch.nn.functional.normalize(group, dim=1) @ torch.nn.functional.normalize(group, dim=1).T
    assert cosine[~torch.eye(6, dtype=torch.bool)].max() < encoder().same_person_threshold


def test_encoder_output_contract(photo):
    enc = encoder()
    crops = images_to_tensor([f.crop for f in aligner().align_all(photo("t1.jpg"))[:3]])
    emb = enc(crops)
    assert emb.shape == (3, 128) and emb.dtype == torch.float32 and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert not enc.differentiable
    # a larger chip of the same geometry is resized to 150 and embeds the same
    big = images_to_tensor([aligner(output_size=300).align(photo("astronaut")).crop])
    small = images_to_tensor([aligner().align(photo("astronaut")).crop])
    assert enc.similarity(enc(big), enc(small)).item() > 0.98


def test_ffhq_crop_puts_the_eyes_level_and_centred(photo):
    aligned = face.build_face_aligner("dlib-ffhq").align(photo("t1.jpg"))
    lm = aligned.landmarks
    eye_r, eye_l = lm[36:42].mean(0), lm[42:48].mean(0)
    assert aligned.crop.shape == (512, 512, 3)
    assert abs(eye_r[1] - eye_l[1]) < 6  # rotation removed
    assert abs((eye_r[0] + eye_l[0]) / 2 - 256) < 6
    assert 100 < eye_l[0] - eye_r[0] < 129  # the FFHQ quad is at least 4 eye distances wide
