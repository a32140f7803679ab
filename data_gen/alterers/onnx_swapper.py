"""The "onnx-swapper" IDI alterer: a face swapper ONNX in inswapper_128's layout (as FaceFusion runs it).

For each target (identity A, expression e) a donor of another person in the batch is drawn; the
target's face is cut with the ArcFace 5-point similarity crop for 128 px, the swapper repaints it
with the donor's identity, and the result is warped back and pasted inside the target's face mask
(feathered). The swapper's graph:

    inputs   target  float32 [1, 3, 128, 128]  RGB in [0, 1]
             source  float32 [1, 512]          latent = normalise(normalise(arcface(donor)) @ emap)
    output           float32 [1, 3, 128, 128]  RGB in [0, 1]

where `emap` (512 x 512) is the graph's last initializer (insightface's INSwapper reads it so).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data_gen.base import ALTERERS, Alterer, Targets, Templates, donor_rows
from emojidiff.errors import MissingWeightsError
from emojidiff.face import build_face_aligner, warp_image
from emojidiff.face.analyse import embed_identities
from emojidiff.face.insightface_backend import arcface_transform, five_points_from_68
from emojidiff.models.bundle import build_identity_encoder

CROP = 128
SWAPPER_HINT = (
    "a face swapper .onnx in inswapper_128's layout (inputs target [1,3,128,128] and source [1,512], "
    "emap as the graph's last initializer), e.g. inswapper_128.onnx"
)


def swapper_session(path: str, threads: int, providers: tuple[str, ...] | None) -> Any:
    """An onnxruntime session of `path` with `threads` intra-op threads (0: onnxruntime's default)."""
    import onnxruntime as ort  # imported where an ONNX model is opened (0.5 s)

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the emap initializer is unused by the graph, by design
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        path, sess_options=opts, providers=list(providers or ["CPUExecutionProvider"])
    )


def read_emap(path: Path) -> np.ndarray:
    """The (D, D) float32 `emap` of a swapper ONNX: its last graph initializer."""
    import onnx  # imported where an ONNX model is opened (0.5 s)
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    if not graph.initializer:
        raise ValueError(f"{path}: the swapper graph has no initializers, so no emap")
    emap = numpy_helper.to_array(graph.initializer[-1]).astype(np.float32)
    if emap.ndim != 2 or emap.shape[0] != emap.shape[1]:
        raise ValueError(
            f"{path}: the last initializer ({graph.initializer[-1].name}) is {emap.shape}, not a square emap"
        )
    return emap


def feathered_alpha(mask: np.ndarray, radius: int) -> np.ndarray:
    """Soft paste weights float32 (H, W) in [0, 1] whose support stays inside `mask` (H, W) {0, 1}:
    the mask eroded by a (2r+1)^2 square, then blurred with the same window (an opening's support)."""
    mask = (np.asarray(mask, np.float32) > 0.5).astype(np.float32)
    if radius <= 0:
        return mask
    k = 2 * int(radius) + 1
    eroded = cv2.erode(mask, np.ones((k, k), np.uint8))
    return cv2.GaussianBlur(eroded, (k, k), 0, borderType=cv2.BORDER_CONSTANT)


def arcface_points(landmarks: np.ndarray) -> np.ndarray:
    """ArcFace 5 points (5, 2) from an aligner's detection: dlib's 68, or already 5 (arcface-112)."""
    return five_points_from_68(landmarks) if len(landmarks) == 68 else np.asarray(landmarks, np.float32)


