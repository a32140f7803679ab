"""`emojidiff world-sample`: demo inputs for `generate`, rendered by the embedded world.

Writes into --out-dir:

    ids/id_00.png ...          identity references: N world identities, neutral expression
    templates/expr_00.png ...  expression templates: N *other* identities, with the presets
                               happy, surprised, angry, sad, wink first, then random expressions
    masks/expr_00.png ...      the renderer's exact face masks of the templates (white = face)
    pairs.csv                  every cross pair (id, expr, mask, prompt), for `generate --pairs`
    world_sample.json          identity ids, expression parameters, style, size and seeds

Identities come from a held-out id range (--identity-offset, default 1,000,000, outside the
training range of the world datamodule), so they are people no model was trained on.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from emojidiff.splits import TEST_IDENTITIES

HELP = "render demo identity references and expression templates from the embedded world"
TEMPLATE_PRESETS = ("happy", "surprised", "angry", "sad", "wink")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--n", type=int, default=4, help="identities and templates each (default 4)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (32-512)")
    p.add_argument("--style", choices=("shaded", "cel", "brush"), default="shaded")
    p.add_argument("--seed", type=int, default=0, help="render seed (pose jitter, background, light)")
    p.add_argument("--identity-offset", type=int, default=TEST_IDENTITIES[0], help="first world identity id")


def run(args: argparse.Namespace) -> list[Path]:
    """Render and write the files above; returns the image paths."""
    from emojidiff.images import save_image
    from emojidiff.world import Expression, Identity, render
    from emojidiff.world.prompts import portrait_prompt

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    out = args.out_dir
    written, meta = [], {"style": args.style, "size": args.size, "ids": [], "templates": []}
    neutral = Expression.preset("neutral")
    for i in range(args.n):
        ident = args.identity_offset + i
        image, _ = render(Identity.sample(ident), neutral, args.style, args.size, args.seed + i)
        written.append(save_image(image, out / "ids" / f"id_{i:02d}.png"))
        meta["ids"].append({"file": f"ids/id_{i:02d}.png", "identity_id": ident, "seed": args.seed + i})
    for j in range(args.n):
        ident = args.identity_offset + args.n + j
        expr = Expression.preset(TEMPLATE_PRESETS[j]) if j < len(TEMPLATE_PRESETS) else Expression.sample(args.seed + j)
        seed = args.seed + args.n + j
        image, mask = render(Identity.sample(ident), expr, args.style, args.size, seed)
        written.append(save_image(image, out / "templates" / f"expr_{j:02d}.png"))
        save_image(mask, out / "masks" / f"expr_{j:02d}.png")
        meta["templates"].append({"file": f"templates/expr_{j:02d}.png", "identity_id": ident, "seed": seed,
                                  "expression": expr.as_dict()})
    prompt = portrait_prompt(args.style)
    with (out / "pairs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "expr", "mask", "prompt"])
        for i in range(args.n):
            for j in range(args.n):
                w.writerow([f"ids/id_{i:02d}.png", f"templates/expr_{j:02d}.png", f"masks/expr_{j:02d}.png", prompt])
    (out / "world_sample.json").write_text(json.dumps(meta, indent=2) + "\n")
    return written
