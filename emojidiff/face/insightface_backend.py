"""InsightFace backends: ArcFace ONNX identity (antelopev2 / buffalo_l) and the ArcFace 112 crop.

The recognition network runs with onnxruntime from a local model folder; the "arcface-112"
aligner estimates insightface's 5-point similarity crop (face_align.norm_crop) from dlib's 68
landmarks, so it needs no insightface detector. SCRFD from a local folder is an option.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from emojidiff.errors import MissingWeightsError
from emojidiff.face.base import (
    FACE_ALIGNERS,
    IDENTITY_ENCODERS,
    ArcFaceEncoder,
    FaceAligner,
    FaceDetection,
    as_rgb_uint8,
    sort_by_area,
)
from emojidiff.face.dlib_backend import DlibLandmarker

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "ArcFace112Aligner",
    "ArcFaceONNXEncoder",
    "arcface_transform",
    "five_points_from_68",
    "umeyama_similarity",
]

# insightface.utils.face_align.arcface_dst: image-left eye, image-right eye, nose tip,
# image-left mouth corner, image-right mouth corner, in a 112x112 crop.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float32,
)

# File names of the recognition models in insightface's packs, most preferred first.
KNOWN_RECOGNITION_FILES = ("glintr100.onnx", "w600k_r50.onnx")
KNOWN_DETECTION_FILES = ("scrfd_10g_bnkps.onnx", "det_10g.onnx", "det_2.5g.onnx", "det_500m.onnx")


def five_points_from_68(landmarks68: np.ndarray) -> np.ndarray:
    """dlib 68 landmarks (68, 2) -> the 5 ArcFace points (5, 2) in ARCFACE_TEMPLATE_112 order."""
    lm = np.asarray(landmarks68, np.float32)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]).astype(np.float32)


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) src -> dst.

    src, dst: (N, 2). Returns the (2, 3) float64 matrix. Same estimator as
    skimage's SimilarityTransform (Umeyama 1991), which insightface's estimate_norm uses.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(cov) < 0:
        sign[1] = -1
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / s0.var(0).sum()
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def arcface_transform(points5: np.ndarray, size: int = 112) -> np.ndarray:
    """(2, 3) float32 source -> crop affine of insightface's norm_crop for a (size x size) crop."""
    if size % 112 == 0:
        dst = ARCFACE_TEMPLATE_112 * (size / 112.0)
    elif size % 128 == 0:
        dst = ARCFACE_TEMPLATE_112 * (size / 128.0)
        dst[:, 0] += 8.0 * size / 128.0
    else:
        raise ValueError(f"ArcFace crops are 112k or 128k pixels wide, got {size}")
    return umeyama_similarity(points5, dst).astype(np.float32)


def _is_recognition_graph(path: Path) -> bool:
    """True for an .onnx whose input is (N, 3, 112|128, 112|128) and whose output is (N, D)."""
    import onnx  # onnx/onnxruntime: imported where an ONNX model is opened (0.5 s each)

    graph = onnx.load(str(path), load_external_data=False).graph
    if len(graph.input) < 1 or len(graph.output) != 1:
        return False
    dims = [d.dim_value or None for d in graph.input[0].type.tensor_type.shape.dim]
    out_rank = len(graph.output[0].type.tensor_type.shape.dim)
    return len(dims) == 4 and dims[1] == 3 and dims[2] in (112, 128, None) and out_rank == 2


def _pick_model(
    key: str, folder: str | Path | None, preferred: tuple[str, ...], what: str, scan: bool = False
) -> Path:
    """The first of `preferred` inside `folder`; with `scan`, else any recognition-shaped .onnx."""
    expected = list(preferred)
    if folder is None:
        raise MissingWeightsError(key, None, expected, f"set it to a local insightface model folder ({what})")
    folder = Path(folder)
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    if scan and folder.is_dir():
        for path in sorted(folder.glob("*.onnx")):
            if _is_recognition_graph(path):
                return path
    raise MissingWeightsError(key, folder, expected, f"no {what} .onnx found there")


@functools.lru_cache(maxsize=8)
def _session(path: str, threads: int | None, providers: tuple[str, ...] | None) -> Any:
    import onnxruntime as ort  # imported where an ONNX model is opened (0.5 s)

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        path, sess_options=opts, providers=list(providers or ["CPUExecutionProvider"])
    )


def _has_builtin_normalisation(path: Path) -> bool:
    """insightface's test for mxnet-converted models whose graph starts with Sub and Mul nodes."""
    import onnx  # onnx/onnxruntime: imported where an ONNX model is opened (0.5 s each)

    graph = onnx.load(str(path), load_external_data=False).graph
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


