"""`emojidiff world-sample`: demo inputs for `generate`, rendered by the embedded world.

Writes into --out_dir:

    ids/id_00.png ...          identity references: N world identities, neutral expression
    templates/expr_00.png ...  expression templates: N *other* identities, with the presets
                               happy, surprised, angry, sad, wink first, then random expressions
    masks/expr_00.png ...      the renderer's exact face masks of the templates (white = face)
    pairs.csv                  every cross pair (id, expr, mask, prompt), for `generate --pairs`
    world_sample.json          identity ids, expression parameters, style, size and seeds

Identities come from a held-out id range (--identity_offset, default 1,000,000, outside the
training range of the world datamodule), so they are people no model was trained on.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from emojidiff.choices import Style
from emojidiff.splits import TEST_IDENTITIES

# torch, diffusers, PIL and the models are imported inside the functions that use them: `emojidiff --help`
# imports this module to list its options (start-up time).
HELP = "render demo identity references and expression templates from the embedded world"
TEMPLATE_PRESETS = ("happy", "surprised", "angry", "sad", "wink")


@dataclass
class WorldSampleOptions:
    """world sample"""

    out_dir: Path
    """the folder to write (ids/, templates/, masks/, pairs.csv, world_sample.json)"""
    n: int = 4
    """identities and templates each"""
    size: int = 64
    """image side in pixels (32-512)"""
    style: Style = "shaded"
    """world render style"""
    seed: int = 0
    """render seed (pose jitter, background, light)"""
    identity_offset: int = TEST_IDENTITIES[0]
    """first world identity id"""


#: run's keyword arguments -> the option dataclass each is parsed into (`emojidiff.cli`)
OPTIONS = {"opts": WorldSampleOptions}


def run(opts: WorldSampleOptions) -> list[Path]:
    """Render and write the files above; returns the image paths."""
    from emojidiff.images import save_image
    from emojidiff.world import Expression, Identity, render
    from emojidiff.world.prompts import portrait_prompt

    if opts.n < 1:
        raise ValueError(f"--n must be >= 1, got {opts.n}")
    out = opts.out_dir
    written, meta = [], {"style": opts.style, "size": opts.size, "ids": [], "templates": []}
    neutral = Expression.preset("neutral")
    for i in range(opts.n):
        ident = opts.identity_offset + i
        image, _ = render(Identity.sample(ident), neutral, opts.style, opts.size, opts.seed + i)
        written.append(save_image(image, out / "ids" / f"id_{i:02d}.png"))
        meta["ids"].append({"file": f"ids/id_{i:02d}.png", "identity_id": ident, "seed": opts.seed + i})
    for j in range(opts.n):
        ident = opts.identity_offset + opts.n + j
        expr = (
            Expression.preset(TEMPLATE_PRESETS[j])
            if j < len(TEMPLATE_PRESETS)
            else Expression.sample(opts.seed + j)
        )
        seed = opts.seed + opts.n + j
        image, mask = render(Identity.sample(ident), expr, opts.style, opts.size, seed)
        written.append(save_image(image, out / "templates" / f"expr_{j:02d}.png"))
        save_image(mask, out / "masks" / f"expr_{j:02d}.png")
        meta["templates"].append(
            {
                "file": f"templates/expr_{j:02d}.png",
                "identity_id": ident,
                "seed": seed,
                "expression": expr.as_dict(),
            }
        )
    prompt = portrait_prompt(opts.style)
    with (out / "pairs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "expr", "mask", "prompt"])
        for i in range(opts.n):
            for j in range(opts.n):
                w.writerow(
                    [f"ids/id_{i:02d}.png", f"templates/expr_{j:02d}.png", f"masks/expr_{j:02d}.png", prompt]
                )
    (out / "world_sample.json").write_text(json.dumps(meta, indent=2) + "\n")
    return written