@ALTERERS.register("onnx-swapper")
class OnnxSwapper(Alterer):
    """Face swap with an inswapper_128-layout ONNX (module docstring).

    model_path: the swapper .onnx (MissingWeightsError naming `model_path` when absent).
    identity_encoder: `emojidiff.face` spec of the donor's identity embedding, the ArcFace the
        swapper was trained with (e.g. {"name": "insightface-arcface", "init_args": {"model_dir": ...}}),
        applied to the donor's crop of its own aligner (`aligner_name`).
    aligner: spec of the aligner that finds the target's 5 points when `Targets.landmarks5` is None.
    donor_image: which of the donor's images gives the identity: "reference" or "target".
    feather: paste-mask feather radius in target pixels (default: side / 64).
    num_threads / providers: onnxruntime session settings. device: where the identity encoder runs.

    Templates: the swapped targets; masks = the targets' masks; ground-truth parameters unknown
    (None). Rows without a face (target or donor) are ok=False with meta["alter_error"].
    """

    name = "onnx-swapper"

    def __init__(
        self,
        model_path: str | Path | None,
        identity_encoder: str | Mapping[str, Any],
        aligner: str | Mapping[str, Any] = "arcface-112",
        donor_image: str = "reference",
        feather: int | None = None,
        num_threads: int = 1,
        providers: list[str] | None = None,
        device: str = "cpu",
    ):
        path = None if model_path is None else Path(model_path)
        if path is None:
            raise MissingWeightsError("model_path", None, ["inswapper_128.onnx"], SWAPPER_HINT)
        if not path.is_file():
            raise MissingWeightsError("model_path", path.parent, [path.name], SWAPPER_HINT)
        if donor_image not in ("reference", "target"):
            raise ValueError(
                f"onnx-swapper: donor_image must be 'reference' or 'target', got {donor_image!r}"
            )

        self.model_path = path
        self.encoder_spec, self.aligner_spec, self.donor_image = identity_encoder, aligner, donor_image
        self.feather, self.num_threads, self.device = feather, int(num_threads), device
        self.emap = read_emap(path)
        self.encoder = build_identity_encoder(identity_encoder).to(device)
        if self.encoder.embedding_dim != self.emap.shape[0]:
            raise ValueError(
                f"onnx-swapper: identity encoder {identity_encoder!r} gives {self.encoder.embedding_dim}-d embeddings "
                f"but the emap of {path} is {self.emap.shape}"
            )
        self.session = swapper_session(str(path), self.num_threads, tuple(providers) if providers else None)
        self._target_name, self._source_name = self._input_names()
        self._output_name = self.session.get_outputs()[0].name

    def _input_names(self) -> tuple[str, str]:
        """(image input, latent input) names: "target"/"source", else the 4-D and the 2-D input."""
        inputs = self.session.get_inputs()
        names = {i.name for i in inputs}
        if {"target", "source"} <= names:
            return "target", "source"
        by_rank = {len(i.shape): i.name for i in inputs}
        if len(inputs) != 2 or set(by_rank) != {2, 4}:
            raise ValueError(
                f"{self.model_path}: expected inputs target [1,3,128,128] and source [1,512], got "
                + ", ".join(f"{i.name}{i.shape}" for i in inputs)
            )
        return by_rank[4], by_rank[2]

    @functools.cached_property
    def aligner(self):

        return build_face_aligner(self.aligner_spec)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_path": str(self.model_path),
            "identity_encoder": self.encoder_spec,
            "aligner": self.aligner_spec,
            "donor_image": self.donor_image,
            "feather": self.feather,
        }

    # ---- the swap

    def source_vector(self, embedding: np.ndarray) -> np.ndarray:
        """(D,) or (1, D) identity embedding -> the swapper's (1, D) float32 `source` input:
        e = embedding / |embedding|; latent = e @ emap; latent / |latent|."""
        e = np.asarray(embedding, np.float64).reshape(1, -1)
        e = e / np.linalg.norm(e)
        latent = e @ self.emap.astype(np.float64)
        return (latent / np.linalg.norm(latent)).astype(np.float32)

    def swap_crop(self, crop: np.ndarray, source: np.ndarray) -> np.ndarray:
        """uint8 (128, 128, 3) RGB ArcFace crop + (1, D) source vector -> float32 (128, 128, 3) in [0, 255]."""
        blob = np.ascontiguousarray(crop.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
        out = self.session.run([self._output_name], {self._target_name: blob, self._source_name: source})[0]
        return np.clip(np.asarray(out, np.float32)[0].transpose(1, 2, 0) * 255.0, 0.0, 255.0)

    def swap(
        self, image: np.ndarray, points5: np.ndarray, source: np.ndarray, mask: np.ndarray
    ) -> np.ndarray:
        """One face swap, pasted back.

        image: uint8 (H, W, 3) RGB target; points5: (5, 2) ArcFace points in its pixels; source:
        (1, D) `source_vector`; mask: float (H, W) face mask. Returns uint8 (H, W, 3): the target
        outside the mask exactly, the swapped face inside (feathered edge).
        """

        h, w = image.shape[:2]
        transform = arcface_transform(points5, CROP)
        fake = self.swap_crop(warp_image(image, transform, CROP), source)
        inverse = cv2.invertAffineTransform(transform)
        back = cv2.warpAffine(fake, inverse, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        covered = cv2.warpAffine(np.ones((CROP, CROP), np.float32), inverse, (w, h), flags=cv2.INTER_LINEAR)
        radius = self.feather if self.feather is not None else max(1, round(h / 64))
        alpha = feathered_alpha(mask * (covered > 0.999), radius)[..., None]
        out = image.astype(np.float32) * (1.0 - alpha) + back * alpha
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    # ---- Alterer

    def target_points(self, targets: Targets, row: int) -> np.ndarray | None:
        """The ArcFace 5 points of target `row`: from the source, else detected; None without a face."""
        if targets.landmarks5 is not None:
            return targets.landmarks5[row]
        detections = self.aligner.detect(targets.images[row])
        return arcface_points(detections[0].landmarks) if detections else None

    def donor_embeddings(self, targets: Targets, donors: np.ndarray) -> dict[int, np.ndarray]:
        """Row -> (D,) L2-normalised embedding (NaN without a face) for every donor row used."""

        rows = sorted({int(d) for d in donors})
        images = targets.references if self.donor_image == "reference" else targets.images
        names = [
            f"{self.donor_image} of target {int(targets.indices[r])} ({targets.persons[r]})" for r in rows
        ]
        emb = embed_identities(self.encoder, [images[r] for r in rows], names, on_missing="nan").numpy()
        return dict(zip(rows, emb, strict=True))

    def alter(self, targets: Targets, rng: np.random.Generator) -> Templates:
        b = len(targets)
        donors = donor_rows(targets.persons, rng)
        embeddings = self.donor_embeddings(targets, donors)
        images, ok, meta = targets.images.copy(), np.ones(b, bool), []
        for i, d in enumerate(donors):
            row_meta: dict[str, Any] = {
                "alterer": self.name,
                "donor": targets.persons[d],
                "donor_index": int(targets.indices[d]),
            }
            points = self.target_points(targets, i)
            if points is None:
                ok[i], row_meta["alter_error"] = False, "no face found in the target to swap"
            elif not np.isfinite(embeddings[int(d)]).all():
                ok[i], row_meta["alter_error"] = False, f"no face found in the donor's {self.donor_image}"
            else:
                source = self.source_vector(embeddings[int(d)])
                images[i] = self.swap(targets.images[i], points, source, targets.masks[i])
            meta.append(row_meta)
        return Templates(images=images, masks=targets.masks.copy(), ok=ok, meta=meta)
