"""The world's landmarks: on the painted parts, moved by the expression parameters that move those
parts and by nothing else, carried by the scene's pose alone."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from emojidiff.world import PARTS, STYLES, Expression, Identity, render_batch
from emojidiff.world.landmarks import REGIONS, five_points, landmarks68, to_face_frame
from emojidiff.world.scene import Scene

SIZE = 128


def _distance_to(part_mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Pixels from each (x, y) point to the nearest pixel of the mask (0 inside it)."""
    dist = ndimage.distance_transform_edt(~part_mask)
    cols = np.clip(points[:, 0].astype(int), 0, part_mask.shape[1] - 1)
    rows = np.clip(points[:, 1].astype(int), 0, part_mask.shape[0] - 1)
    return dist[rows, cols]


def test_landmarks_lie_on_the_parts_the_renderer_paints():
    """Checked against the renderer's part-label map, an independent record of where it painted."""
    n = 12
    ids = [Identity.sample(k) for k in range(n)]
    exprs = [Expression.sample(100 + k) for k in range(n)]
    styles = [STYLES[k % 3] for k in range(n)]
    seeds = list(range(40, 40 + n))
    out = render_batch(ids, exprs, styles, size=SIZE, seeds=seeds, return_parts=True)
    lms = landmarks68(ids, exprs, styles, SIZE, seeds).numpy()
    for b in range(n):
        parts = out.parts[b].numpy()
        face = out.masks[b].numpy() | np.isin(
            parts, [PARTS[p] for p in ("skin", "nose", "lips", "eye", "brow")]
        )
        edge = face ^ ndimage.binary_erosion(face)
        eyes = np.isin(parts, [PARTS["eye"], PARTS["iris"]])
        lips = np.isin(parts, [PARTS["lips"], PARTS["mouth_interior"]])
        # brush wobble moves paint up to ~0.6 px at this size; hair may cover the jaw's top ends
        assert np.median(_distance_to(edge, lms[b, 2:15])) < 1.5, f"jaw off the face outline in image {b}"
        if exprs[b].eye_open_l > 0.15 and exprs[b].eye_open_r > 0.15:
            assert _distance_to(eyes, lms[b, 36:48]).max() < 2.0, f"eye points off the eyes in image {b}"
        assert _distance_to(parts == PARTS["brow"], lms[b, 17:27]).max() < 2.0, (
            f"brow points off the brows in image {b}"
        )
        assert _distance_to(lips, lms[b, 48:68]).max() < 2.0, f"lip points off the lips in image {b}"


def _moved(base: Expression, **change: float) -> np.ndarray:
    """Per point, how far (px) the landmarks move when `change` is applied to `base`."""
    ident = Identity.sample(7)
    other = dataclasses.replace(base, **change)
    lms = landmarks68([ident, ident], [base, other], "shaded", SIZE, 3).numpy()
    return np.linalg.norm(lms[1] - lms[0], axis=-1)


def test_a_smile_moves_the_mouth_corners_up_and_nothing_above_the_mouth():
    ident = Identity.sample(7)
    base, smile = Expression(), Expression(smile=1.0)
    lms = landmarks68([ident, ident], [base, smile], "shaded", SIZE, 0).numpy()
    for corner in (48, 54):
        assert lms[1, corner, 1] < lms[0, corner, 1] - 2.0  # up (y down the image) by over 2 px
    moved = _moved(base, smile=1.0)
    assert (
        moved[
            list(REGIONS["brows"]) + list(REGIONS["eyes"]) + list(REGIONS["nose"]) + list(REGIONS["jaw"])
        ].max()
        < 1e-4
    )


@pytest.mark.parametrize("gaze", [{"gaze_x": 1.0}, {"gaze_y": -1.0}, {"gaze_x": -0.7, "gaze_y": 0.8}])
def test_gaze_moves_no_landmark(gaze):
    assert _moved(Expression.preset("sad"), **gaze).max() < 1e-4


def test_each_eye_and_brow_moves_its_own_points():
    eye_l = _moved(Expression(), eye_open_l=1.0)
    assert eye_l[[37, 38]].min() > 1.0  # the upper lid rises (the renderer's lower lid stays)
    assert np.delete(eye_l, [37, 38]).max() < 1e-4
    brow_r = _moved(Expression(), brow_raise_r=1.0)
    assert brow_r[22:27].min() > 2.0 and np.delete(brow_r, range(22, 27)).max() < 1e-4
    jaw = _moved(Expression(), jaw_drop=1.0)
    assert jaw[8] > 2.0  # the chin drops
    assert jaw[list(REGIONS["eyes"]) + list(REGIONS["brows"])].max() < 1e-4


def test_scene_seeds_move_the_landmarks_only_by_the_scene_pose():
    """Two seeds of one face: the landmarks are one similarity transform (the pose jitter) apart,
    fitted independently here by least squares, and that transform is the scenes' relative pose."""
    ident, expr = Identity.sample(3), Expression.preset("wink")
    seeds = [11, 12]
    lms = landmarks68([ident, ident], [expr, expr], "shaded", SIZE, seeds).numpy().astype(np.float64)
    a, b = lms[0], lms[1]
    # b = s R a + t, fitted as complex numbers: z_b = c z_a + t
    za, zb = a[:, 0] + 1j * a[:, 1], b[:, 0] + 1j * b[:, 1]
    design = np.stack([za, np.ones_like(za)], 1)
    (c, t), *_ = np.linalg.lstsq(design, zb, rcond=None)
    assert np.abs(design @ np.array([c, t]) - zb).max() < 1e-3
    scene = Scene.from_seeds(seeds)
    rot = float(scene.rotation[1] - scene.rotation[0])
    scale = float(scene.scale[1] / scene.scale[0])
    assert np.angle(c) == pytest.approx(rot, abs=1e-5)
    assert abs(c) == pytest.approx(scale, rel=1e-5)
    assert np.abs(za - zb).max() > 1.0  # the pose did move them
    # the face frame takes the pose out: the two seeds' landmarks coincide there
    framed = to_face_frame(torch.from_numpy(lms))
    torch.testing.assert_close(framed[0], framed[1], atol=1e-5, rtol=0)
    assert float(framed[0, 36, 1] - framed[0, 45, 1]) == pytest.approx(0.0, abs=1e-6)  # the eye line is level
    assert float((framed[0, 45] - framed[0, 36]).norm()) == pytest.approx(1.0, abs=1e-5)


def test_five_points_are_the_eye_centres_nose_tip_and_mouth_corners():
    lms = torch.rand(2, 68, 2)
    kps = five_points(lms)
    torch.testing.assert_close(kps[:, 0], lms[:, 36:42].mean(1))
    torch.testing.assert_close(kps[:, 1], lms[:, 42:48].mean(1))
    torch.testing.assert_close(kps[:, 2:], lms[:, [30, 48, 54]])
    with pytest.raises(ValueError, match="68"):
        five_points(torch.rand(2, 5, 2))
