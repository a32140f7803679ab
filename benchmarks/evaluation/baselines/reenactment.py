"""Face reenactment with a local one-call ONNX model: the second stage of the `two-stage` method on photos.

The model animates a *source* face with the expression and pose of a *driving* face. Its graph:

    inputs   source   float32 [1, 3, S, S]  RGB in [0, 1]: the face to animate (the generated portrait's crop)
             driving  float32 [1, 3, S, S]  RGB in [0, 1]: the face whose expression/pose it takes (the template's crop)
    output            float32 [1, 3, S, S]  RGB in [0, 1]: source's identity wearing driving's expression/pose

Inputs are found by name (exactly `source` and `driving`); the first output is the result. S is read
from the inputs' shape; where it is dynamic the caller gives it (`size`). Both crops are cut with the
same canonical alignment, that of a face aligner of `emojidiff.face` giving dlib's 68 landmarks
("dlib-ffhq" by default: the FFHQ portrait square, the folder source's alignment; "dlib-chip" with
`landmarks: 68` for dlib's tighter chip), at side S. The model's output crop is warped back with the
inverse of the source crop's affine and pasted inside the source face's landmark hull, feathered, as
the onnx-swapper alterer pastes its swap (`data_gen.alterers.onnx_swapper`): outside the hull the
image stays exactly (so a driving mouth opened below the source's jaw line is cut at the hull).
Faces are found on a copy enlarged to `detect_side` (dlib's HOG detector misses faces under ~80 px,
and the tiny evaluation renders at 64 px); landmarks are mapped back.

LivePortrait (KwaiVGI) is not one network: its weights are separate modules (appearance feature
extractor, motion extractor, warping module, SPADE generator, stitching/retargeting MLPs) glued by
Python code (the keypoint transformation between the motion extractor's outputs and the warping
module, its own face cropper and its own paste-back). Community ONNX exports keep them as separate
graphs. This module does NOT implement that pipeline, and no LivePortrait file works here as is: it
must first be wrapped into ONE graph of the signature above, e.g. a torch.nn.Module whose
forward(source, driving) runs LivePortrait's inference steps (appearance and keypoints of source,
motion of driving, keypoint transformation, warping, generator, stitching), exported with
torch.onnx.export (or its part graphs joined with the glue rewritten as ONNX ops). Its warping
samples a 3-D feature volume (a 5-D grid_sample), so the export's opset and the onnxruntime in use
must support that. Its results also depend on the crop it was trained with (its own cropper, not
dlib's); pick the `aligner` closest to it. None of this is tested here: the tests run small graphs of
the signature (a fixed blend of the two crops), not a real reenactment model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data_gen.alterers.onnx_swapper import feathered_alpha, swapper_session
from emojidiff.errors import MissingWeightsError
from emojidiff.face import AlignedFace, FaceAligner, FaceDetection, build_face_aligner

REENACTOR_HINT = (
    "a one-call face reenactment .onnx: inputs source [1,3,S,S] and driving [1,3,S,S] (RGB in [0, 1]), output "
    "[1,3,S,S] (see benchmarks/evaluation/baselines/reenactment.py; a LivePortrait export must be composed into that one graph)"
)
INPUTS = ("source", "driving")


def read_signature(session: Any, path: Path) -> int | None:
    """The crop side S of a reenactment session (None when dynamic); ValueError naming `path` and the
    expected signature when the inputs are not `source` and `driving` of shape [1, 3, S, S]."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    got = " -> ".join(", ".join(f"{t.name}{list(t.shape)}" for t in ts) for ts in (inputs, outputs))
    by_name = {i.name: i.shape for i in inputs}
    out_shape = outputs[0].shape if outputs else []
    shapes = [by_name.get(n) for n in INPUTS]
    images = [s is not None and len(s) == 4 and (s[1] == 3 or not isinstance(s[1], int)) for s in shapes]
    ok = set(by_name) == set(INPUTS) and all(images) and len(out_shape) == 4
    sides = {d for s in shapes if s is not None and len(s) == 4 for d in s[2:] if isinstance(d, int)}
    if not ok or len(sides) > 1:
        raise ValueError(
            f"{path}: not a reenactment model of the expected signature: inputs source [1,3,S,S] and "
            f"driving [1,3,S,S] (float32 RGB in [0, 1]), output [1,3,S,S]; got {got}"
        )
    return sides.pop() if sides else None


