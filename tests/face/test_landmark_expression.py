"""The LMS landmark expression descriptor: directions of change, mirror symmetry, invariances."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import pytest
import torch
from skimage import data

import emojidiff.face as face
from emojidiff.errors import FaceNotFoundError
from emojidiff.face.base import images_to_tensor
from emojidiff.face.landmark_expression import (
    LMS_MIRROR,
    LMS_NAMES,
    DlibLMSAnalyser,
    lms_descriptor,
    mirror_landmarks68,
)

IDX = {n: i for i, n in enumerate(LMS_NAMES)}


@functools.cache
def analyser() -> DlibLMSAnalyser:
    return face.build_expression_analyser("dlib-lms")


@functools.cache
def astronaut_landmarks() -> np.ndarray:
    return analyser().landmarks(images_to_tensor([data.astronaut()]))[0]


def changed(lm: np.ndarray) -> np.ndarray:
    """Descriptor difference of modified landmarks `lm` from the astronaut's."""
    return lms_descriptor(lm)[0] - lms_descriptor(astronaut_landmarks())[0]


def test_names_and_mirror_permutation():
    assert len(LMS_NAMES) == analyser().descriptor_dim == 12 and analyser().names == LMS_NAMES
    assert [LMS_MIRROR[i] for i in LMS_MIRROR] == list(range(12))
    assert LMS_NAMES[LMS_MIRROR[IDX["eye_open_r"]]] == "eye_open_l"
    assert LMS_MIRROR[IDX["mouth_open"]] == IDX["mouth_open"]


def test_opening_the_mouth_moves_the_mouth_components_only():
    lm = astronaut_landmarks().copy()
    iod = np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0))
    lm[[65, 66, 67] + list(range(55, 60)) + list(range(4, 13))] += [0, 0.3 * iod]  # lower lip and jaw drop
    d = changed(lm)
    assert d[IDX["mouth_open"]] > 0.2 and d[IDX["jaw_drop"]] > 0.2 and d[IDX["lip_height"]] > 0.2
    for name in ("eye_open_r", "eye_open_l", "brow_raise_r", "brow_raise_l", "brow_inner_gap", "mouth_width"):
        assert abs(d[IDX[name]]) < 1e-5, name
    closed = astronaut_landmarks().copy()
    closed[65:68] = closed[[63, 62, 61]]  # inner lips touching
    assert lms_descriptor(closed)[0, IDX["mouth_open"]] == pytest.approx(0.0, abs=1e-6)


def test_smile_lifts_the_corners_and_frown_drops_them():
    lift = astronaut_landmarks().copy()
    lift[[48, 54]] -= [0, 5]
    assert changed(lift)[IDX["corner_lift_r"]] > 0.05 and changed(lift)[IDX["corner_lift_l"]] > 0.05
    drop = astronaut_landmarks().copy()
    drop[48] += [0, 5]
    assert changed(drop)[IDX["corner_lift_r"]] < -0.05 and abs(changed(drop)[IDX["corner_lift_l"]]) < 1e-5


def test_raising_the_brows_and_closing_one_eye():
    lm = astronaut_landmarks().copy()
    lm[17:22] -= [0, 6]
    d = changed(lm)
    assert d[IDX["brow_raise_r"]] > 0.05 and abs(d[IDX["brow_raise_l"]]) < 1e-5
    wink = astronaut_landmarks().copy()
    wink[[37, 38]] = wink[[41, 40]]  # subject's right eye (image left) shut
    d = lms_descriptor(wink)[0]
    assert d[IDX["eye_open_r"]] < 0.02 < d[IDX["eye_open_l"]]
    # in the mirror image the shut eye is the subject's left one
    mirrored = lms_descriptor(mirror_landmarks68(wink, 512))[0]
    np.testing.assert_allclose(mirrored, d[LMS_MIRROR], atol=1e-5)
    assert mirrored[IDX["eye_open_l"]] < 0.02 < mirrored[IDX["eye_open_r"]]


def test_invariant_to_rotation_scale_translation():
    lm = astronaut_landmarks()
    angle = np.deg2rad(25)
    rot = 1.7 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = lm @ rot.T + [40, -13]
    np.testing.assert_allclose(lms_descriptor(moved), lms_descriptor(lm), atol=1e-4)
    assert lms_descriptor(np.stack([lm, moved])).shape == (2, 12)
    with pytest.raises(ValueError, match="68, 2"):
        lms_descriptor(lm[:60])


def stretch_mouth(image: np.ndarray, lm: np.ndarray, factor: float) -> np.ndarray:
    """The image with the mouth region stretched vertically by `factor` about the mouth centre."""
    (x0, y0), (x1, y1) = lm[48:68].min(0), lm[48:68].max(0)
    cy, half = (y0 + y1) / 2, (y1 - y0) / 2 * factor + 8
    X0, X1, Y0, Y1 = int(x0 - 10), int(x1 + 10), int(cy - half), int(cy + half)
    src = image[int(cy - (cy - Y0) / factor) : int(cy + (Y1 - cy) / factor), X0:X1]
    out = image.copy()
    out[Y0:Y1, X0:X1] = cv2.resize(src, (X1 - X0, Y1 - Y0), interpolation=cv2.INTER_LINEAR)
    return out


def test_real_photo_stretched_mouth_opens_and_mirror_swaps_sides():
    image = data.astronaut()
    stretched = [stretch_mouth(image, astronaut_landmarks(), f) for f in (1.6, 2.0)]
    batch = images_to_tensor([image, *stretched, np.ascontiguousarray(image[:, ::-1])])
    desc = analyser()(batch)
    assert desc.shape == (4, 12) and desc.dtype == torch.float32
    mouth = desc[:3, IDX["mouth_open"]]
    assert mouth[0] + 0.05 < mouth[1] < mouth[2]
    # the photo's mirror gives (approximately) the side-swapped descriptor
    assert (desc[3] - desc[0, LMS_MIRROR]).abs().mean() < 0.03
    assert (
        analyser().distance(desc[3:], desc[:1, LMS_MIRROR]).item()
        < analyser().distance(desc[2:3], desc[:1]).item()
    )


def test_no_face_raises_or_gives_nan():
    batch = images_to_tensor([data.astronaut(), cv2.resize(data.coffee(), (512, 512))])
    with pytest.raises(FaceNotFoundError, match="image 1"):
        analyser()(batch)
    lenient = face.build_expression_analyser({"name": "dlib-lms", "init_args": {"on_missing": "nan"}})
    desc = lenient(batch)
    assert torch.isfinite(desc[0]).all() and torch.isnan(desc[1]).all()
