"""Facial landmarks of world renders, read off the renderer's own geometry (no detector involved).

68 points in dlib's iBUG 300-W order (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, outer lips
48-59, inner lips 60-67), each on the curve the renderer paints: the jaw on the face silhouette,
brow points on the brow's centre line, eye points on the lids, lip points on the lips' outer edges
and the opening. Like a photo's landmarks they carry no iris, so gaze moves none of them, and the
jaw and nose are mostly who the person is. The 5 keypoints are InstantID's (insightface's `kps`):
the two eye centres (the mean of each eye's six lid points, not the pupil), the nose tip and the
two mouth corners.

Coordinates are continuous pixels (x, y) of a `size`-pixel render: pixel (row i, column j) covers
[j, j + 1) x [i, i + 1). The scene's pose (rotation, scale, shift) is applied; the brush style's
hand-drawn wobble (at most ~0.5 % of the image) is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from emojidiff.choices import STYLES

from .expression import Expression
from .identity import Identity
from .render import FRAME, FRAME_CENTRE_Y, MIN_SIZE, _Painter, batch_inputs
from .scene import Scene

__all__ = [
    "FIVE_POINT_NAMES",
    "NUM_LANDMARKS",
    "REGIONS",
    "face_landmarks",
    "five_points",
    "inter_ocular",
    "landmarks68",
    "to_face_frame",
]

NUM_LANDMARKS = 68
#: index ranges of the 68 points by region (iBUG 300-W)
REGIONS: dict[str, range] = {
    "jaw": range(0, 17),
    "brows": range(17, 27),
    "nose": range(27, 36),
    "eyes": range(36, 48),
    "lips": range(48, 68),
}
FIVE_POINT_NAMES = ("eye_left", "eye_right", "nose_tip", "mouth_left", "mouth_right")  # image left/right

# Eye points 36-41 (and 42-47) as offsets from the eye's centre in eye half-widths, and whether the
# point is on the upper lid: corner, upper lid x2, corner, lower lid x2 (clockwise from image left).
_EYE_DX = (-1.0, -1 / 3, 1 / 3, 1.0, 1 / 3, -1 / 3)
_EYE_UPPER = (False, True, True, False, False, False)
# Lip points as fractions of the mouth's half-width: outer 48-59, inner 60-67.
_OUTER_A = (-1.0, -2 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3, 0.0, -1 / 3, -2 / 3)
_INNER_A = (-1.0, -0.5, 0.0, 0.5, 1.0, 0.5, 0.0, -0.5)


def _painter(identities, expressions, styles: Sequence[str] | str) -> _Painter:
    id_vec, ex_vec, names = batch_inputs(identities, expressions, styles, "landmarks")
    b = id_vec.shape[0]
    style_idx = torch.tensor([STYLES.index(s) for s in names])
    # The smallest grid: only the painter's geometry (its parameters and shape functions) is used.
    return _Painter(id_vec, ex_vec, style_idx, Scene.from_seeds([0] * b), MIN_SIZE)


def _jaw(p: _Painter, iterations: int = 40) -> Tensor:
    """17 points on the face silhouette below the cheek line, on rays from the face centre at
    angles 180° (image left) through 90° (the chin) to 0°, found by bisection: (B, 17, 2)."""
    theta = torch.tensor([math.pi * (1.0 - k / 16.0) for k in range(17)]).view(1, 17)
    cos, sin = torch.cos(theta), torch.sin(theta)
    y_c = p.y_c.view(-1, 1)
    lo = torch.zeros(p.b, 17)
    hi = torch.full((p.b, 17), 1.5)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        inside = p.face_implicit((mid * cos).unsqueeze(-1), (y_c + mid * sin).unsqueeze(-1)).squeeze(-1) < 0
        lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
    r = (lo + hi) / 2
    return torch.stack([r * cos, y_c + r * sin], dim=-1)


def face_landmarks(
    identities: Sequence[Identity] | np.ndarray | Tensor,
    expressions: Sequence[Expression] | np.ndarray | Tensor,
    styles: Sequence[str] | str = "shaded",
) -> Tensor:
    """The 68 landmarks in face-local coordinates (x right, y down; the pose not applied): (B, 68, 2).

    Inputs as `render_batch` takes them; the style matters only through the cel style's larger eyes.
    """
    with torch.no_grad():
        p = _painter(identities, expressions, styles)
        e = p.e

        def flat(t: Tensor) -> Tensor:
            return t.reshape(p.b, -1)

        # brows: image-left brow from its outer end in, image-right brow from its inner end out
        inner, outer = (flat(v) for v in p.brow_span())
        tau_l = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]).view(1, 5).expand(p.b, 5)
        tau_r = tau_l.flip(-1)
        brows = []
        for tau, sign, raise_ in ((tau_l, -1.0, e["brow_raise_l"]), (tau_r, 1.0, e["brow_raise_r"])):
            x = sign * (inner + tau * (outer - inner))
            brows.append(torch.stack([x, flat(p.brow_line(tau.view(p.b, 5, 1), raise_)).view(p.b, 5)], -1))

        # nose: the bridge from the eye line to the tip, then the base from nostril to nostril
        eye_y, nose_y, nose_w = flat(p.eye_y), flat(p.nose_y), flat(p.nose_w)
        k = torch.arange(4.0).view(1, 4) / 3.0
        bridge = torch.stack([torch.zeros(p.b, 4), eye_y + k * (nose_y - 0.01 - eye_y)], -1)
        base_x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).view(1, 5) * nose_w
        base_y = nose_y + torch.tensor([0.0, 0.006, 0.012, 0.006, 0.0]).view(1, 5)
        nose = torch.stack([base_x, base_y], -1)

        # eyes: six lid points each, image-left eye first
        eyes = []
        w = flat(p.eye_w)
        for centre, opening in ((-p.eye_cx, e["eye_open_l"]), (p.eye_cx, e["eye_open_r"])):
            dx = torch.tensor(_EYE_DX).view(1, 6) * w
            upper, lower = p.eye_lids(dx.view(p.b, 6, 1), opening)
            y = torch.where(torch.tensor(_EYE_UPPER).view(1, 6), upper.view(p.b, 6), lower.view(p.b, 6))
            eyes.append(torch.stack([flat(centre) + dx, y], -1))

        # lips: outer contour from the image-left corner clockwise, then the opening's edges
        half = flat(p.mouth_shape(torch.zeros(p.b, 1, 1))["half"])
        lips = []
        for fractions, outer_edge in ((_OUTER_A, True), (_INNER_A, False)):
            a = torch.tensor(fractions)
            x = a.view(1, -1) * half
            m = {key: v.view(p.b, -1) for key, v in p.mouth_shape(x.view(p.b, -1, 1)).items()}
            upper_half = torch.arange(len(fractions)) < len(fractions) // 2
            corner = a.abs() == 1.0
            if outer_edge:
                top, bottom = m["top"] - m["lip_up"], m["bottom"] + m["lip_low"]
            else:
                top, bottom = m["top"], m["bottom"]
            y = torch.where(corner, m["centre"], torch.where(upper_half, top, bottom))
            lips.append(torch.stack([x, y], -1))

        return torch.cat([_jaw(p), *brows, bridge, nose, *eyes, *lips], dim=1)


def landmarks68(
    identities: Sequence[Identity] | np.ndarray | Tensor,
    expressions: Sequence[Expression] | np.ndarray | Tensor,
    styles: Sequence[str] | str = "shaded",
    size: int = 64,
    seeds: Sequence[int] | int = 0,
) -> Tensor:
    """The 68 landmarks of the renders `render_batch` makes from the same arguments, in continuous
    pixel coordinates (x, y) of the `size`-pixel image: (B, 68, 2) float32."""
    local = face_landmarks(identities, expressions, styles)
    b = local.shape[0]
    seed_list = [seeds] * b if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if len(seed_list) != b:
        raise ValueError(f"landmarks68 needs {b} seeds, got {len(seed_list)}")
    scene = Scene.from_seeds(seed_list)
    # The inverse of the painter's pixel -> face-local map (see _Painter.__init__).
    zoom = FRAME / scene.scale.view(b, 1)
    u, v = local[..., 0] / zoom, (local[..., 1] - FRAME_CENTRE_Y) / zoom
    cos, sin = torch.cos(scene.rotation.view(b, 1)), torch.sin(scene.rotation.view(b, 1))
    img_x = cos * u - sin * v + scene.shift_x.view(b, 1)
    img_y = sin * u + cos * v + scene.shift_y.view(b, 1)
    return torch.stack([(img_x + 1.0) * 0.5 * size, (img_y + 1.0) * 0.5 * size], dim=-1)


def five_points(landmarks: Tensor) -> Tensor:
    """(B, 68, 2) landmarks -> (B, 5, 2) InstantID keypoints in `FIVE_POINT_NAMES` order."""
    if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"five_points needs (B, 68, 2) landmarks, got {tuple(landmarks.shape)}")
    return torch.stack(
        [
            landmarks[:, 36:42].mean(1),
            landmarks[:, 42:48].mean(1),
            landmarks[:, 30],
            landmarks[:, 48],
            landmarks[:, 54],
        ],
        dim=1,
    )


def inter_ocular(landmarks: Tensor) -> Tensor:
    """(B, 68, 2) -> (B,) distance between the outer eye corners (points 36 and 45, the 300-W convention)."""
    return (landmarks[:, 45] - landmarks[:, 36]).norm(dim=-1)


def to_face_frame(landmarks: Tensor) -> Tensor:
    """(B, 68, 2) landmarks in any image frame -> the same in the face's own frame: the eyes' centre
    (the mean of the 12 eye points) at the origin, the outer eye corners (36, 45) level, and their
    distance 1. Any rotation, scale and shift of the image leaves the result unchanged."""
    axis = landmarks[:, 45] - landmarks[:, 36]
    iod = inter_ocular(landmarks)[:, None].clamp_min(1e-6)  # (B, 1)
    c, s = axis[:, 0:1] / iod, axis[:, 1:2] / iod
    rel = landmarks - landmarks[:, 36:48].mean(1, keepdim=True)
    turned = torch.stack([c * rel[..., 0] + s * rel[..., 1], -s * rel[..., 0] + c * rel[..., 1]], -1)
    return turned / iod[..., None]
