"""PyTorch ArcFace IResNet (insightface recognition/arcface_torch), differentiable identity encoder.

The module layout and parameter names follow insightface's backbones/iresnet.py, so its released
backbone .pth files load with a strict key check.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from emojidiff.errors import MissingWeightsError
from emojidiff.face.base import IDENTITY_ENCODERS, ArcFaceEncoder
from emojidiff.packaged import is_architecture_only, read_marker, resolve_encoder

__all__ = ["ARCHS", "ArcFaceTorchEncoder", "IBasicBlock", "IResNet", "build_iresnet", "load_state_dict_file"]

# blocks per stage of each depth
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """ArcFace IResNet: (B, 3, 112, 112) normalised to [-1, 1] -> (B, num_features) raw embedding.

    Four stride-2 stages (64, 128, 256, 512 channels) take 112 to 7; BN, flatten, dropout,
    Linear(512*7*7 -> num_features), BatchNorm1d ("features", its weight fixed to 1).
    """

    fc_scale = 7 * 7

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512, dropout: float = 0.0):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
        )
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def _variance_preserving(net: IResNet) -> IResNet:
    """Re-initialise a random IResNet so that it stays finite in eval mode (identity BN statistics):
    arcface_torch's N(0, 0.1) convolutions grow activations ~100x per block, which training's batch
    statistics absorb but eval mode does not. He-normal convolutions and a zero last BN per residual
    block (each block starts as its shortcut, Goyal et al. 2017) keep the embedding's scale."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
        elif isinstance(m, IBasicBlock):
            nn.init.zeros_(m.bn3.weight)
    return net


def build_iresnet(arch: str, num_features: int = 512, dropout: float = 0.0) -> IResNet:
    if arch not in ARCHS:
        raise KeyError(f"unknown IResNet arch {arch!r}; known: {', '.join(ARCHS)}")
    return IResNet(ARCHS[arch], num_features, dropout)


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors or a torch .pth/.pt state dict (weights_only, no pickle code)."""
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return dict(state)


def _guess_arch(keys: list[str]) -> str | None:
    """The ARCHS entry whose block counts match `layerN.i.` keys, if any."""
    counts = [0, 0, 0, 0]
    for k in keys:
        m = re.match(r"layer([1-4])\.(\d+)\.", k)
        if m:
            stage, idx = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], idx + 1)
    return next((name for name, layers in ARCHS.items() if tuple(counts) == layers), None)


@IDENTITY_ENCODERS.register("arcface-torch")
class ArcFaceTorchEncoder(ArcFaceEncoder):
    """Differentiable ArcFace (insightface arcface_torch IResNet) on "arcface-112" crops.

    weights: a backbone state dict (.pth loaded with weights_only=True, or .safetensors), or the
        architecture-only `emojidiff:arcface-r100-arch` (seeded random IResNet-100: speed and wiring only;
        its folder's arch wins over `arch`).
    Preprocessing as in arcface_torch's inference.py: RGB, (x - 0.5) / 0.5 for x in [0, 1].
    The network stays frozen (requires_grad False, eval mode even under .train()) while gradients
    flow to the input pixels, which is what an identity loss needs.
    """

    differentiable = True

    def __init__(
        self,
        weights: str | Path | None = None,
        arch: str = "iresnet50",
        num_features: int = 512,
        freeze: bool = True,
    ):
        super().__init__()
        expected = [
            f"{arch} backbone state dict (.pth or .safetensors), e.g. insightface arcface_torch backbone.pth"
        ]
        if weights is None:
            raise MissingWeightsError("weights", None, expected)
        path = resolve_encoder(weights)
        if is_architecture_only(path):  # emojidiff:arcface-r100-arch: seeded random IResNet, wiring only
            marker = read_marker(path)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(marker.get("seed", 0)))
                self.net = _variance_preserving(build_iresnet(marker["arch"], num_features))
            arch = marker["arch"]
        elif not path.is_file():
            raise MissingWeightsError("weights", path.parent, [path.name], expected[0])
        else:
            self.net = build_iresnet(arch, num_features)
        self.embedding_dim = num_features
        self.weights = path
        if path.is_file():
            self._load(load_state_dict_file(path), arch)
        self.freeze = freeze
        if freeze:
            self.net.requires_grad_(False)
        self.train(False)

    def _load(self, state: dict[str, Tensor], arch: str) -> None:
        if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
            state = {k[len("module.") :]: v for k, v in state.items()}
        own = self.net.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or mismatched:
            guess = _guess_arch(list(state))
            parts = [f"weights {str(self.weights)!r} do not fit arch={arch!r}"]
            if guess and guess != arch:
                parts.append(f"they look like {guess!r} (set arch: {guess})")
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            ):
                if keys:
                    parts.append(
                        f"{label} keys ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    )
            raise ValueError("; ".join(parts))
        self.net.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> ArcFaceTorchEncoder:
        super().train(mode)
        if getattr(self, "freeze", True):
            self.net.eval()  # a frozen recogniser keeps its BN statistics in any mode
        return self

    @staticmethod
    def normalise(images: Tensor) -> Tensor:
        """RGB [0, 1] -> the network's [-1, 1] input."""
        return (images - 0.5) / 0.5

    def embed(self, images: Tensor) -> Tensor:
        param = next(self.net.parameters())
        return self.net(self.normalise(images.to(param.dtype)))
