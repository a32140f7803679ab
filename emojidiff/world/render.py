"""The procedural portrait renderer of the embedded world.

A portrait is painted back to front from implicit shapes in face-local coordinates (x right,
y down, the face near the origin), all batched over B images at once:

    background -> back hair -> clothes -> neck -> ears -> face -> front hair -> nose -> mouth
    -> eyes -> brows -> (style pass: cel outlines, brush texture)

Identity parameters set shapes and colours; expression parameters move only the eyes, brows,
mouth and chin; the seed sets pose jitter, background, clothes and light. Besides the image,
the renderer returns the face mask (face skin and features, not hair, ears or background) and,
on request, a part-label map (`PARTS`) that tests and data generation use as ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from emojidiff.choices import STYLES

from .expression import Expression
from .identity import Identity
from .palette import BACKGROUND, CLOTHES, HAIR, IRIS, SKIN, pick, ramp
from .params import ParamRecord
from .primitives import NoiseField, coverage, intersect, sd_band, sd_ellipse, smoothstep
from .scene import Scene

MIN_SIZE, MAX_SIZE = 32, 512
# Face-local units per image half-width, and the face-local y at the image centre: a head-and-
# shoulders crop with the hair top near the upper edge.
FRAME, FRAME_CENTRE_Y = 0.82, 0.14

PARTS: dict[str, int] = {
    "background": 0,
    "clothes": 1,
    "hair": 2,
    "neck": 3,
    "ear": 4,
    "skin": 5,
    "nose": 6,
    "lips": 7,
    "mouth_interior": 8,
    "eye": 9,
    "brow": 10,
    "iris": 11,
}

_HAIR_BUZZ, _HAIR_SPIKY, _HAIR_BOB, _HAIR_LONG, _HAIR_BUN = 0, 2, 3, 4, 5


@dataclass
class RenderBatch:
    """Output of `render_batch`: images (B,H,W,3) uint8 RGB, masks (B,H,W) bool,
    parts (B,H,W) uint8 labels from `PARTS` or None."""

    images: Tensor
    masks: Tensor
    parts: Tensor | None = None


def render(
    identity: Identity, expression: Expression, style: str = "shaded", size: int = 64, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One portrait: (uint8 (size, size, 3) RGB image, bool (size, size) face mask).

    Deterministic for its inputs. `size` may be anything from 32 to 512.
    """
    out = render_batch([identity], [expression], [style], size=size, seeds=[seed])
    return out.images[0].numpy(), out.masks[0].numpy()


