"""Identity encoder and expression regressor for the embedded world: small differentiable CNNs.

Both consume whole world portraits (the renderer centres the face, so `aligner_name` is "none"),
RGB (B, 3, H, W) in [0, 1], any size (resized to the network's `input_size`). They are trained by
`lightning_modules.world_analyser_training` (`make analysers`, `make eval-analysers`: the configs in
`configs/analysers/`) and the packaged weights live in `emojidiff/face/weights/`. Two pairs, trained apart:

- the *training* pair, which the training losses (ICA) and the IDI filters use:
  "world-id" (`WorldIdentityEncoder`): 128-d embedding, margin-trained over world identities so
  that renders of one identity (any expression, style, pose jitter) have high cosine similarity;
  "world-expr" (`WorldExpressionRegressor`): the 10 `Expression` parameters in natural units,
  so `distance` is their mean absolute error;
- the *evaluation* pair, which scores the tables: "world-id-eval" (`WorldEvalIdentityEncoder`) and
  "world-expr-eval" (`WorldEvalExpressionRegressor`), the same outputs from other architectures,
  another seed and a disjoint range of training identities (`EVAL_ANALYSER_TRAIN_IDENTITIES`), so
  a generator trained against the training pair cannot win the tables by gaming its loss networks.

Weights are a .safetensors file plus a JSON of the architecture config with the same stem
(`world_id.safetensors` + `world_id.json`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from emojidiff.errors import MissingWeightsError
from emojidiff.face.base import EXPRESSION_ANALYSERS, IDENTITY_ENCODERS, ExpressionAnalyser, IdentityEncoder
from emojidiff.images import to_signed
from emojidiff.world import Expression

__all__ = [
    "DEFAULT_EVAL_EXPR_WEIGHTS",
    "DEFAULT_EVAL_ID_WEIGHTS",
    "DEFAULT_EXPR_WEIGHTS",
    "DEFAULT_ID_WEIGHTS",
    "EVALUATION_ANALYSERS",
    "TRAINING_ANALYSERS",
    "WEIGHTS_DIR",
    "NetConfig",
    "WorldCNN",
    "WorldEvalExpressionRegressor",
    "WorldEvalIdentityEncoder",
    "WorldExpressionRegressor",
    "WorldIdentityEncoder",
    "load_world_weights",
    "save_world_weights",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_ID_WEIGHTS = WEIGHTS_DIR / "world_id.safetensors"
DEFAULT_EXPR_WEIGHTS = WEIGHTS_DIR / "world_expr.safetensors"
DEFAULT_EVAL_ID_WEIGHTS = WEIGHTS_DIR / "world_id_eval.safetensors"
DEFAULT_EVAL_EXPR_WEIGHTS = WEIGHTS_DIR / "world_expr_eval.safetensors"
#: Registry names of the default analysers by use: the training losses and filters use the
#: training pair, evaluation tables the evaluation pair (trained apart, see the module docstring).
TRAINING_ANALYSERS: dict[str, str] = {"identity": "world-id", "expression": "world-expr"}
EVALUATION_ANALYSERS: dict[str, str] = {"identity": "world-id-eval", "expression": "world-expr-eval"}
FORMAT_VERSION = 1
_HINT = (
    "run `make analysers` or `make eval-analysers` (python -m emojidiff.cli fit -c "
    "configs/analysers/train_pair.yaml, then python -m lightning_modules.world_analyser_report "
    "-c configs/analysers/train_pair_report.yaml --install true; eval_pair for the evaluation pair)"
)


@dataclass
class NetConfig:
    """Architecture of a `WorldCNN`.

    input_size: side the image is resized to; crop: (top, left, side) window cut from that
    resized image (None: the whole image), so a regressor can spend its pixels on the face;
    channels: one per stage, each stage after the stem halves the resolution;
    stem_stride: 1 or 2; stem_blocks: 3x3 convs at the stem's resolution (fine detail such as
    the iris position lives there); blocks: 3x3 convs per later stage (the first strided);
    hidden: width of an extra linear layer before the output (0: none); out_dim: outputs;
    out_norm: BatchNorm1d on the output (used for embeddings).
    """

    input_size: int = 64
    crop: tuple[int, int, int] | None = None
    channels: tuple[int, ...] = (32, 64, 96, 128)
    stem_stride: int = 2
    stem_blocks: int = 1
    blocks: int = 2
    hidden: int = 0
    out_dim: int = 128
    out_norm: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NetConfig keys {unknown}; known: {sorted(known)}")
        data = dict(data)
        if data.get("crop") is not None:
            data["crop"] = tuple(int(v) for v in data["crop"])
        if "channels" in data:
            data["channels"] = tuple(int(v) for v in data["channels"])
        return cls(**data)

    @property
    def net_size(self) -> int:
        """Side of the image the convolutions see (the crop's, else input_size)."""
        return self.crop[2] if self.crop is not None else self.input_size

    @property
    def feature_size(self) -> int:
        side = self.net_size // self.stem_stride
        for _ in self.channels[1:]:
            side = (side + 1) // 2
        return side


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class WorldCNN(nn.Module):
    """Plain conv net: (B, 3, S, S) in [0, 1] at `input_size` -> (B, out_dim).

    The final feature map is flattened rather than pooled: portraits are centred, and where a
    feature sits (eye line, mouth corner) carries identity and expression.
    """

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = _conv(3, config.channels[0], config.stem_stride)
        cin = config.channels[0]
        for _ in range(config.stem_blocks - 1):
            layers += _conv(cin, cin, 1)
        stage_ends = [len(layers)]
        for cout in config.channels[1:]:
            layers += _conv(cin, cout, 2)
            for _ in range(config.blocks - 1):
                layers += _conv(cout, cout, 1)
            cin = cout
            stage_ends.append(len(layers))
        self.features = nn.Sequential(*layers)
        self.stage_ends = tuple(stage_ends)  # index after each stage's last ReLU in `features`
        flat = cin * config.feature_size**2
        head: list[nn.Module] = [nn.Flatten()]
        if config.hidden:
            head += [nn.Linear(flat, config.hidden), nn.ReLU(inplace=True)]
            flat = config.hidden
        head.append(nn.Linear(flat, config.out_dim))
        if config.out_norm:
            head.append(nn.BatchNorm1d(config.out_dim))
        self.head = nn.Sequential(*head)

    def prepare(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) [0, 1] -> the conv input (B, 3, s, s) in [-1, 1] (resize, then crop)."""
        cfg = self.config
        if images.shape[-2:] != (cfg.input_size, cfg.input_size):
            shrink = min(images.shape[-2:]) > cfg.input_size
            images = F.interpolate(
                images,
                size=(cfg.input_size, cfg.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )
        if cfg.crop is not None:
            top, left, side = cfg.crop
            images = images[:, :, top : top + side, left : left + side]
        return to_signed(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(self.prepare(images)))

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) [0, 1] -> the output of every stage, (B, C_i, S_i, S_i) each, then the
        head's output (B, out_dim): the network's view of the image, for perceptual losses."""
        x, maps, start = self.prepare(images), [], 0
        for end in self.stage_ends:
            x = self.features[start:end](x)
            maps.append(x)
            start = end
        return [*maps, self.head(x)]


# --------------------------------------------------------------------------------------------
# weights on disk: <stem>.safetensors + <stem>.json


def save_world_weights(
    net: WorldCNN, path: str | Path, kind: str, extra: Mapping[str, Any] | None = None, half: bool = True
) -> Path:
    """Write `net`'s state to `path` (.safetensors; float tensors as fp16 when `half`) and its
    architecture config plus `extra` metadata to the .json beside it. Returns the .safetensors path."""

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu()
        state[k] = (v.half() if half and v.is_floating_point() else v).contiguous()
    save_file(state, str(path), metadata={"kind": kind, "format_version": str(FORMAT_VERSION)})
    path.chmod(0o644)  # safetensors writes 0600; these are package data, readable by all
    meta = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "net": asdict(net.config),
        "dtype": "float16" if half else "float32",
    }
    meta.update(dict(extra or {}))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_world_weights(path: str | Path, kind: str, key: str = "weights") -> tuple[WorldCNN, dict[str, Any]]:
    """A `WorldCNN` (float32, eval mode) and the JSON metadata of the weights at `path`.

    Raises MissingWeightsError(key, ...) naming the .safetensors and .json it expects.
    """

    path = Path(path)
    meta_path = path.with_suffix(".json")
    missing = [p for p in (path, meta_path) if not p.is_file()]
    if missing:
        raise MissingWeightsError(
            key,
            path,
            [path.name, meta_path.name],
            f"not found: {', '.join(str(p) for p in missing)}. " + _HINT,
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds {meta.get('kind')!r} weights, expected {kind!r} (config key `{key}`)")
    net = WorldCNN(NetConfig.from_dict(meta["net"]))
    state = {
        k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path), device="cpu").items()
    }
    net.load_state_dict(state, strict=True)
    return net.eval(), meta


