"""Weights that ship inside the package, and how configs name them (torch-free, so CLIs stay fast).

A backbone is a local diffusers folder given by path, or a packaged one given by name with the
`emojidiff:` prefix: `emojidiff:tiny-sd15` is the embedded tiny backbone that `make base` trains
and installs (fp16 safetensors in `emojidiff/models/weights/tiny-sd15/`). Every command and
config that takes a backbone path accepts either form.

Architecture-only stand-ins of the real networks ship the same way, as configuration files with no
weights: `emojidiff:sd15-arch` and `emojidiff:sdxl-arch` (backbones), `emojidiff:clip-vit-h-14-arch`
(the expression encoder's CLIP tower) and `emojidiff:arcface-r100-arch` (a torch ArcFace). Their
networks are built from the published configurations with seeded random weights
(`emojidiff.models.architectures`): for speed, memory and wiring at real scale, never for images or
tables. Such a folder holds `architecture_only.json`.

Trained EmojiDiff model folders ship the same way: `emojidiff:emojidiff-world` is the method
trained on the embedded world (stage 1 then ICA, `make train`), its adapter in fp16 on the packaged
backbone, installed by `make package`; `make demo` generates with it on a fresh clone.
"""

from __future__ import annotations

import json
from pathlib import Path

PREFIX = "emojidiff:"
#: Packaged backbones by name -> their diffusers folder inside the package.
ARCHITECTURES_DIR = Path(__file__).parent / "models" / "architectures"
#: The file that marks a folder as architecture-only (configuration files, no weights).
ARCHITECTURE_MARKER = "architecture_only.json"
PACKAGED_BACKBONES: dict[str, Path] = {
    "tiny-sd15": Path(__file__).parent / "models" / "weights" / "tiny-sd15",
    "sd15-arch": ARCHITECTURES_DIR / "sd15-arch",
    "sdxl-arch": ARCHITECTURES_DIR / "sdxl-arch",
}
#: Packaged encoder folders by name (architecture-only stand-ins of CLIP ViT-H/14 and ArcFace IResNet-100).
PACKAGED_ENCODERS: dict[str, Path] = {
    "clip-vit-h-14-arch": ARCHITECTURES_DIR / "clip-vit-h-14-arch",
    "arcface-r100-arch": ARCHITECTURES_DIR / "arcface-r100-arch",
}
#: The embedded default backbone of every command and config.
DEFAULT_BACKBONE = PREFIX + "tiny-sd15"
#: Packaged EmojiDiff model folders by name -> their folder inside the package.
PACKAGED_MODELS: dict[str, Path] = {
    "emojidiff-world": Path(__file__).parent / "models" / "weights" / "emojidiff-world"
}
#: The packaged trained model `make demo` uses.
DEFAULT_MODEL = PREFIX + "emojidiff-world"


def _resolve(path: str | Path, packaged: dict[str, Path], what: str) -> Path:
    text = str(path)
    if not text.startswith(PREFIX):
        return Path(path)
    name = text[len(PREFIX) :]
    if name not in packaged:
        raise ValueError(
            f"unknown packaged {what} {text!r}; packaged: " + ", ".join(PREFIX + n for n in packaged)
        )
    return packaged[name]


def resolve_backbone(path: str | Path) -> Path:
    """`emojidiff:NAME` -> the packaged backbone folder of NAME; anything else -> `Path(path)` unchanged."""
    return _resolve(path, PACKAGED_BACKBONES, "backbone")


def resolve_encoder(path: str | Path) -> Path:
    """`emojidiff:NAME` -> the packaged encoder folder of NAME; anything else -> `Path(path)` unchanged."""
    return _resolve(path, PACKAGED_ENCODERS, "encoder")


def is_architecture_only(folder: str | Path) -> bool:
    """True for a folder of configuration files with no weights (it holds `architecture_only.json`)."""
    return (Path(folder) / ARCHITECTURE_MARKER).is_file()


def read_marker(folder: str | Path) -> dict:
    """An architecture-only folder's `architecture_only.json` (ValueError naming the folder if it has none)."""
    path = Path(folder) / ARCHITECTURE_MARKER
    if not path.is_file():
        raise ValueError(f"{folder} is not an architecture-only folder (no {ARCHITECTURE_MARKER})")
    return json.loads(path.read_text())


def resolve_model(path: str | Path) -> Path:
    """`emojidiff:NAME` -> the packaged model folder of NAME; anything else -> `Path(path)` unchanged."""
    return _resolve(path, PACKAGED_MODELS, "model")
