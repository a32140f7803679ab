"""MediaPipe FaceLandmarker's 52 ARKit-style blendshapes: the paper's expression descriptor.

mediapipe is an optional extra (`pip install 'emojidiff[mediapipe]'`); it is imported only when
the analyser is built. The model is a local `face_landmarker.task` file (config key
`model_asset_path`); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from emojidiff.errors import FaceNotFoundError, MissingWeightsError
from emojidiff.face.base import EXPRESSION_ANALYSERS, ExpressionAnalyser, tensor_to_images

__all__ = ["BLENDSHAPE_NAMES", "MediaPipeBlendshapes", "import_mediapipe"]

# FaceLandmarker's blendshape categories, in the model's output order.
BLENDSHAPE_NAMES: list[str] = [
    "_neutral",
    "browDownLeft",
    "browDownRight",
    "browInnerUp",
    "browOuterUpLeft",
    "browOuterUpRight",
    "cheekPuff",
    "cheekSquintLeft",
    "cheekSquintRight",
    "eyeBlinkLeft",
    "eyeBlinkRight",
    "eyeLookDownLeft",
    "eyeLookDownRight",
    "eyeLookInLeft",
    "eyeLookInRight",
    "eyeLookOutLeft",
    "eyeLookOutRight",
    "eyeLookUpLeft",
    "eyeLookUpRight",
    "eyeSquintLeft",
    "eyeSquintRight",
    "eyeWideLeft",
    "eyeWideRight",
    "jawForward",
    "jawLeft",
    "jawOpen",
    "jawRight",
    "mouthClose",
    "mouthDimpleLeft",
    "mouthDimpleRight",
    "mouthFrownLeft",
    "mouthFrownRight",
    "mouthFunnel",
    "mouthLeft",
    "mouthLowerDownLeft",
    "mouthLowerDownRight",
    "mouthPressLeft",
    "mouthPressRight",
    "mouthPucker",
    "mouthRight",
    "mouthRollLower",
    "mouthRollUpper",
    "mouthShrugLower",
    "mouthShrugUpper",
    "mouthSmileLeft",
    "mouthSmileRight",
    "mouthStretchLeft",
    "mouthStretchRight",
    "mouthUpperUpLeft",
    "mouthUpperUpRight",
    "noseSneerLeft",
    "noseSneerRight",
]


def import_mediapipe() -> Any:
    """The mediapipe module, or an ImportError that says how to install it."""
    try:
        import mediapipe
    except ImportError as exc:
        raise ImportError(
            "the 'mediapipe-blendshapes' expression analyser needs mediapipe, an optional extra: "
            "pip install 'emojidiff[mediapipe]'"
        ) from exc
    return mediapipe


@EXPRESSION_ANALYSERS.register("mediapipe-blendshapes")
class MediaPipeBlendshapes(ExpressionAnalyser):
    """52 blendshape scores in [0, 1] of the largest face, from whole images.

    The expression error (`distance`) is the mean absolute difference of the 52 scores, the
    paper's L1 blendshape metric. on_missing: "raise" (FaceNotFoundError) or "nan" (a NaN row).
    Not differentiable.
    """

    descriptor_dim = len(BLENDSHAPE_NAMES)
    names = BLENDSHAPE_NAMES
    differentiable = False
    aligner_name = "none"

    def __init__(
        self, model_asset_path: str | Path | None = None, on_missing: Literal["raise", "nan"] = "raise"
    ):
        super().__init__()
        mp = import_mediapipe()
        if model_asset_path is None:
            raise MissingWeightsError("model_asset_path", None, ["face_landmarker.task"])
        path = Path(model_asset_path)
        if not path.is_file():
            raise MissingWeightsError(
                "model_asset_path", path.parent, [path.name], "a MediaPipe FaceLandmarker .task"
            )
        from mediapipe.tasks import python as mp_tasks
        from mediapipe.tasks.python import vision

        options = vision.FaceLandmarkerOptions(
            base_options=mp_tasks.BaseOptions(model_asset_path=str(path)),
            running_mode=vision.RunningMode.IMAGE,
            output_face_blendshapes=True,
            num_faces=1,
        )
        self._mp = mp
        self._landmarker = vision.FaceLandmarker.create_from_options(options)
        self.on_missing = on_missing

    def describe(self, images: Tensor) -> Tensor:
        out = np.full((images.shape[0], self.descriptor_dim), np.nan, np.float32)
        index = {n: i for i, n in enumerate(self.names)}
        for i, image in enumerate(tensor_to_images(images)):
            result = self._landmarker.detect(
                self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=image)
            )
            if not result.face_blendshapes:
                if self.on_missing == "raise":
                    raise FaceNotFoundError(f"<image {i}>", "mediapipe found no face")
                continue
            for cat in result.face_blendshapes[0]:
                if cat.category_name in index:
                    out[i, index[cat.category_name]] = cat.score
        return torch.from_numpy(out).to(images.device)
