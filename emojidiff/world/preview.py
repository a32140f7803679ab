"""World preview: a PNG grid, rows identities and columns expressions, one sheet per style.

    python -m emojidiff.world.preview --out docs/world_preview.png [--identities [0,1,2,...]] [--size 96]

`-c/--config FILE` reads the options from a YAML/JSON file, `--print_config` prints them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from emojidiff.options import parse_options

from .expression import PRESETS, Expression
from .identity import Identity
from .render import STYLES, render_batch

DEFAULT_IDENTITIES = (0, 1, 2, 3, 4, 5)


@dataclass
class PreviewOptions:
    """world preview"""

    out: Path = Path("docs/world_preview.png")
    """the PNG to write (its record, .json, beside it)"""
    identities: list[int] = field(default_factory=lambda: list(DEFAULT_IDENTITIES))
    """world identity ids, one row each"""
    size: int = 96
    """pixels per image"""
    seed: int = 0
    """render seed of row 0 (row r: seed+r)"""


def preview_sheet(style: str, identity_ids: list[int], size: int, seed: int) -> np.ndarray:
    """(rows*size, cols*size, 3) uint8: identity r with preset expression c, same seed per row."""
    presets = list(PRESETS)
    ids = [Identity.sample(i) for i in identity_ids for _ in presets]
    exprs = [Expression.preset(p) for _ in identity_ids for p in presets]
    seeds = [seed + r for r in range(len(identity_ids)) for _ in presets]
    images = render_batch(ids, exprs, style, size=size, seeds=seeds).images.numpy()
    rows = [
        np.concatenate(list(images[r * len(presets) : (r + 1) * len(presets)]), axis=1)
        for r in range(len(identity_ids))
    ]
    return np.concatenate(rows, axis=0)


def preview(identity_ids: list[int], size: int = 96, seed: int = 0) -> Image.Image:
    """All styles side by side, with a header naming the style and the expression columns."""
    header, gap = 28, 12
    sheets = [preview_sheet(s, identity_ids, size, seed) for s in STYLES]
    h, w = sheets[0].shape[:2]
    canvas = Image.new("RGB", (len(sheets) * w + (len(sheets) - 1) * gap, h + header), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (style, sheet) in enumerate(zip(STYLES, sheets, strict=True)):
        x0 = k * (w + gap)
        canvas.paste(Image.fromarray(sheet), (x0, header))
        draw.text((x0 + 2, 2), f"style: {style}", fill=(0, 0, 0))
        for c, name in enumerate(PRESETS):
            draw.text((x0 + c * size + 2, 15), name, fill=(90, 90, 90))
    return canvas


def main(argv: list[str] | None = None) -> None:
    opts, _ = parse_options(PreviewOptions, argv)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    preview(opts.identities, opts.size, opts.seed).save(opts.out)
    record = {"command": "python -m emojidiff.world.preview", **asdict(opts), "out": str(opts.out)}
    opts.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"wrote {opts.out} ({len(opts.identities)} identities x {len(PRESETS)} expressions x {len(STYLES)} styles)"
    )


if __name__ == "__main__":
    main()
