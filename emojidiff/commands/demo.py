"""`emojidiff demo` (`make demo`): the main job in one picture.

    emojidiff demo                                   # packaged model, 4 identities x 4 templates x 3 styles
    emojidiff demo --model outputs/train/ica/model --identities 6 --templates 5 --out outputs/demo/mine.png
    emojidiff demo --styles [cel] --steps 10         # one style, fewer steps

Renders held-out world people (never trained on: `emojidiff.splits` "test" identities and seeds):
identity references with a neutral face and expression templates worn by *other* people (happy,
surprised, angry, sad, wink, then random expressions), in each style. Every (reference, template)
pair is generated with the model, and every output is scored with the *evaluation* analysers
(`world-id-eval`, `world-expr-eval`, never used in training): identity similarity to the reference
("id", higher is better; the same person scores ~0.96, two strangers ~0.08) and expression error
against the template ("ex", mean absolute error of the 10 expression parameters, lower is better;
a ground-truth render of the reference wearing the template's expression scores ~0.10, an
unrelated expression ~0.41).

Writes the grid PNG (one panel per style: top row the templates, left column the references, each
cell the output with its two scores) and, beside it, `demo.json` (inputs, seeds, every score,
per-style means, the model and the resolved arguments); prints where the grid is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from emojidiff.choices import STYLES, Style
from emojidiff.commands.common import (
    ModelOptions,
    SamplingOptions,
    load_model_from_args,
    sampling_kwargs,
    write_config,
)
from emojidiff.commands.world_sample import TEMPLATE_PRESETS
from emojidiff.splits import HELD_OUT_SEED_OFFSET, TEST_IDENTITIES

# torch, diffusers, PIL and the models are imported inside the functions that use them: `emojidiff --help`
# imports this module to list its options (start-up time).
HELP = "the main job: a grid of held-out people wearing other people's expressions, scored (make demo)"
if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)
INK, GREY = (20, 20, 20), (90, 90, 90)
#: demo people start here inside the held-out identity range (apart from the evaluation protocol's)
DEMO_IDENTITY_OFFSET = TEST_IDENTITIES[0] + 500_000


@dataclass
class DemoOptions:
    """demo"""

    identities: int = 4
    """identity references (rows)"""
    templates: int = 4
    """expression templates (columns)"""
    styles: list[Style] = field(default_factory=lambda: list(STYLES))
    """one panel per style, e.g. [cel, brush]"""
    seed: int = 0
    """picks the people, scenes and noise"""
    cell: int = 128
    """pixels per image in the grid"""
    out: Path = Path("outputs/demo/demo.png")
    """the grid PNG (demo.json beside it)"""


#: run's keyword arguments -> the option dataclass each is parsed into (`emojidiff.cli`), in --help's order
OPTIONS = {"model_options": ModelOptions, "sampling": SamplingOptions, "opts": DemoOptions}
#: this command's defaults of shared options
DEFAULTS = {"batch_size": 16}


def demo_inputs(n_ids: int, n_templates: int, style: str, size: int, seed: int) -> dict:
    """References (n_ids, S, S, 3) uint8 neutral, templates (n_templates, S, S, 3) of other people
    with their face masks (n_templates, S, S) bool, and each one's world ids, expression and seed."""
    from emojidiff.world import Expression, Identity, render_batch

    base = DEMO_IDENTITY_OFFSET + seed * (n_ids + n_templates)
    ref_ids = [base + i for i in range(n_ids)]
    tmpl_ids = [base + n_ids + j for j in range(n_templates)]
    exprs = [
        Expression.preset(TEMPLATE_PRESETS[j])
        if j < len(TEMPLATE_PRESETS)
        else Expression.sample(HELD_OUT_SEED_OFFSET + seed * 1000 + j)
        for j in range(n_templates)
    ]
    ref_seeds = [HELD_OUT_SEED_OFFSET + seed * 1000 + 100 + i for i in range(n_ids)]
    tmpl_seeds = [HELD_OUT_SEED_OFFSET + seed * 1000 + 200 + j for j in range(n_templates)]
    refs = render_batch(
        [Identity.sample(i) for i in ref_ids], [Expression.preset("neutral")] * n_ids, style, size, ref_seeds
    )
    tmpl = render_batch([Identity.sample(i) for i in tmpl_ids], exprs, style, size, tmpl_seeds)
    names = [TEMPLATE_PRESETS[j] if j < len(TEMPLATE_PRESETS) else f"random {j}" for j in range(n_templates)]
    return {
        "refs": refs.images.numpy(),
        "templates": tmpl.images.numpy(),
        "masks": tmpl.masks.numpy(),
        "meta": {
            "reference_ids": ref_ids,
            "reference_seeds": ref_seeds,
            "template_ids": tmpl_ids,
            "template_seeds": tmpl_seeds,
            "template_names": names,
            "template_expressions": [e.as_dict() for e in exprs],
        },
    }