@IDENTITY_ENCODERS.register("insightface-arcface")
class ArcFaceONNXEncoder(ArcFaceEncoder):
    """ArcFace recognition ONNX (antelopev2 glintr100 / buffalo_l w600k_r50) on "arcface-112" crops.

    model_dir: an insightface model folder; its recognition model is picked by name
    (glintr100.onnx, then w600k_r50.onnx), else the first .onnx shaped (N, 3, 112, 112) -> (N, D). model_file: a recognition .onnx directly.
    Preprocessing is insightface's ArcFaceONNX.get_feat: RGB (insightface reads BGR and swaps with
    swapRB=True, so the network sees RGB), (x*255 - 127.5) / 127.5; for mxnet-converted graphs
    that normalise inside (Sub/Mul first nodes) the input is x*255 unchanged.
    Not differentiable: onnxruntime runs on detached numpy copies.
    """

    differentiable = False

    def __init__(
        self,
        model_dir: str | Path | None = None,
        model_file: str | Path | None = None,
        num_threads: int | None = None,
        providers: list[str] | None = None,
    ):
        super().__init__()
        if model_file is not None:
            path = Path(model_file)
            if not path.is_file():
                raise MissingWeightsError(
                    "model_file", path.parent, [path.name], "the ArcFace recognition .onnx"
                )
        else:
            path = _pick_model(
                "model_dir", model_dir, KNOWN_RECOGNITION_FILES, "ArcFace recognition", scan=True
            )
        self.model_file = path
        self._session = _session(str(path), num_threads, tuple(providers) if providers else None)
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        self._output_name = self._session.get_outputs()[0].name
        shape = inp.shape
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"{path} is not an image recognition model: input shape {shape}")
        if isinstance(shape[2], int):
            self.input_size = int(shape[2])
        out_dim = self._session.get_outputs()[0].shape[-1]
        if isinstance(out_dim, int):
            self.embedding_dim = out_dim
        if _has_builtin_normalisation(path):
            self.input_mean, self.input_std = 0.0, 1.0
        else:
            self.input_mean, self.input_std = 127.5, 127.5

    def preprocess(self, images: Tensor) -> np.ndarray:
        """(B, 3, S, S) RGB [0, 1] -> the network's float32 NCHW input blob."""
        x = images.detach().float().cpu().numpy() * 255.0
        return np.ascontiguousarray((x - self.input_mean) / self.input_std, dtype=np.float32)

    def embed(self, images: Tensor) -> Tensor:
        blob = self.preprocess(images)
        out = self._session.run([self._output_name], {self._input_name: blob})[0]
        return torch.from_numpy(np.asarray(out, np.float32).reshape(len(blob), -1)).to(images.device)


class _SCRFDDetector:
    """insightface's SCRFD (det_10g / scrfd_10g_bnkps) from a local folder: boxes and 5 points."""

    def __init__(self, model_dir: str | Path | None, det_size: int = 640, det_thresh: float = 0.5):
        path = _pick_model("scrfd_model_dir", model_dir, KNOWN_DETECTION_FILES, "SCRFD detection")
        from insightface.model_zoo.scrfd import SCRFD  # slow import, only on this path

        self._model = SCRFD(model_file=str(path))
        self._model.prepare(-1, input_size=(det_size, det_size), det_thresh=det_thresh)

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        # insightface models take OpenCV BGR images
        dets, kpss = self._model.detect(np.ascontiguousarray(image[:, :, ::-1]))
        out = []
        for i, det in enumerate(dets):
            kps = kpss[i] if kpss is not None else np.zeros((0, 2), np.float32)
            out.append(FaceDetection(det[:4].astype(np.float32), float(det[4]), kps.astype(np.float32)))
        return sort_by_area(out)


@FACE_ALIGNERS.register("arcface-112")
class ArcFace112Aligner(FaceAligner):
    """insightface's standard ArcFace crop (norm_crop) from 5 facial points.

    detector="hog"/"cnn": dlib detection and 68 landmarks reduced to the 5 ArcFace points;
    detector="scrfd": insightface's SCRFD from `scrfd_model_dir` (its own 5 points).
    Detections carry the 5 points (ARCFACE_TEMPLATE_112 order).
    """

    name = "arcface-112"

    def __init__(
        self,
        models_dir: str | Path | None = None,
        detector: Literal["hog", "cnn", "scrfd"] = "hog",
        upsample: int = 0,
        scrfd_model_dir: str | Path | None = None,
        output_size: int = 112,
    ):
        self.output_size = int(output_size)
        arcface_transform(ARCFACE_TEMPLATE_112, self.output_size)  # validates the size early
        if detector == "scrfd":
            self._scrfd: _SCRFDDetector | None = _SCRFDDetector(scrfd_model_dir)
        else:
            self._scrfd = None
            self._landmarker = DlibLandmarker(models_dir, detector, 68, upsample)

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        image = as_rgb_uint8(image)
        if self._scrfd is not None:
            return self._scrfd.detect(image)
        dets = self._landmarker.detect(image)
        return [FaceDetection(d.box, d.score, five_points_from_68(d.landmarks)) for d in dets]

    def estimate_transform(self, detection: FaceDetection) -> np.ndarray:
        return arcface_transform(detection.landmarks, self.output_size)
