"""Expression image encoders: masked face crop of the template -> patch features (B, L, F).

Both implementations take images (B, 3, H, W) in [0, 1] and an optional mask (B, 1, H, W) in
[0, 1] (1 = face): the encoder multiplies the image by the mask (background becomes black) before
its own resizing and normalisation. Whether the encoder trains is the explicit `trainable` flag; a
frozen encoder has requires_grad=False and stays in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPVisionModel

from emojidiff.errors import MissingWeightsError
from emojidiff.face import build_expression_analyser
from emojidiff.face.world_landmarks import build_landmark_detector
from emojidiff.images import to_signed
from emojidiff.models.architecture_only import clip_vision_model
from emojidiff.packaged import is_architecture_only, resolve_backbone, resolve_encoder
from emojidiff.registry import Registry
from emojidiff.world.expression import PRESET_NAMES, Expression, nearest_preset
from emojidiff.world.landmarks import five_points, to_face_frame

EXPRESSION_ENCODERS: Registry[ExpressionEncoder] = Registry("expression encoder")
CLIP_KEY = "model.expression_encoder.path"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ExpressionEncoder(nn.Module):
    """Interface: `forward(images, mask=None) -> (B, num_tokens, feature_dim)`."""

    feature_dim: int
    num_tokens: int
    image_size: int  # the side the encoder reads (`resize`)
    trainable: bool

    def _set_trainable(self, trainable: bool) -> None:
        self.trainable = trainable
        self.requires_grad_(trainable)
        if not trainable:
            super().train(False)

    def train(self, mode: bool = True) -> ExpressionEncoder:
        """A frozen encoder stays in eval mode."""
        return super().train(mode and self.trainable)

    @staticmethod
    def apply_mask(images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] * mask (B, 1, H', W') in [0, 1], resized to H x W if needed."""
        if mask is None:
            return images
        mask = mask.to(images.dtype)
        if mask.ndim == 3:
            mask = mask[:, None]
        if mask.shape[-2:] != images.shape[-2:]:
            mask = F.interpolate(mask, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return images * mask

    def resize(self, x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) at the encoder's `image_size` (antialiased), unchanged
        if already that size; bicubic's overshoot is clamped back into [0, 1]."""
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        out = F.interpolate(
            x, size=(self.image_size, self.image_size), mode=mode, antialias=True, align_corners=False
        )
        return out.clamp(0, 1) if mode == "bicubic" else out

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


@EXPRESSION_ENCODERS.register("clip")
class ClipVisionExpressionEncoder(ExpressionEncoder):
    """A CLIP vision tower from a LOCAL folder (config key `model.expression_encoder.path`), or the
    architecture-only ViT-H/14 `emojidiff:clip-vit-h-14-arch` (seeded random weights: speed and wiring only).

    Images are masked, resized to the model's `image_size` (bicubic, antialiased), normalised
    with CLIP's mean/std, and the penultimate hidden states (IP-Adapter-Plus's choice) returned:
    (B, 1 + (S/P)^2, hidden), e.g. (B, 257, 1280) for ViT-H/14. Frozen unless `trainable`.
    """

    def __init__(
        self,
        path: str | Path | None,
        trainable: bool = False,
        hidden_layer: int = -2,
        dtype: torch.dtype = torch.float32,
        key: str = CLIP_KEY,
    ):
        super().__init__()

        folder = resolve_encoder(path) if path is not None else None
        expected = ["config.json", "model.safetensors"]
        if folder is not None and is_architecture_only(folder):
            self.model = clip_vision_model(folder, dtype)
        elif (
            folder is None
            or not (folder / "config.json").is_file()
            or not (
                any(folder.glob("model*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
            )
        ):
            raise MissingWeightsError(
                key, folder, expected, hint="a CLIP vision model saved with save_pretrained"
            )
        else:
            self.model = CLIPVisionModel.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, dtype=dtype
            )
        cfg = self.model.config
        self.image_size = int(cfg.image_size)
        self.hidden_layer = hidden_layer
        self.feature_dim = int(cfg.hidden_size)
        self.num_tokens = (self.image_size // int(cfg.patch_size)) ** 2 + 1
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._set_trainable(trainable)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], mask (B, 1, H, W) in [0, 1] -> (B, L, hidden)."""
        x = self.apply_mask(images.float(), mask)
        x = self.resize(x, mode="bicubic")
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[self.hidden_layer]


@EXPRESSION_ENCODERS.register("tiny_conv")
class TinyConvExpressionEncoder(ExpressionEncoder):
    """A small conv net for the tiny world: (B, 3, 64, 64) in [0, 1] -> (B, 16, F) patch features.

    Four stride-2 conv stages (64 -> 32 -> 16 -> 8 -> 4) with GroupNorm + SiLU, then the 4x4 grid
    flattened to 16 tokens plus a learned position embedding. Inputs of another size are resized
    to `image_size` first. Trainable by default (there is no pretrained face-expression CLIP here).
    """

    def __init__(self, feature_dim: int = 64, width: int = 32, image_size: int = 64, trainable: bool = True):
        super().__init__()
        self.image_size = image_size
        self.feature_dim = feature_dim
        self.num_tokens = 16
        chans = [3, width, 2 * width, 2 * width, feature_dim]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1))
            if i < len(chans) - 2:
                layers += [nn.GroupNorm(8, c_out), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, feature_dim))
        self._set_trainable(trainable)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], mask (B, 1, H, W) in [0, 1] -> (B, 16, F)."""
        x = self.apply_mask(images.to(self.pos.dtype), mask)
        x = self.resize(x)
        feats = self.net(to_signed(x))
        feats = F.adaptive_avg_pool2d(feats, 4)  # (B, F, 4, 4) whatever rounding image_size gives
        return feats.flatten(2).transpose(1, 2) + self.pos


@EXPRESSION_ENCODERS.register("vae_patches")
class VAEPatchExpressionEncoder(ExpressionEncoder):
    """The backbone's own (frozen, pretrained) VAE encoder as expression encoder: the masked template
    is encoded to scaled latents (B, C, h, w) (posterior mode) and cut into a (h/p) x (w/p) grid of
    p x p patches, each flattened to one token: (B, (h/p)(w/p), C p^2).

    Like CLIP in the paper it is pretrained on images, frozen, and carries the template's
    appearance (identity) as well as its expression; unlike a conv net trained from scratch, its
    tokens differ between templates from the first step. Images of another side than
    `image_size` are resized first, so the token grid is fixed.
    """

    def __init__(
        self,
        backbone: str = "emojidiff:tiny-sd15",
        patch: int = 4,
        image_size: int = 64,
        key: str = "model.expression_encoder.init_args.backbone",
    ):
        super().__init__()

        folder = resolve_backbone(backbone)
        if not (folder / "vae" / "config.json").is_file():
            raise MissingWeightsError(
                key,
                folder,
                ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"],
                hint="a diffusers backbone folder whose VAE encodes the templates",
            )
        self.vae = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", local_files_only=True, use_safetensors=True
        )
        self.image_size, self.patch = int(image_size), int(patch)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self.image_size // factor
        if side % self.patch:
            raise ValueError(f"latent side {side} is not divisible by patch {self.patch}")
        self.scaling = float(self.vae.config.scaling_factor)
        self.feature_dim = int(self.vae.config.latent_channels) * self.patch**2
        self.num_tokens = (side // self.patch) ** 2
        self._set_trainable(False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], mask (B, 1, H, W) in [0, 1] -> (B, num_tokens, feature_dim)."""
        x = self.apply_mask(images.to(self.vae.dtype), mask)
        x = self.resize(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            latents = self.vae.encode(to_signed(x)).latent_dist.mode() * self.scaling
        p = self.patch
        tokens = F.unfold(latents.float(), kernel_size=p, stride=p)  # (B, C p^2, L)
        return tokens.transpose(1, 2)


@EXPRESSION_ENCODERS.register("world_expr_features")
class WorldExpressionFeatureEncoder(ExpressionEncoder):
    """A frozen, pretrained world expression network as expression encoder: the last stage's
    feature map of an `emojidiff.face` expression analyser with `feature_maps` (default the
    packaged "world-expr"), (B, C, s, s) -> (B, s*s, C) tokens.

    The embedded world's counterpart of the paper's frozen CLIP image encoder, but trained for
    expression: its features say much about the expression and less about the person, so it
    makes the decoupling problem easier than CLIP does (an ablation, not the default).
    """

    def __init__(self, analyser: str | dict = "world-expr", image_size: int = 64):
        super().__init__()

        if isinstance(analyser, str):
            analyser = {"name": analyser, "init_args": {}}
        self.analyser = build_expression_analyser(analyser)
        if not hasattr(self.analyser, "feature_maps"):
            raise ValueError(f"expression analyser {analyser!r} has no feature_maps")
        self.image_size = int(image_size)
        with torch.no_grad():
            last = self.analyser.feature_maps(torch.zeros(1, 3, self.image_size, self.image_size))[-2]
        self.feature_dim, self.num_tokens = int(last.shape[1]), int(last.shape[2] * last.shape[3])
        self._set_trainable(False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], mask (B, 1, H, W) in [0, 1] -> (B, s*s, C)."""
        x = self.apply_mask(images.float(), mask)
        x = self.resize(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            feats = self.analyser.feature_maps(x)[-2]
        return feats.flatten(2).transpose(1, 2)


@EXPRESSION_ENCODERS.register("expression_params")
class ExpressionParameterEncoder(ExpressionEncoder):
    """Coarse expression control: a frozen expression analyser's parameter vector of the template,
    (B, K) -> (B, 1, K), for the adapter's MLP projection (`expr_resampler_depth: 0`) to turn into
    tokens in place of the RGB template's patch features. The baseline of the action-unit-style
    methods (FineFace and the like): the expression reaches the generator only through K numbers.

    analyser: "world-expr" (default; its 10 world parameters scaled to [0, 1] by `describe_unit`) on
        the world, "dlib-lms" (landmark ratios) on photos, or any `emojidiff.face` expression
        analyser spec (its `describe`).
    The analyser reads the whole template and ignores the face mask, as an action-unit detector
    reads a photo: masking would change what it was trained on, not what it measures.
    """

    def __init__(self, analyser: str | dict = "world-expr", image_size: int = 64):
        super().__init__()

        if isinstance(analyser, str):
            analyser = {"name": analyser, "init_args": {}}
        self.analyser = build_expression_analyser(analyser)
        self.image_size = int(image_size)
        self.feature_dim, self.num_tokens = int(self.analyser.descriptor_dim), 1
        self._set_trainable(False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] (mask ignored) -> (B, 1, K) float32 parameters."""
        x = images.float()
        x = self.resize(x)
        with torch.no_grad():
            describe = getattr(self.analyser, "describe_unit", self.analyser.describe)
            params = describe(x).float()
        return params[:, None]


@EXPRESSION_ENCODERS.register("landmarks")
class LandmarkExpressionEncoder(ExpressionEncoder):
    """Landmark control, as the landmark-conditioned peers use it (landmark ControlNets' 68 points,
    InstantID's 5 keypoints): a frozen landmark detector's points of the template, (B, 1, 2P), for the
    adapter's MLP projection (`expr_resampler_depth: 0`) to turn into tokens in place of the RGB
    template's patch features. Landmarks carry no iris (gaze), little of a brow furrow, and the
    template person's face shape (jaw, eye spacing, nose) along with the expression.

    detector: "world-lms" (default, on world portraits) or "dlib-68" (photos; an image without a face
        raises FaceNotFoundError naming it), or any `emojidiff.face.world_landmarks` spec.
    points: 68, or 5 (InstantID's keypoints: eye centres, nose tip, mouth corners).
    frame: "face" (default) takes out the template's pose: the points are moved so the eyes' centre
        is the origin, rotated so the outer eye corners lie level, and divided by their distance, so
        the tokens say what the face does, not where it sits; "image": fractions of the image side
        in [-1, 1], as a keypoint map would place them.
    The detector reads the whole template and ignores the face mask, as a detector reads a photo.
    """

    def __init__(
        self, detector: str | dict = "world-lms", points: int = 68, frame: str = "face", image_size: int = 64
    ):
        super().__init__()
        if points not in (5, 68):
            raise ValueError(f"points must be 68 or 5 (InstantID's keypoints), got {points!r}")
        if frame not in ("face", "image"):
            raise ValueError(f"frame must be 'face' or 'image', got {frame!r}")
        self.detector = build_landmark_detector(detector)
        self.points, self.frame, self.image_size = int(points), frame, int(image_size)
        self.feature_dim, self.num_tokens = 2 * self.points, 1
        self._set_trainable(False)

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) [0, 1] -> (B, P, 2) in the chosen frame (see the class docstring)."""
        with torch.no_grad():
            lms = self.detector(images.float()).float()  # (B, 68, 2) pixels
        if self.frame == "face":
            lms = to_face_frame(lms)
        else:
            side = torch.tensor([images.shape[-1], images.shape[-2]], dtype=lms.dtype, device=lms.device)
            lms = lms / side * 2.0 - 1.0
        return five_points(lms) if self.points == 5 else lms

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] (mask ignored) -> (B, 1, 2P) float32."""
        return self.landmarks(images).flatten(1)[:, None]


@EXPRESSION_ENCODERS.register("emotion_label")
class EmotionLabelEncoder(ExpressionParameterEncoder):
    """Emotion-label control (FaceCrafter and the label-conditioned peers): the template's emotion as
    the nearest of the world's six presets plus an intensity (`emojidiff.world.expression.nearest_preset`
    on a frozen world expression analyser's parameters), (B, 1, 7): a one-hot label and the intensity,
    which the adapter's MLP projection turns into tokens (one, in `configs/ablations/emotion_label.yaml`).
    Asymmetry (a wink's other eye, one raised brow), gaze and everything between the presets are lost.

    analyser: a world expression analyser ("world-expr", the training one, by default). Photos have
    no emotion classifier in this project, so another analyser is refused.
    """

    def __init__(self, analyser: str | dict = "world-expr", image_size: int = 64):
        super().__init__(analyser, image_size)
        if list(getattr(self.analyser, "names", [])) != Expression.names():
            raise ValueError(
                f"emotion_label needs an analyser of the world's 10 expression parameters (world-expr, "
                f"world-expr-eval), got {analyser!r}: there is no emotion classifier for photos here"
            )
        self.num_labels = len(PRESET_NAMES)
        self.feature_dim = self.num_labels + 1

    def labels(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) [0, 1] -> ((B,) preset index, (B,) intensity in [0, 1])."""
        with torch.no_grad():
            params = self.analyser.describe(self.resize(images.float()))
        return nearest_preset(params)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] (mask ignored) -> (B, 1, 7) float32: one-hot label, intensity."""
        label, intensity = self.labels(images)
        onehot = F.one_hot(label, self.num_labels).float()
        return torch.cat([onehot, intensity[:, None]], -1)[:, None].to(images.device)
