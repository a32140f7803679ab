"""`make base`, after its two fits: the backbone folder's sample grid, its record, and its installation.

    python -m lightning_modules.base_release -c configs/base/release.yaml [--grid docs/base/samples.png] [--install true]

The two fits (`python -m emojidiff.cli fit -c configs/base/vae.yaml`, then `-c configs/base/unet.yaml`,
`lightning_modules.base_pretraining`) write the pretrained backbone to `folder`. This job loads that
folder with diffusers' own SD pipeline and draws text-to-image samples, a row per style (realistic,
anime, painting prompts), into `folder/samples.png` (also logged to the UNet stage's TensorBoard run
and, with `grid`, copied there); adds the sampling time and this command to the folder's record
`pretrain_config.json`; and with `install` writes the fp16 copy into the package as
`emojidiff:tiny-sd15` (`install_backbone`, with `base_record.json`).

A command, not callbacks of the UNet fit: these steps read the saved folder as every user of the
backbone does, run again without retraining (another grid, a reinstall), and `--install` is a plain
option rather than a callback's argument in the fit's YAML list.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from emojidiff.models.backbone import Backbone
from emojidiff.models.pipeline import load_sd_pipeline
from emojidiff.models.tiny import save_backbone
from emojidiff.options import parse_options
from emojidiff.packaged import PACKAGED_BACKBONES
from emojidiff.world import STYLES
from emojidiff.world.prompts import portrait_prompt
from lightning_modules.base_pretraining import read_record, write_record

PROG = "python -m lightning_modules.base_release"


@dataclass
class ReleaseOptions:
    """The release of a pretrained backbone folder."""

    folder: Path = Path("cache/base/tiny-sd15")
    """the backbone folder the two fits wrote (their model.init_args.export_dir)"""
    sample_steps: int = 30
    """DDIM steps of the sample grid"""
    columns: int = 8
    """samples per style (row)"""
    guidance: float = 3.0
    """text guidance of the samples"""
    seed: int = 0
    """noise seed of the grid (row k: seed + k)"""
    grid: Path | None = None
    """also copy the sample grid here (make base: docs/base/samples.png)"""
    install: bool = False
    """install the folder into the package as emojidiff:tiny-sd15 (fp16, with base_record.json)"""


@torch.no_grad()
def sample_grid(
    folder: Path, columns: int = 8, steps: int = 30, guidance: float = 3.0, seed: int = 0
) -> np.ndarray:
    """Text-to-image samples of the saved backbone with diffusers' own SD pipeline: a row per style,
    (rows * size, columns * size, 3) uint8."""
    pipe = load_sd_pipeline(folder, "ddim")
    rows = []
    for k, style in enumerate(STYLES):
        prompts = [portrait_prompt(style)] * columns
        generator = torch.Generator().manual_seed(seed + k)
        images = pipe(
            prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np"
        ).images
        rows.append(np.concatenate(list((images * 255).round().astype(np.uint8)), axis=1))
    return np.concatenate(rows, axis=0)


def install_backbone(
    folder: Path, dest: Path = PACKAGED_BACKBONES["tiny-sd15"], record: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Install the trained backbone in `folder` into the package (`dest`, default the folder behind
    `emojidiff:tiny-sd15`) as fp16 safetensors in the diffusers layout, with `base_record.json`:
    parameter counts per component, the stored dtype, the VAE's scaling factor and `record` (the
    pretraining record). Replaces whatever was installed there. Returns the base record."""
    backbone = Backbone.from_folder(folder, key="folder")
    counts = {
        name: sum(p.numel() for p in getattr(backbone, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_backbone(backbone.to(torch.float16), staging)
    base_record = {
        "name": "emojidiff:tiny-sd15",
        "dtype": "float16",
        "parameters": counts,
        "scaling_factor": float(backbone.vae.config.scaling_factor),
        "pretrain": record or {},
    }
    (staging / "base_record.json").write_text(json.dumps(base_record, indent=2) + "\n")
    for f in staging.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600; these are package data, readable by all
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return base_record


def _log_to_tensorboard(record: dict[str, Any], grid: np.ndarray) -> None:
    """The grid into the UNet stage's TensorBoard run, at its last step (when that run is known)."""
    unet = record.get("unet") or {}
    if unet.get("log_dir"):
        with SummaryWriter(unet["log_dir"]) as writer:
            writer.add_image("samples", grid, unet.get("global_step", 0), dataformats="HWC")


def release(options: ReleaseOptions, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Grid, record and (with `options.install`) installation of `options.folder`; returns the record."""
    folder = options.folder
    Backbone.from_folder(folder, key="folder")  # a missing or partial folder: say which, before sampling
    record = read_record(folder)
    record["release"] = {
        "command": shlex.join([*PROG.split(), *argv]),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
    }
    start = time.perf_counter()
    grid = sample_grid(folder, options.columns, options.sample_steps, options.guidance, options.seed)
    Image.fromarray(grid).save(folder / "samples.png")
    _log_to_tensorboard(record, grid)
    if options.grid is not None:
        options.grid.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "samples.png", options.grid)
    record["sampling_seconds"] = time.perf_counter() - start
    record.pop("installed", None)
    if options.install:
        record["installed"] = install_backbone(folder, record=dict(record))["parameters"]
    write_record(folder, record)
    return record


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, _ = parse_options(ReleaseOptions, argv, prog=PROG, description=__doc__)
    record = release(options, argv)
    summary = {
        stage: {k: v for k, v in part.items() if k != "config"} if isinstance(part, dict) else part
        for stage, part in record.items()
    }
    print(json.dumps(summary, indent=2, default=str))
    return record


if __name__ == "__main__":
    main()