class _WorldModel:
    """Shared construction: packaged/explicit weights, or a random network for training."""

    kind: str
    role: str = "training"  # which pair: "training" or "evaluation" (recorded in the weights' JSON)
    default_net: NetConfig
    net: WorldCNN
    meta: dict[str, Any]
    freeze: bool

    def _build(
        self,
        weights: str | Path | None,
        pretrained: bool,
        freeze: bool | None,
        arch: Mapping[str, Any] | None,
    ) -> None:
        if pretrained and weights is not None:
            if arch:
                raise ValueError(
                    "arch overrides apply only to a random network (weights=None or pretrained=False)"
                )
            self.net, self.meta = load_world_weights(weights, self.kind)
            self.weights: Path | None = Path(weights)
        else:
            cfg = NetConfig.from_dict({**asdict(self.default_net), **dict(arch or {})})
            self.net, self.meta, self.weights = WorldCNN(cfg), {}, None
        self.freeze = (self.weights is not None) if freeze is None else freeze
        if self.freeze:
            self.net.requires_grad_(False)
        self.train(False)  # type: ignore[attr-defined]

    def _keep_frozen_eval(self) -> None:
        if getattr(self, "freeze", False):
            self.net.eval()  # a frozen analyser keeps its BatchNorm statistics in any mode

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) [0, 1] -> every stage's feature map and the head's output (`WorldCNN.feature_maps`)."""
        return self.net.feature_maps(images)

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None, half: bool = True) -> Path:
        """Write weights (.safetensors) and architecture (.json) at `path`; see save_world_weights."""
        return save_world_weights(
            self.net, path, self.kind, {**self._meta_extra(), **dict(extra or {})}, half
        )

    def _meta_extra(self) -> dict[str, Any]:
        return {"role": self.role}


@IDENTITY_ENCODERS.register("world-id")
class WorldIdentityEncoder(_WorldModel, IdentityEncoder):
    """Identity embedding of world portraits: (B, 3, H, W) [0, 1] -> (B, 128), differentiable.

    weights: a .safetensors file with its .json beside it (default: the packaged
    `weights/world_id.safetensors`); weights=None or pretrained=False builds a random network
    (architecture from `arch`, overriding NetConfig fields) for training. freeze (default: True
    with weights, False without) turns off parameter gradients and keeps eval mode under
    .train(); gradients still reach the input pixels, as an identity loss needs.
    `same_person_threshold` is read from the weights' JSON (the verification EER threshold).
    """

    kind = "world-id"
    default_net = NetConfig(
        input_size=32, channels=(32, 64, 96, 128), stem_stride=1, blocks=2, out_dim=128, out_norm=True
    )
    differentiable = True
    aligner_name = "none"

    def __init__(
        self,
        weights: str | Path | None = DEFAULT_ID_WEIGHTS,
        pretrained: bool = True,
        freeze: bool | None = None,
        arch: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self._build(weights, pretrained, freeze, arch)
        self.embedding_dim = self.net.config.out_dim
        self.input_size = self.net.config.input_size
        self.same_person_threshold = self.meta.get("same_person_threshold")
        #: `token_features`: the last stage's map, one token per cell
        self.token_feature_dim = self.net.config.channels[-1]
        self.num_token_features = self.net.config.feature_size**2

    def train(self, mode: bool = True) -> WorldIdentityEncoder:
        super().train(mode)
        self._keep_frozen_eval()
        return self

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) [0, 1] at `input_size` -> (B, embedding_dim) raw embeddings."""
        return self.net(images)

    def token_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) [0, 1] -> (B, num_token_features, token_feature_dim): the last conv stage's
        map (before the embedding head), one token per cell in row-major order; differentiable."""
        fmap = self.feature_maps(images)[-2]
        return fmap.flatten(2).transpose(1, 2)

    def _meta_extra(self) -> dict[str, Any]:
        return {**super()._meta_extra(), "same_person_threshold": self.same_person_threshold}


@EXPRESSION_ANALYSERS.register("world-expr")
class WorldExpressionRegressor(_WorldModel, ExpressionAnalyser):
    """The 10 world `Expression` parameters of portraits: (B, 3, H, W) [0, 1] -> (B, 10) in the
    parameters' natural units (smile in [-1, 1], mouth_open in [0, 1], ...; not clamped, so
    gradients never vanish at a bound). Differentiable. Arguments as for WorldIdentityEncoder.

    Internally the network predicts each parameter scaled to [0, 1] with Expression.lows()/highs().
    """

    kind = "world-expr"
    # The face's moving parts lie in rows 14-40 and columns 17-46 of a 64 px portrait (pose jitter
    # included), the chin above row 51: a 40 px crop at full resolution keeps one-pixel cues.
    default_net = NetConfig(
        input_size=64,
        crop=(10, 12, 40),
        channels=(24, 48, 96, 128),
        stem_stride=1,
        stem_blocks=2,
        blocks=2,
        hidden=128,
        out_dim=10,
    )
    differentiable = True
    aligner_name = "none"

    def __init__(
        self,
        weights: str | Path | None = DEFAULT_EXPR_WEIGHTS,
        pretrained: bool = True,
        freeze: bool | None = None,
        arch: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.names = Expression.names()
        self.descriptor_dim = len(self.names)
        self._build(weights, pretrained, freeze, arch)
        if self.net.config.out_dim != self.descriptor_dim:
            raise ValueError(f"world-expr needs out_dim={self.descriptor_dim}, got {self.net.config.out_dim}")
        self.register_buffer("low", torch.from_numpy(Expression.lows().astype(np.float32)), persistent=False)
        self.register_buffer(
            "span",
            torch.from_numpy((Expression.highs() - Expression.lows()).astype(np.float32)),
            persistent=False,
        )

    def train(self, mode: bool = True) -> WorldExpressionRegressor:
        super().train(mode)
        self._keep_frozen_eval()
        return self

    def describe_unit(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) [0, 1] -> (B, 10) parameters scaled to [0, 1] (the training target)."""
        return self.net(images)

    def describe(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) [0, 1] -> (B, 10) parameters in natural units."""
        return self.low + self.describe_unit(images) * self.span

    def to_unit(self, params: Tensor) -> Tensor:
        """Natural-unit parameters (B, 10) -> [0, 1] scale."""
        return (params - self.low) / self.span


# --------------------------------------------------------------------------------------------
# the evaluation pair: same interfaces and weights format, other architectures and training


@IDENTITY_ENCODERS.register("world-id-eval")
class WorldEvalIdentityEncoder(WorldIdentityEncoder):
    """The evaluation identity encoder: (B, 3, H, W) [0, 1] -> (B, 128) L2-normalised, like
    "world-id" but another network (48 px input, strided stem, wider late stages), another seed and
    disjoint training identities (`EVAL_ANALYSER_TRAIN_IDENTITIES`). Default weights: the packaged
    `weights/world_id_eval.safetensors`. Arguments as for WorldIdentityEncoder."""

    role = "evaluation"
    default_net = NetConfig(
        input_size=48, channels=(32, 64, 128, 192), stem_stride=2, blocks=2, out_dim=128, out_norm=True
    )

    def __init__(
        self,
        weights: str | Path | None = DEFAULT_EVAL_ID_WEIGHTS,
        pretrained: bool = True,
        freeze: bool | None = None,
        arch: Mapping[str, Any] | None = None,
    ):
        super().__init__(weights, pretrained, freeze, arch)


@EXPRESSION_ANALYSERS.register("world-expr-eval")
class WorldEvalExpressionRegressor(WorldExpressionRegressor):
    """The evaluation expression regressor: (B, 3, H, W) [0, 1] -> (B, 10) natural units, like
    "world-expr" but another network (a wider 44 px face crop, narrower stages, a wider hidden
    layer), another seed and disjoint training identities. Default weights: the packaged
    `weights/world_expr_eval.safetensors`. Arguments as for WorldExpressionRegressor."""

    role = "evaluation"
    default_net = NetConfig(
        input_size=64,
        crop=(8, 10, 44),
        channels=(16, 40, 80, 120),
        stem_stride=1,
        stem_blocks=2,
        blocks=2,
        hidden=160,
        out_dim=10,
    )

    def __init__(
        self,
        weights: str | Path | None = DEFAULT_EVAL_EXPR_WEIGHTS,
        pretrained: bool = True,
        freeze: bool | None = None,
        arch: Mapping[str, Any] | None = None,
    ):
        super().__init__(weights, pretrained, freeze, arch)