def compose_grid(panels: list[dict], cell: int) -> Image.Image:
    """One panel per style side by side: header row (templates), first column (references), cells
    (outputs) each with "id X / ex Y" beneath. panels: [{style, refs, templates, names, outputs
    (n_ids, n_t, S, S, 3), id (n_ids, n_t), ex (n_ids, n_t)}]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(11, cell // 9))
    text_h, pad, title_h = max(14, cell // 7), 6, max(20, cell // 5)
    n_ids, n_t = panels[0]["id"].shape
    pw = (n_t + 1) * (cell + pad) + pad
    ph = title_h + (n_ids + 1) * (cell + text_h + pad) + pad
    canvas = Image.new("RGB", (pw * len(panels), ph), "white")
    draw = ImageDraw.Draw(canvas)

    def paste(img, x: int, y: int) -> None:
        canvas.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))

    for k, panel in enumerate(panels):
        x0 = k * pw
        draw.text(
            (x0 + pad, 3), f"{panel['style']}: rows = identity, columns = expression", fill=INK, font=font
        )
        y = title_h
        draw.text((x0 + pad, y + cell // 2 - text_h), "templates ->", fill=GREY, font=font)
        draw.text((x0 + pad, y + cell // 2), "references v", fill=GREY, font=font)
        for j in range(n_t):
            x = x0 + pad + (j + 1) * (cell + pad)
            paste(panel["templates"][j], x, y)
            draw.text((x, y + cell + 1), f"template: {panel['names'][j]}", fill=GREY, font=font)
        for i in range(n_ids):
            y = title_h + (i + 1) * (cell + text_h + pad)
            paste(panel["refs"][i], x0 + pad, y)
            draw.text((x0 + pad, y + cell + 1), f"reference {i}", fill=GREY, font=font)
            for j in range(n_t):
                x = x0 + pad + (j + 1) * (cell + pad)
                paste(panel["outputs"][i, j], x, y)
                draw.text(
                    (x, y + cell + 1),
                    f"id {panel['id'][i, j]:.2f}  ex {panel['ex'][i, j]:.2f}",
                    fill=INK,
                    font=font,
                )
    return canvas


def run(opts: DemoOptions, model_options: ModelOptions, sampling: SamplingOptions) -> Path:
    import numpy as np
    import torch

    from emojidiff.face.analyse import describe_expressions, embed_identities
    from emojidiff.images import to_tensor
    from emojidiff.models.bundle import build_expression_analyser, build_identity_encoder
    from emojidiff.world.prompts import portrait_prompt

    if opts.identities < 1 or opts.templates < 1:
        raise ValueError(
            f"--identities and --templates must be >= 1, got {opts.identities}, {opts.templates}"
        )
    if not opts.styles:
        raise ValueError("--styles needs at least one style")
    t0 = time.perf_counter()
    model = load_model_from_args(model_options)
    if model.untrained:
        log.warning(
            "demo with an UNTRAINED adapter (--backbone): outputs ignore the identity and the expression"
        )
    pipe, size = model.pipeline, sampling.size or model.image_size or 64
    id_eval, expr_eval = build_identity_encoder("world-id-eval"), build_expression_analyser("world-expr-eval")
    id_eval.to(pipe.device)
    expr_eval.to(pipe.device)
    n_i, n_t = opts.identities, opts.templates
    panels, record = [], {"styles": {}}
    for style in opts.styles:
        inputs = demo_inputs(n_i, n_t, style, size, opts.seed)
        ref_names = [f"{style} reference {i}" for i in range(n_i)]
        cond = embed_identities(pipe.identity_encoder, list(inputs["refs"]), ref_names)
        pairs = [(i, j) for i in range(n_i) for j in range(n_t)]
        outputs = []
        for s in range(0, len(pairs), max(1, sampling.batch_size)):
            chunk = pairs[s : s + max(1, sampling.batch_size)]
            res = pipe(
                to_tensor([inputs["templates"][j] for _, j in chunk]),
                id_embeds=cond[[i for i, _ in chunk]],
                id_image=to_tensor([inputs["refs"][i] for i, _ in chunk])
                if pipe.adapter.uses_id_features
                else None,
                expr_mask=torch.from_numpy(np.stack([inputs["masks"][j] for _, j in chunk]))[:, None]
                .float()
                .to(pipe.device),
                prompt=portrait_prompt(style),
                generator=[
                    torch.Generator("cpu").manual_seed(opts.seed * 100_000 + i * 1000 + j) for i, j in chunk
                ],
                height=size,
                width=size,
                **sampling_kwargs(sampling),
            )
            outputs.append(res.images)
        images = np.concatenate(outputs).reshape(n_i, n_t, size, size, 3)
        flat = list(images.reshape(-1, size, size, 3))
        out_names = [f"{style} output {i},{j}" for i, j in pairs]
        sim = id_eval.similarity(
            embed_identities(id_eval, flat, out_names, on_missing="nan"),
            embed_identities(id_eval, list(inputs["refs"]), ref_names)[[i for i, _ in pairs]],
        )
        tmpl_desc = describe_expressions(
            expr_eval, list(inputs["templates"]), [f"{style} template {j}" for j in range(n_t)]
        )
        err = expr_eval.distance(
            describe_expressions(expr_eval, flat, out_names), tmpl_desc[[j for _, j in pairs]]
        )
        id_grid, ex_grid = sim.numpy().reshape(n_i, n_t), err.numpy().reshape(n_i, n_t)
        panels.append(
            {
                "style": style,
                "refs": inputs["refs"],
                "templates": inputs["templates"],
                "names": inputs["meta"]["template_names"],
                "outputs": images,
                "id": id_grid,
                "ex": ex_grid,
            }
        )
        record["styles"][style] = {
            **inputs["meta"],
            "identity_similarity": id_grid.tolist(),
            "expression_error": ex_grid.tolist(),
            "mean_identity_similarity": float(np.nanmean(id_grid)),
            "mean_expression_error": float(np.nanmean(ex_grid)),
        }
    out = opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    compose_grid(panels, opts.cell).save(out)
    elapsed = time.perf_counter() - t0
    write_config(
        out.with_suffix(".json"),
        "demo",
        [model_options, sampling, opts],
        model=model.describe(),
        size=size,
        elapsed_s=round(elapsed, 3),
        analysers={"identity": "world-id-eval", "expression": "world-expr-eval"},
        **record,
    )
    for style, r in record["styles"].items():
        print(
            f"{style:>6}: identity similarity {r['mean_identity_similarity']:.3f}, "
            f"expression error {r['mean_expression_error']:.3f} (evaluation analysers)"
        )
    print(
        f"demo grid ({n_i} identities x {n_t} templates x {len(opts.styles)} styles, {elapsed:.0f} s): {out}"
    )
    return out
