"""Weights that ship inside the package, and how configs name them (torch-free, so CLIs stay fast).

A backbone is a local diffusers folder given by path, or a packaged one given by name with the
`emojidiff:` prefix: `emojidiff:tiny-sd15` is the embedded tiny backbone that `make base` trains
and installs (fp16 safetensors in `emojidiff/models/weights/tiny-sd15/`). Every command and
config that takes a backbone path accepts either form.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "emojidiff:"
#: Packaged backbones by name -> their diffusers folder inside the package.
PACKAGED_BACKBONES: dict[str, Path] = {"tiny-sd15": Path(__file__).parent / "models" / "weights" / "tiny-sd15"}
#: The embedded default backbone of every command and config.
DEFAULT_BACKBONE = PREFIX + "tiny-sd15"


def resolve_backbone(path: str | Path) -> Path:
    """`emojidiff:NAME` -> the packaged folder of NAME; anything else -> `Path(path)` unchanged."""
    text = str(path)
    if not text.startswith(PREFIX):
        return Path(path)
    name = text[len(PREFIX) :]
    if name not in PACKAGED_BACKBONES:
        raise ValueError(f"unknown packaged backbone {text!r}; packaged: "
                         + ", ".join(PREFIX + n for n in PACKAGED_BACKBONES))
    return PACKAGED_BACKBONES[name]