def render_batch(
    identities: Sequence[Identity] | np.ndarray | Tensor,
    expressions: Sequence[Expression] | np.ndarray | Tensor,
    styles: Sequence[str] | str = "shaded",
    size: int = 64,
    seeds: Sequence[int] | int = 0,
    return_parts: bool = False,
) -> RenderBatch:
    """Render B portraits at once.

    identities: B `Identity` records or a (B, Identity.dim()) array of their vectors.
    expressions: B `Expression` records or a (B, Expression.dim()) array.
    styles: one of `STYLES` for all, or one per image. seeds: one int for all, or one per image.
    """
    id_vec, ex_vec, style_names = batch_inputs(identities, expressions, styles, "render_batch")
    b = id_vec.shape[0]
    seed_list = [seeds] * b if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if len(seed_list) != b:
        raise ValueError(f"render_batch needs {b} seeds, got {len(seed_list)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    style_idx = torch.tensor([STYLES.index(s) for s in style_names])
    with torch.no_grad():
        return _Painter(id_vec, ex_vec, style_idx, Scene.from_seeds(seed_list), int(size)).paint(return_parts)


def batch_inputs(
    identities: Sequence[Identity] | np.ndarray | Tensor,
    expressions: Sequence[Expression] | np.ndarray | Tensor,
    styles: Sequence[str] | str,
    who: str,
) -> tuple[Tensor, Tensor, list[str]]:
    """Validated (B, 18) identity and (B, 10) expression vectors and B style names; errors name `who`."""
    id_vec = _as_vectors(Identity, identities)
    ex_vec = _as_vectors(Expression, expressions)
    b = id_vec.shape[0]
    if ex_vec.shape[0] != b:
        raise ValueError(f"{who} got {b} identities but {ex_vec.shape[0]} expressions")
    style_names = [styles] * b if isinstance(styles, str) else list(styles)
    if len(style_names) != b:
        raise ValueError(f"{who} needs {b} styles, got {len(style_names)}")
    unknown = sorted({s for s in style_names if s not in STYLES})
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; styles: {', '.join(STYLES)}")
    return id_vec, ex_vec, style_names


def _as_vectors(record: type[ParamRecord], values: Sequence[ParamRecord] | np.ndarray | Tensor) -> Tensor:
    """(B, D) float32 tensor from records or an array, validating ranges with the field's name."""
    name = record.__name__
    if isinstance(values, (np.ndarray, Tensor)):
        arr = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != record.dim():
            raise ValueError(f"{name} vectors must be (B, {record.dim()}), got {arr.shape}")
        bad = ~np.isfinite(arr) | (arr < record.lows() - 1e-6) | (arr > record.highs() + 1e-6)
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            p = record.SPACE[col]
            raise ValueError(
                f"{name}.{p.name}={arr[row, col]:.6g} outside [{record.lows()[col]}, {record.highs()[col]}] (sample {row})"
            )
        return torch.from_numpy(arr)
    values = list(values)
    if not values:
        raise ValueError(f"render_batch needs at least one {name}")
    for i, v in enumerate(values):
        if not isinstance(v, record):
            raise TypeError(f"sample {i}: expected {name}, got {type(v).__name__}")
    return torch.from_numpy(np.stack([v.to_vector() for v in values]))


def _col(vec: Tensor, record: type[ParamRecord], name: str) -> Tensor:
    return vec[:, record.names().index(name)].view(-1, 1, 1)


class _Painter:
    """Holds the batch's coordinates and parameters and paints layer by layer."""

    def __init__(self, id_vec: Tensor, ex_vec: Tensor, style_idx: Tensor, scene: Scene, size: int):
        self.b, self.size, self.scene = id_vec.shape[0], size, scene
        self.i = {n: _col(id_vec, Identity, n) for n in Identity.names()}
        self.e = {n: _col(ex_vec, Expression, n) for n in Expression.names()}
        self.style = style_idx.view(-1, 1, 1)
        self.is_cel = (self.style == STYLES.index("cel")).float()
        self.is_brush = (self.style == STYLES.index("brush")).float()

        # Pixel centres in image coordinates [-1, 1], then the inverse pose into face-local ones.
        c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
        gy, gx = torch.meshgrid(c, c, indexing="ij")
        self.img_x, self.img_y = gx.unsqueeze(0), gy.unsqueeze(0)
        dx, dy = self.img_x - scene.shift_x, self.img_y - scene.shift_y
        cos, sin = torch.cos(scene.rotation), torch.sin(scene.rotation)
        zoom = FRAME / scene.scale
        self.x = (cos * dx + sin * dy) * zoom
        self.y = (-sin * dx + cos * dy) * zoom + FRAME_CENTRE_Y
        self.px = (2.0 / size) * zoom
        self.noise = NoiseField(scene.noise_seed) if bool(self.is_brush.any()) else None
        if self.noise is not None:  # hand-drawn wobble: warp the coordinates of brush-style images only
            amp = 0.018 * self.is_brush
            wx, wy = self.noise.sample(self.x, self.y, 4.0, 0), self.noise.sample(self.x, self.y, 4.0, 1)
            self.x, self.y = self.x + amp * (wx - 0.5), self.y + amp * (wy - 0.5)

        self.image = torch.zeros(self.b, 3, size, size)
        self.parts = torch.zeros(self.b, size, size, dtype=torch.uint8)
        self._geometry()

    # ------------------------------------------------------------------ layout
    def _geometry(self) -> None:
        i = self.i
        self.W = 0.34 + 0.10 * i["face_width"]
        self.H_up = 0.50 + 0.10 * i["face_length"]
        self.H_low = 0.40 + 0.08 * i["face_length"] + 0.08 * i["chin_length"]
        self.y_c = torch.full_like(self.W, -0.02)
        self.skin = ramp(SKIN, i["skin_tone"].flatten())
        self.hair = ramp(HAIR, i["hair_colour"].flatten())
        self.eye_w = (0.068 + 0.032 * i["eye_size"]) * (1.0 + 0.22 * self.is_cel)
        self.eye_h = 0.55 * self.eye_w
        self.eye_cx = 0.14 + 0.06 * i["eye_spacing"]
        self.eye_y = self.y_c - 0.07
        self.nose_y = self.y_c + 0.06 + 0.07 * i["nose_length"]
        self.nose_w = 0.024 + 0.036 * i["nose_width"]  # nostril centres' |x|
        chin_y = self.y_c + self.H_low
        self.mouth_y = self.nose_y + 0.35 * (chin_y - self.nose_y)
        self.side = torch.where(self.x < 0, -1.0, 1.0)  # which half of the face a pixel is on
        self.left = self.x < 0

    # ------------------------------------------------------------------ shapes (shared with landmarks.py)
    def face_implicit(self, x: Tensor, y: Tensor) -> Tensor:
        """The face silhouette's implicit function at face-local points x, y (B, ...): < 0 inside."""
        i = self.i
        jaw_p = 2.0 + 2.5 * i["jaw_width"]
        taper = 0.30 * (1.0 - i["jaw_width"])
        v0 = (y - self.y_c) / self.H_low
        # Jaw drop stretches only the lower chin, so ears and cheeks stay where they are.
        h_eff = self.H_low + 0.10 * self.e["jaw_drop"] * smoothstep(0.45, 1.0, v0)
        v = (y - self.y_c) / h_eff
        upper = (x / self.W) ** 2 + ((y - self.y_c) / self.H_up) ** 2 - 1.0
        u = x.abs() / (self.W * (1.0 - taper * v.clamp(0.0, 1.0)))
        # The exponent starts at 2 on the cheek line so the two halves meet without a seam.
        lower = u.pow(2.0 + (jaw_p - 2.0) * smoothstep(0.0, 0.6, v)) + v * v - 1.0
        return torch.where(y < self.y_c, upper, lower)

    def mouth_shape(self, x: Tensor) -> dict[str, Tensor]:
        """The mouth at face-local x (B, ...): "half" its half-width, "centre" the lip line's y,
        "top"/"bottom" the opening's edges, "lip_up"/"lip_low" the lips' thickness at x ("full" scale)."""
        i, e = self.i, self.e
        half = (0.085 + 0.07 * i["mouth_width"]) * (1.0 + 0.12 * e["smile"])
        a = x / half
        st = torch.sqrt((1.0 - a * a).clamp_min(0.0))
        centre = self.mouth_y - 0.06 * e["smile"] * a * a
        opening = 0.07 * e["mouth_open"] + 0.06 * e["jaw_drop"]
        full = st.sqrt()  # lips stay full further towards the corners than the opening does
        return {
            "half": half,
            "st": st,
            "centre": centre,
            "opening": opening,
            "top": centre - 0.3 * opening * st,
            "bottom": centre + 0.7 * opening * st,
            "lip_up": (0.010 + 0.012 * i["lip_thickness"]) * full,
            "lip_low": (0.014 + 0.016 * i["lip_thickness"]) * full,
        }

    def eye_lids(self, dx: Tensor, opening: Tensor) -> tuple[Tensor, Tensor]:
        """(upper, lower) lid y at dx from an eye's centre (B, ...), for the eye's `opening`."""
        h = self.eye_h
        t = (1.0 - (dx / self.eye_w) ** 2).clamp_min(0.0).pow(0.6)
        lower_lid = self.eye_y + 0.45 * h * t
        return lower_lid - 1.45 * h * opening * t, lower_lid

    def brow_span(self) -> tuple[Tensor, Tensor]:
        """(inner, outer) |x| ends of the brows (B, 1, 1)."""
        inner = self.eye_cx - 0.8 * self.eye_w - 0.015 * self.e["brow_furrow"].clamp_min(0.0)
        return inner, self.eye_cx + 1.15 * self.eye_w

    def brow_line(self, tau: Tensor, raise_: Tensor) -> Tensor:
        """The brow's centre-line y at `tau` (0 inner end, 1 outer; B, ...) for a brow raised by `raise_`."""
        i, e = self.i, self.e
        base = self.eye_y - self.eye_h - 0.035
        arch = (0.01 + 0.025 * i["brow_arch"]) * 4.0 * tau * (1.0 - tau)
        return base - 0.05 * raise_ - arch + 0.045 * e["brow_furrow"] * (1.0 - tau) ** 2

    def _shade(self) -> Tensor:
        """(B, 1, H, W) light factor on skin: smooth Lambert (shaded, brush) or two-tone (cel)."""
        nx = self.x / self.W
        ny = (self.y - self.y_c) / torch.where(self.y < self.y_c, self.H_up, self.H_low)
        nz = torch.sqrt((1.0 - nx * nx - ny * ny).clamp_min(0.0))
        light = self.scene.light
        lam = (nx * light[:, 0] + ny * light[:, 1] + nz * light[:, 2]).clamp_min(0.0)
        smooth = 0.70 + 0.34 * lam
        cel = torch.where(lam < 0.55, torch.full_like(lam, 0.86), torch.ones_like(lam))
        return torch.where(self.is_cel.bool(), cel, smooth).unsqueeze(1)

    # ------------------------------------------------------------------ compositing
    def _lay(
        self, colour: Tensor, alpha: Tensor, part: str | None = None, shape: Tensor | None = None
    ) -> None:
        """Paint `colour` ((B,3,1,1) or (B,3,H,W)) with alpha (B,H,W).

        Pixels where the shape's coverage (`shape`, default `alpha`) exceeds 0.5 get label `part`,
        so translucent strokes (cel lips) are still labelled where they are drawn.
        """
        self.image = self.image + (colour - self.image) * alpha.unsqueeze(1)
        if part is not None:
            inside = (alpha if shape is None else shape) > 0.5
            self.parts = torch.where(inside, torch.tensor(PARTS[part], dtype=torch.uint8), self.parts)

    def _outline(self, sdf: Tensor, width: float = 0.011) -> None:
        """Cel ink line along the boundary of a shape (only cel images get it)."""
        ink = coverage(sdf.abs() - width / 2, self.px) * self.is_cel
        self._lay(torch.tensor([0.16, 0.11, 0.12]).view(1, 3, 1, 1), ink)

    def _approx_sdf(self, f: Tensor) -> Tensor:
        """Approximate signed distance from an implicit function via its finite-difference gradient."""
        gy, gx = torch.gradient(f, dim=(-2, -1))
        grad = torch.sqrt(gx * gx + gy * gy).clamp_min(1e-6) / self.px
        return f / grad

    # ------------------------------------------------------------------ layers
    def _background(self) -> None:
        sc = self.scene
        a, b = pick(BACKGROUND, sc.background_a), pick(BACKGROUND, sc.background_b)
        t = (
            self.img_x * torch.cos(sc.background_angle) + self.img_y * torch.sin(sc.background_angle)
        ) * 0.5 + 0.5
        t = (t * (1.0 - self.is_cel)).unsqueeze(1)  # cel backgrounds are flat
        self.image = a + (b - a) * t

    def _head_outline(self, extra: Tensor, spiky: Tensor | None = None) -> Tensor:
        """Implicit function of the head's outer silhouette grown by `extra` (hair volume)."""
        rx = self.W + extra
        ry = self.H_up + 1.3 * extra
        ry_low = self.H_low * 0.8 + extra
        ny = (self.y - self.y_c) / torch.where(self.y < self.y_c, ry, ry_low)
        r2 = (self.x / rx) ** 2 + ny**2
        if spiky is None:
            return r2 - 1.0
        phi = torch.atan2(self.y - self.y_c, self.x)
        tri = (torch.frac(phi * 11.0 / (2 * math.pi) + 10.0) - 0.5).abs() * 2.0  # 1 at spike tips
        return r2 - (1.0 + spiky * tri) ** 2

    def _hair_back(self) -> None:
        i = self.i
        style = i["hair_style"].round()
        vol = 0.02 + 0.07 * i["hair_volume"]
        head = self._head_outline(vol)
        # Below the cheek line the hair hangs straight (bob, to the jaw) or flares (long, past the
        # shoulders) from the head silhouette's own width, so the two join without a step.
        width = self.W + vol
        head = self._approx_sdf(head)
        box_bob = intersect(self.x.abs() - width - 0.02, self.y - (self.y_c + 0.30), self.y_c - self.y)
        bob = torch.minimum(head, box_bob)
        flare = width + 0.02 + 0.14 * (self.y - self.y_c).clamp_min(0.0)
        box_long = intersect(self.x.abs() - flare, self.y - 0.98, self.y_c - self.y)
        long = torch.minimum(head, box_long)
        bun_r = 0.10 + 0.05 * i["hair_volume"]
        bun = sd_ellipse(self.x, self.y, torch.zeros_like(bun_r), self.y_c - self.H_up - 0.05, bun_r, bun_r)
        sdf = torch.where(style == _HAIR_BOB, bob, torch.where(style == _HAIR_LONG, long, bun))
        has_back = (style == _HAIR_BOB) | (style == _HAIR_LONG) | (style == _HAIR_BUN)
        alpha = coverage(sdf, self.px) * has_back.float()
        self._lay(self._hair_colour(darker=0.82), alpha, "hair")
        self._outline(torch.where(has_back, sdf, torch.full_like(sdf, 9.0)))

    def _hair_colour(self, darker: float = 1.0) -> Tensor:
        """(B,3,H,W) hair colour with strands and a highlight band (flat with one band for cel)."""
        phi = torch.atan2(self.y - self.y_c, self.x)
        band_y = self.y_c - 0.8 * self.H_up
        highlight = torch.exp(-(((self.y - band_y) / 0.07) ** 2))
        strands = 0.06 * torch.sin(70.0 * phi)
        smooth = 0.86 + 0.22 * highlight + strands
        cel = 1.0 + 0.18 * (highlight > 0.6).float()
        light = torch.where(self.is_cel.bool(), cel, smooth) * darker
        return (self.hair * light.unsqueeze(1)).clamp(0.0, 1.0)

    def _clothes_and_neck(self) -> None:
        clothes = pick(CLOTHES, self.scene.clothes)
        sdf = sd_ellipse(
            self.x,
            self.y,
            torch.zeros_like(self.W),
            torch.full_like(self.W, 1.17),
            torch.full_like(self.W, 0.92),
            torch.full_like(self.W, 0.44),
        )
        self._lay(clothes * 0.95, coverage(sdf, self.px), "clothes")
        self._outline(sdf)
        half = 0.14 + 0.05 * self.i["face_width"]
        neck = intersect(self.x.abs() - half, self.y_c - self.y, self.y - 0.83)
        self._lay(self.skin * 0.80, coverage(neck, self.px), "neck")
        self._outline(neck)

    def _ears(self, shade: Tensor) -> None:
        size = self.i["ear_size"]
        cx = self.side * self.W * 0.97
        cy = self.eye_y + 0.05
        rx, ry = 0.04 + 0.025 * size, 0.075 + 0.035 * size
        ear = sd_ellipse(self.x, self.y, cx, cy, rx, ry)
        self._lay(self.skin * 0.95 * shade, coverage(ear, self.px), "ear")
        inner = sd_ellipse(self.x, self.y, cx + self.side * 0.3 * rx, cy, 0.45 * rx, 0.6 * ry)
        self._lay(self.skin * 0.72, coverage(inner, self.px) * 0.6)
        self._outline(ear)

    def _face(self, shade: Tensor) -> Tensor:
        """Paints the face; returns its alpha (B,H,W)."""
        sdf = self._approx_sdf(self.face_implicit(self.x, self.y))
        alpha = coverage(sdf, self.px)
        # A soft darkening near the silhouette gives shaded faces volume.
        rim = 1.0 - 0.12 * smoothstep(-0.08, 0.0, sdf) * (1.0 - self.is_cel)
        self._lay(self.skin * shade * rim.unsqueeze(1), alpha, "skin")
        self._outline(sdf)
        # Cel blush on the cheeks: a decoration of the style, the same for every identity.
        blush = sd_ellipse(
            self.x.abs(),
            self.y,
            self.eye_cx + 0.02,
            self.nose_y,
            torch.full_like(self.W, 0.05),
            torch.full_like(self.W, 0.025),
        )
        self._lay(
            torch.tensor([0.95, 0.55, 0.55]).view(1, 3, 1, 1), coverage(blush, self.px) * 0.35 * self.is_cel
        )
        return alpha

    def _hair_front(self) -> Tensor:
        """Paints the hair cap over the forehead; returns its alpha (B,H,W)."""
        i = self.i
        style = i["hair_style"].round()
        vol = torch.where(
            style == _HAIR_BUZZ,
            torch.full_like(self.W, 0.012),
            torch.where(style == _HAIR_BUN, 0.012 + 0.02 * i["hair_volume"], 0.02 + 0.07 * i["hair_volume"]),
        )
        spiky = torch.where(style == _HAIR_SPIKY, 0.05 + 0.08 * i["hair_volume"], torch.zeros_like(self.W))
        outer = self._approx_sdf(self._head_outline(vol, spiky))
        hairline = self.y - (self.y_c - 0.66 * self.H_up + 0.10 * (self.x / self.W) ** 2)
        sdf = intersect(outer, hairline)
        opacity = torch.where(style == _HAIR_BUZZ, torch.full_like(self.W, 0.78), torch.ones_like(self.W))
        alpha = coverage(sdf, self.px) * opacity
        self._lay(self._hair_colour(), alpha, "hair")
        self._outline(sdf)
        return alpha

    def _nose(self) -> None:
        i = self.i
        width = self.nose_w
        y = self.nose_y
        zeros = torch.zeros_like(self.W)
        under = sd_ellipse(self.x, self.y, zeros, y + 0.012, width * 1.4, torch.full_like(self.W, 0.013))
        self._lay(self.skin * 0.78, coverage(under, self.px) * 0.35 * (1.0 - self.is_cel))
        tip = sd_ellipse(
            self.x, self.y, zeros, y - 0.022, torch.full_like(self.W, 0.02), torch.full_like(self.W, 0.026)
        )
        self._lay((self.skin * 1.12).clamp(max=1.0), coverage(tip, self.px) * 0.3 * (1.0 - self.is_cel))
        wing = sd_ellipse(
            self.x.abs(),
            self.y,
            width,
            y - 0.006,
            0.024 + 0.012 * i["nose_width"],
            torch.full_like(self.W, 0.02),
        )
        self._lay(self.skin * 0.84, coverage(wing, self.px) * 0.5 * (1.0 - self.is_cel))
        nostril = sd_ellipse(
            self.x.abs(), self.y, width, y, 0.012 + 0.010 * i["nose_width"], torch.full_like(self.W, 0.0095)
        )
        self._lay(self.skin * 0.45, coverage(nostril, self.px) * (0.9 - 0.3 * self.is_cel), "nose")
        bridge = intersect((self.x - 0.012).abs() - 0.004, sd_band(self.y, y - 0.06, y - 0.01))
        self._lay(self.skin * 0.6, coverage(bridge, self.px) * self.is_cel)

    def _mouth(self) -> None:
        m = self.mouth_shape(self.x)
        st, centre, opening, top, bottom = m["st"], m["centre"], m["opening"], m["top"], m["bottom"]
        inside_x = self.x.abs() - m["half"]
        lip_colour = self.skin * 0.55 + torch.tensor([0.75, 0.28, 0.30]).view(1, 3, 1, 1) * 0.45
        lip_alpha = 1.0 - 0.65 * self.is_cel
        upper = intersect(sd_band(self.y, top - m["lip_up"], top), inside_x)
        lower = intersect(sd_band(self.y, bottom, bottom + m["lip_low"]), inside_x)
        lips = torch.maximum(coverage(upper, self.px), coverage(lower, self.px))
        self._lay(lip_colour, lips * lip_alpha, "lips", shape=lips)
        line = intersect((self.y - centre).abs() - 0.0045, inside_x)
        self._lay(lip_colour * 0.55, coverage(line, self.px), "lips")
        interior = intersect(sd_band(self.y, top, bottom), inside_x)
        self._lay(
            torch.tensor([0.30, 0.08, 0.10]).view(1, 3, 1, 1), coverage(interior, self.px), "mouth_interior"
        )
        teeth = intersect(
            interior, self.y - (top + torch.minimum(0.5 * opening, torch.full_like(opening, 0.014)) * st)
        )
        self._lay(
            torch.tensor([0.96, 0.95, 0.90]).view(1, 3, 1, 1),
            coverage(teeth, self.px) * (opening > 0.008).float(),
            "mouth_interior",
        )

    def _eyes(self) -> None:
        e = self.e
        w, h = self.eye_w, self.eye_h
        dx = self.x - self.side * self.eye_cx  # signed, per half
        opening = torch.where(self.left, e["eye_open_l"], e["eye_open_r"])
        upper_lid, lower_lid = self.eye_lids(dx, opening)
        eye = intersect(sd_band(self.y, upper_lid, lower_lid), dx.abs() - w)
        eye_alpha = coverage(eye, self.px)
        self._lay(torch.tensor([0.96, 0.96, 0.93]).view(1, 3, 1, 1), eye_alpha, "eye")
        iris_r = h * (0.55 + 0.2 * self.is_cel)
        # Gaze amplitudes are near the largest the lids allow: at 64 px the iris still moves only
        # ~1 px each way vertically, and smaller moves were invisible to the expression regressor.
        ix = 0.6 * w * e["gaze_x"]
        iy = self.eye_y + 0.65 * h * e["gaze_y"]
        iris_colour = ramp(IRIS, self.i["iris_colour"].flatten())
        iris = sd_ellipse(dx, self.y, ix, iy, iris_r, iris_r)
        self._lay(iris_colour, coverage(iris, self.px) * eye_alpha, "iris")
        pupil = sd_ellipse(dx, self.y, ix, iy, 0.45 * iris_r, 0.45 * iris_r)
        self._lay(
            torch.tensor([0.05, 0.04, 0.05]).view(1, 3, 1, 1), coverage(pupil, self.px) * eye_alpha, "iris"
        )
        glint = sd_ellipse(dx, self.y, ix - 0.35 * iris_r, iy - 0.35 * iris_r, 0.25 * iris_r, 0.25 * iris_r)
        self._lay(torch.ones(1, 3, 1, 1), coverage(glint, self.px) * eye_alpha * (1.0 - self.is_brush) * 0.9)
        lash_w = 0.010 + 0.010 * self.is_cel
        lash = intersect((self.y - upper_lid).abs() - lash_w / 2, dx.abs() - 1.05 * w)
        self._lay(torch.tensor([0.10, 0.07, 0.07]).view(1, 3, 1, 1), coverage(lash, self.px), "eye")

    def _brows(self) -> None:
        i, e = self.i, self.e
        inner, outer = self.brow_span()
        ax = self.x.abs()
        tau = ((ax - inner) / (outer - inner)).clamp(0.0, 1.0)
        raise_ = torch.where(self.left, e["brow_raise_l"], e["brow_raise_r"])
        centre = self.brow_line(tau, raise_)
        thick = (0.016 + 0.022 * i["brow_thickness"]) * (1.0 - 0.45 * tau)
        sdf = intersect((self.y - centre).abs() - thick / 2, torch.maximum(inner - ax, ax - outer))
        colour = self.hair * 0.65 + torch.tensor([0.10, 0.08, 0.07]).view(1, 3, 1, 1) * 0.35
        self._lay(colour, coverage(sdf, self.px), "brow")

    def _brush_texture(self) -> None:
        noise = self.noise
        assert noise is not None
        tone = 0.90 + 0.20 * noise.fractal(self.x, self.y, 10.0, channel=2, octaves=3)
        streak = noise.sample(self.x * 0.25, self.y, 60.0, 5) - 0.5
        grain = noise.sample(self.img_x.expand_as(self.x), self.img_y.expand_as(self.y), 140.0, 6) - 0.5
        textured = self.image * tone.unsqueeze(1) + (0.07 * streak + 0.05 * grain).unsqueeze(1)
        self.image = torch.where(self.is_brush.bool().unsqueeze(1), textured, self.image)

    # ------------------------------------------------------------------ driver
    def paint(self, return_parts: bool) -> RenderBatch:
        shade = self._shade()
        self._background()
        self._hair_back()
        self._clothes_and_neck()
        self._ears(shade)
        face_alpha = self._face(shade)
        cap_alpha = self._hair_front()
        self._nose()
        self._mouth()
        self._eyes()
        self._brows()
        if self.noise is not None:
            self._brush_texture()
        images = (self.image.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        masks = face_alpha * (1.0 - cap_alpha) > 0.5
        return RenderBatch(images=images, masks=masks, parts=self.parts if return_parts else None)
