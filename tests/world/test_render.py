"""Renderer behaviour: determinism, validation, sizes, masks and the identity/expression split."""

import numpy as np
import pytest
from scipy import ndimage

from emojidiff.world import (
    MAX_SIZE,
    MIN_SIZE,
    PARTS,
    PRESETS,
    STYLES,
    Expression,
    Identity,
    render,
    render_batch,
)

IDENTITIES = [Identity.sample(k) for k in range(8)]


def test_render_is_deterministic_and_seed_varies_the_scene():
    ident, expr = Identity.sample(1), Expression.preset("happy")
    a, mask_a = render(ident, expr, "shaded", 64, seed=3)
    b, mask_b = render(ident, expr, "shaded", 64, seed=3)
    assert (
        a.dtype == np.uint8 and a.shape == (64, 64, 3) and mask_a.dtype == bool and mask_a.shape == (64, 64)
    )
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mask_a, mask_b)
    c, _ = render(ident, expr, "shaded", 64, seed=4)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 2.0


def test_batch_rendering_matches_single_rendering():
    ids, exprs = IDENTITIES[:3], [Expression.sample(s) for s in range(3)]
    batch = render_batch(ids, exprs, ["shaded", "cel", "brush"], size=48, seeds=[5, 6, 7])
    for k, style in enumerate(["shaded", "cel", "brush"]):
        single, _ = render(ids[k], exprs[k], style, 48, seed=5 + k)
        np.testing.assert_array_equal(batch.images[k].numpy(), single)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("size", [MIN_SIZE, 47, 64, 128, 256, MAX_SIZE])
def test_every_style_renders_at_every_size(style, size):
    image, mask = render(Identity.sample(2), Expression.preset("surprised"), style, size, seed=1)
    assert image.shape == (size, size, 3)
    face_fraction = mask.mean()
    assert 0.12 < face_fraction < 0.45, face_fraction
    # not a flat or blown-out picture
    assert 20 < image.std() and 30 < image.mean() < 230


def test_mask_area_is_resolution_independent():
    fractions = [render(Identity.sample(4), Expression(), "cel", s, seed=0)[1].mean() for s in (32, 128, 512)]
    assert max(fractions) - min(fractions) < 0.02


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"size": 31}, "size must be an int in"),
        ({"size": 513}, "size must be an int in"),
        ({"size": 64.0}, "size must be an int in"),
        ({"styles": "oil"}, r"unknown style\(s\) \['oil'\]"),
        ({"seeds": [1, 2, 3]}, "needs 2 seeds"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error):
    args = {"styles": "shaded", "size": 64, "seeds": 0, **kwargs}
    with pytest.raises(ValueError, match=error):
        render_batch(IDENTITIES[:2], [Expression()] * 2, **args)


def test_vector_inputs_are_validated_by_field_name():
    ids = np.stack([i.to_vector() for i in IDENTITIES[:2]])
    exprs = np.stack([Expression().to_vector()] * 2)
    exprs[1, Expression.names().index("mouth_open")] = 1.4
    with pytest.raises(ValueError, match=r"Expression\.mouth_open=1\.4.* \(sample 1\)"):
        render_batch(ids, exprs)
    with pytest.raises(ValueError, match=r"Identity vectors must be \(B, 18\)"):
        render_batch(ids[:, :5], exprs)


def test_mask_covers_the_face_and_only_the_face():
    out = render_batch(
        IDENTITIES, [Expression.sample(s) for s in range(8)], "shaded", 128, list(range(8)), return_parts=True
    )
    features = [PARTS[p] for p in ("eye", "iris", "brow", "nose", "lips", "mouth_interior")]
    for mask, parts in zip(out.masks.numpy(), out.parts.numpy(), strict=True):
        feature_px = np.isin(parts, features)
        assert feature_px.sum() > 100
        assert mask[feature_px].mean() > 0.97  # the features lie inside the mask
        outside = np.isin(parts, [PARTS["background"], PARTS["hair"], PARTS["clothes"], PARTS["ear"]])
        assert mask[outside].mean() < 0.02  # hair, ears, clothes and background are not face


def _render_expressions(ident, exprs, size=128, seed=9):
    return render_batch([ident] * len(exprs), exprs, "shaded", size, [seed] * len(exprs), return_parts=True)