class Reenactor:
    """Transfer a driving face's expression/pose onto the face of an image (module docstring).

    model_path: the reenactment .onnx (MissingWeightsError naming `key` when unset or absent).
    size: crop side S when the model's is dynamic (must equal it when static).
    aligner: `emojidiff.face.build_face_aligner` spec giving 68 dlib landmarks; built with output_size S.
    feather: paste-mask feather radius in image pixels (default: side / 64, at least 1).
    detect_side: images whose shorter side is below this are enlarged (bilinear) to it for detection.
    num_threads / providers: onnxruntime session settings (CPU by default).
    """

    def __init__(
        self,
        model_path: str | Path | None,
        size: int | None = None,
        aligner: str | Mapping[str, Any] = "dlib-ffhq",
        feather: int | None = None,
        detect_side: int = 256,
        num_threads: int = 1,
        providers: Sequence[str] | None = None,
        key: str = "reenactor",
    ):
        if model_path is None:
            raise MissingWeightsError(key, None, ["<reenactor>.onnx"], REENACTOR_HINT)
        path = Path(model_path)
        if not path.is_file():
            raise MissingWeightsError(key, path.parent, [path.name], REENACTOR_HINT)
        self.model_path, self.aligner_spec = path, aligner
        self.feather, self.detect_side = feather, int(detect_side)
        self.session = swapper_session(str(path), int(num_threads), tuple(providers) if providers else None)
        static = read_signature(self.session, path)
        if static is None and size is None:
            raise ValueError(
                f"{path}: the model's crop side is dynamic; give it (`size`, two-stage: `reenactor_size`)"
            )
        if static is not None and size is not None and int(size) != static:
            raise ValueError(f"{path}: the model's crop side is {static}, but size = {size} was given")
        self.size = int(static if static is not None else size)
        self._output = self.session.get_outputs()[0].name

    @functools.cached_property
    def aligner(self) -> FaceAligner:
        return build_face_aligner(self.aligner_spec, output_size=self.size)

    def describe(self) -> dict[str, Any]:
        return {
            "model_path": str(self.model_path),
            "size": self.size,
            "aligner": self.aligner_spec,
            "feather": self.feather,
            "detect_side": self.detect_side,
        }

    # ---- faces

    def find_face(self, image: np.ndarray) -> AlignedFace | None:
        """The canonical S x S crop of the largest face of a uint8 (H, W, 3) RGB image; None without a face.

        Detection runs on a copy enlarged to `detect_side` when smaller; landmarks (68, 2) are mapped
        back to `image`'s pixels (centre convention), so the crop is cut from `image` itself.
        """
        h, w = image.shape[:2]
        k = max(1.0, self.detect_side / min(h, w))
        big = (
            image
            if k == 1.0
            else cv2.resize(image, (round(w * k), round(h * k)), interpolation=cv2.INTER_LINEAR)
        )
        detections = self.aligner.detect(big)
        if not detections:
            return None
        det = detections[0]
        if len(det.landmarks) != 68:
            raise ValueError(
                f"reenactor: aligner {self.aligner_spec!r} gives {len(det.landmarks)} landmarks; "
                "it needs dlib's 68 (e.g. dlib-ffhq, or dlib-chip with landmarks: 68)"
            )
        sx, sy = big.shape[1] / w, big.shape[0] / h
        landmarks = ((det.landmarks + 0.5) / [sx, sy] - 0.5).astype(np.float32)
        box = (det.box / [sx, sy, sx, sy]).astype(np.float32)
        return self.aligner.align_detection(image, FaceDetection(box, det.score, landmarks))

    @staticmethod
    def hull_mask(face: AlignedFace, shape: tuple[int, int]) -> np.ndarray:
        """float32 (H, W) {0, 1}: the convex hull of the face's 68 landmarks in image pixels."""
        mask = np.zeros(shape, np.uint8)
        cv2.fillConvexPoly(mask, cv2.convexHull(np.round(face.detection.landmarks).astype(np.int32)), 1)
        return mask.astype(np.float32)

    # ---- the model

    def run_crops(self, source: np.ndarray, driving: np.ndarray) -> np.ndarray:
        """uint8 (S, S, 3) RGB source and driving crops -> float32 (S, S, 3) in [0, 255] (the model's
        [0, 1] output, clipped); ValueError naming the file when the output is not [1, 3, S, S]."""
        feeds = {
            n: np.ascontiguousarray(c.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
            for n, c in zip(INPUTS, (source, driving), strict=True)
        }
        out = np.asarray(self.session.run([self._output], feeds)[0], np.float32)
        if out.shape != (1, 3, self.size, self.size):
            raise ValueError(
                f"{self.model_path}: output is {list(out.shape)}, expected [1, 3, S, S] with S = {self.size}"
            )
        return np.clip(out[0].transpose(1, 2, 0) * 255.0, 0.0, 255.0)

    def paste(self, image: np.ndarray, face: AlignedFace, crop: np.ndarray) -> np.ndarray:
        """Warp `crop` (float32 (S, S, 3) in [0, 255], in `face`'s crop frame) back into `image` (uint8
        (H, W, 3)) inside the face's hull (feathered, only where the crop covers). Returns uint8 (H, W, 3)."""
        h, w = image.shape[:2]
        inverse = cv2.invertAffineTransform(face.transform)
        back = cv2.warpAffine(crop, inverse, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        covered = cv2.warpAffine(
            np.ones((self.size, self.size), np.float32), inverse, (w, h), flags=cv2.INTER_LINEAR
        )
        radius = self.feather if self.feather is not None else max(1, round(h / 64))
        alpha = feathered_alpha(self.hull_mask(face, (h, w)) * (covered > 0.999), radius)[..., None]
        return np.clip(np.rint(image.astype(np.float32) * (1.0 - alpha) + back * alpha), 0, 255).astype(
            np.uint8
        )

    def reenact(self, image: np.ndarray, template: np.ndarray) -> tuple[np.ndarray | None, str]:
        """`image`'s face wearing `template`'s expression: (uint8 (H, W, 3), "") or (None, the reason)."""
        face = self.find_face(image)
        if face is None:
            return None, "reenactor: no face found in the generated image"
        driving = self.find_face(template)
        if driving is None:
            return None, "reenactor: no face found in the expression template"
        return self.paste(image, face, self.run_crops(face.crop, driving.crop)), ""

    def reenact_batch(
        self, images: np.ndarray, templates: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """B rows: images, templates uint8 (B, H, W, 3) -> (uint8 (B, H, W, 3) with zeros where failed,
        ok (B,) bool, B reasons ("" where ok))."""
        out, ok, errors = np.zeros_like(images), np.zeros(len(images), bool), [""] * len(images)
        for i, (image, template) in enumerate(zip(images, templates, strict=True)):
            result, errors[i] = self.reenact(image, template)
            if result is not None:
                out[i], ok[i] = result, True
        return out, ok, errors
