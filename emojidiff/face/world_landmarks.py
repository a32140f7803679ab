"""68-point landmark detectors, by registry name: "world-lms" for world portraits, "dlib-68" for photos.

Both take images (B, 3, H, W) in [0, 1] and return (B, 68, 2) float32 landmarks in the image's own
continuous pixel coordinates (x, y), in dlib's iBUG 300-W order (`emojidiff.world.landmarks`).

- "world-lms" (`WorldLandmarkDetector`): a small CNN trained on world renders against the renderer's
  own landmarks (`emojidiff.world.landmarks.landmarks68`) by `lightning_modules.world_landmark_training`
  (`make landmarker`); packaged weights `weights/world_lms.safetensors`. The world's counterpart of a
  photo landmark detector: it reads the image, as a peer's detector would, and never sees the
  parameters the image was rendered from.
- "dlib-68": dlib's HOG detector and 68-point shape predictor (the `dlib-lms` analyser's), the
  largest face of each image; an image without a face raises FaceNotFoundError naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from emojidiff.face.landmark_expression import DlibLMSAnalyser
from emojidiff.face.world_models import WEIGHTS_DIR, NetConfig, _WorldModel
from emojidiff.registry import Registry
from emojidiff.world.landmarks import NUM_LANDMARKS

__all__ = [
    "DEFAULT_LMS_WEIGHTS",
    "LANDMARK_DETECTORS",
    "DlibLandmarkDetector",
    "WorldLandmarkDetector",
    "build_landmark_detector",
]

LANDMARK_DETECTORS: Registry[nn.Module] = Registry("landmark detector")
DEFAULT_LMS_WEIGHTS = WEIGHTS_DIR / "world_lms.safetensors"


@LANDMARK_DETECTORS.register("world-lms")
class WorldLandmarkDetector(_WorldModel, nn.Module):
    """World portraits (B, 3, H, W) [0, 1] -> (B, 68, 2) landmarks in pixels of the input.

    The network regresses every point's (x, y) as a fraction of the image side (136 outputs) from
    the whole 64 px portrait at full resolution (the jaw reaches the lower fifth of the image).
    weights: packaged by default; None (or pretrained=False) builds a random network to train.
    """

    kind = "world-lms"
    default_net = NetConfig(
        input_size=64,
        crop=None,
        channels=(24, 48, 96, 128),
        stem_stride=2,
        stem_blocks=2,
        blocks=2,
        hidden=256,
        out_dim=2 * NUM_LANDMARKS,
    )

    def __init__(
        self,
        weights: str | Path | None = DEFAULT_LMS_WEIGHTS,
        pretrained: bool = True,
        freeze: bool | None = None,
        arch: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self._build(weights, pretrained, freeze, arch)
        if self.net.config.out_dim != 2 * NUM_LANDMARKS:
            raise ValueError(f"world-lms needs out_dim={2 * NUM_LANDMARKS}, got {self.net.config.out_dim}")

    def train(self, mode: bool = True) -> WorldLandmarkDetector:
        super().train(mode)
        self._keep_frozen_eval()
        return self

    def relative(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) [0, 1] -> (B, 68, 2) landmarks as fractions of the image side (the training target)."""
        return self.net(images).view(-1, NUM_LANDMARKS, 2)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) [0, 1] -> (B, 68, 2) landmarks in the input's pixels."""
        scale = torch.tensor([images.shape[-1], images.shape[-2]], dtype=torch.float32, device=images.device)
        return self.relative(images) * scale

    def _meta_extra(self) -> dict[str, Any]:
        return {"role": "control", "points": NUM_LANDMARKS}


@LANDMARK_DETECTORS.register("dlib-68")
class DlibLandmarkDetector(nn.Module):
    """Photos (B, 3, H, W) [0, 1] -> (B, 68, 2) dlib landmarks of each image's largest face.

    An image without a face raises FaceNotFoundError naming it ("<image i>", its index in the batch).
    upsample: times dlib doubles the image before detecting (finds smaller faces). Not differentiable.
    """

    def __init__(self, models_dir: str | Path | None = None, upsample: int = 1):
        super().__init__()
        self.analyser = DlibLMSAnalyser(models_dir, "hog", upsample, on_missing="raise")

    def forward(self, images: Tensor) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.analyser.landmarks(images))).to(images.device)


def build_landmark_detector(spec: str | Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Build from "name" or {"name": ..., "init_args": {...}}; see LANDMARK_DETECTORS.names()."""
    return LANDMARK_DETECTORS.build(spec, **overrides)