@pytest.mark.parametrize("style", STYLES)
def test_expression_leaves_identity_regions_unchanged(style):
    exprs = (
        [Expression()] + [Expression.preset(p) for p in PRESETS] + [Expression.sample(s) for s in range(6)]
    )
    for ident in IDENTITIES[:4]:
        out = render_batch([ident] * len(exprs), exprs, style, 96, [2] * len(exprs), return_parts=True)
        images, parts = out.images.numpy().astype(int), out.parts.numpy()
        neutral_parts = parts[0]
        for label in ("hair", "ear"):
            region = neutral_parts == PARTS[label]
            assert region.sum() > 20, label
            for k in range(1, len(exprs)):
                np.testing.assert_array_equal(
                    images[k][region], images[0][region], err_msg=f"{label} changed"
                )
        # skin tone: skin that stays skin in every render, away from the moving features and above
        # the mouth (jaw drop moves the chin), keeps its colour
        moving = np.isin(parts, [PARTS[p] for p in ("eye", "iris", "brow", "lips", "mouth_interior")]).any(
            axis=0
        )
        moving = ndimage.binary_dilation(moving, iterations=3)
        skin = (parts == PARTS["skin"]).all(axis=0) & ~moving
        mouth_rows = np.where(np.isin(parts, [PARTS["lips"], PARTS["mouth_interior"]]).any(axis=(0, 2)))[0]
        skin[mouth_rows.min() :] = False
        assert skin.sum() > 200
        for k in range(1, len(exprs)):
            np.testing.assert_array_equal(images[k][skin], images[0][skin], err_msg="skin changed")


def _measure(parts: np.ndarray, image: np.ndarray) -> dict[str, float]:
    """Pixel measurements of expression from a part map (and the image for the pupils)."""
    h, w = parts.shape
    ys, xs = np.mgrid[0:h, 0:w]
    face = np.isin(
        parts, [PARTS[p] for p in ("skin", "eye", "iris", "brow", "nose", "lips", "mouth_interior")]
    )
    face_h = ys[face].max() - ys[face].min()
    cx = xs[face].mean()
    left, right = xs < cx, xs >= cx
    iris, brow = parts == PARTS["iris"], parts == PARTS["brow"]
    eye = iris | (parts == PARTS["eye"])
    mouth = np.isin(parts, [PARTS["lips"], PARTS["mouth_interior"]])
    mx0, mx1 = xs[mouth].min(), xs[mouth].max()
    corner = mouth & ((xs < mx0 + 0.15 * (mx1 - mx0)) | (xs > mx1 - 0.15 * (mx1 - mx0)))
    middle = mouth & (np.abs(xs - (mx0 + mx1) / 2) < 0.1 * (mx1 - mx0))
    brow_l = brow & left
    inner_l = brow_l & (xs > np.percentile(xs[brow_l], 70))
    outer_l = brow_l & (xs < np.percentile(xs[brow_l], 30))
    return {
        "mouth_open": (parts == PARTS["mouth_interior"]).sum() / face.sum(),
        "jaw_drop": (ys[face].max() - ys[eye].mean()) / face_h,
        "smile": (ys[middle].mean() - ys[corner].mean()) / face_h,
        "eye_open_l": (eye & left).sum() / face.sum(),
        "eye_open_r": (eye & right).sum() / face.sum(),
        "brow_raise_l": (ys[eye & left].mean() - ys[brow & left].mean()) / face_h,
        "brow_raise_r": (ys[eye & right].mean() - ys[brow & right].mean()) / face_h,
        "brow_furrow": (ys[inner_l].mean() - ys[outer_l].mean()) / face_h,
        "gaze_x": (xs[iris & left].mean() - xs[eye & left].mean()) / face_h,
        "gaze_y": (ys[iris & left].mean() - ys[eye & left].mean()) / face_h,
    }


@pytest.mark.parametrize("param", Expression.names())
def test_expression_is_recoverable_across_identities(param):
    """Vary one expression parameter on 8 different identities: a pixel measurement of it rises
    with the parameter for every identity (rank correlation), so identity does not mask it."""
    spec = Expression.param(param)
    levels = np.linspace(spec.low, spec.high, 5)
    base = Expression(eye_open_l=0.8, eye_open_r=0.8, mouth_open=0.5 if param == "smile" else 0.0)
    for ident in IDENTITIES:
        exprs = [base.replace(**{param: float(v)}) for v in levels]
        out = _render_expressions(ident, exprs)
        values = [
            _measure(p, im)[param]
            for p, im in zip(out.parts.numpy(), out.images.numpy().astype(float), strict=True)
        ]
        ranks = np.argsort(np.argsort(values))
        assert np.corrcoef(ranks, np.arange(5))[0, 1] > 0.85, (param, ident, values)


@pytest.mark.parametrize("record, names", [(Identity, Identity.names()), (Expression, Expression.names())])
def test_every_parameter_is_visible(record, names):
    """Moving any single parameter across its range changes the picture."""
    base = (
        Identity.sample(0)
        if record is Identity
        else Expression(eye_open_l=0.8, eye_open_r=0.8, mouth_open=0.4)
    )
    for name in names:
        p = record.param(name)
        lo, hi = (0, len(p.choices) - 1) if p.categorical else (p.low, p.high)
        pair = [base.replace(**{name: lo}), base.replace(**{name: hi})]
        if record is Identity:
            images = render_batch(pair, [Expression()] * 2, "shaded", 96, 0).images.numpy().astype(int)
        else:
            images = render_batch([Identity.sample(0)] * 2, pair, "shaded", 96, 0).images.numpy().astype(int)
        changed = (np.abs(images[0] - images[1]).max(-1) > 12).sum()
        assert changed >= 10, f"{record.__name__}.{name} changes only {changed} pixels of a 96x96 image"
