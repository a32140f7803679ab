"""`emojidiff probe-layers`: which attention layers carry the expression?

For every expression layer of the adapter (`--group layer`) or every UNet block holding some
(`--group block`: down_blocks.i / mid_block / up_blocks.i), the expression branch is switched off
there alone and the same seeded cross-identity pairs are regenerated: template of world identity
A with a random expression, identity reference of another identity B (neutral), the renderer's
exact face mask on the template. Each output is measured against

- the template: expression error, `ExpressionAnalyser.distance` of the two descriptors
  (--expression_analyser, default "world-expr": mean absolute error of the 10 world expression
  parameters; lower is better);
- the reference: identity similarity, cosine of the identity embeddings (--eval_identity_encoder,
  default the model's identity encoder; higher is better);

and compared with the all-layers-on baseline (Δ = ablated - baseline). An "all-off" row (the
expression branch off everywhere) shows the whole branch's effect. Outputs in --out_dir:
probe.csv, probe.md (sorted by Δ expression error), probe.png (two panels) and probe_config.json.

Reading it to choose `EAdapterConfig.expr_layers`: a layer whose removal raises the expression
error a lot carries expression; keep it. A layer with Δ expression error near 0 does no expression
work; drop it, all the more when its Δ identity similarity is positive (switching it off gives
identity back, i.e. the branch there leaks the template's appearance). Compare the deltas with the
all-off row: the layers to keep are those that together account for most of its Δ expression
error. The `pattern` column is the entry to put in `expr_layers`. With few pairs, deltas smaller
than the spread between pairs (see `expr_error_std`) are noise.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from emojidiff.choices import Style
from emojidiff.commands.common import (
    ModelOptions,
    SamplingOptions,
    Spec,
    load_model_from_args,
    sampling_kwargs,
    write_config,
)
from emojidiff.splits import TEST_IDENTITIES

# torch, diffusers, PIL and the models are imported inside the functions that use them: `emojidiff --help`
# imports this module to list its options (start-up time).
HELP = "switch the expression branch off one layer/block at a time and measure the effect"
log = logging.getLogger(__name__)

COLUMNS = (
    "condition",
    "kind",
    "pattern",
    "n_layers",
    "expr_error",
    "expr_error_std",
    "id_similarity",
    "id_similarity_std",
    "d_expr_error",
    "d_expr_error_ci_low",
    "d_expr_error_ci_high",
    "d_id_similarity",
    "d_id_similarity_ci_low",
    "d_id_similarity_ci_high",
    "n_valid",
)


@dataclass
class ProbeOptions:
    """probe"""

    out_dir: Path
    """output folder (probe.csv, probe.md, probe.png, probe_config.json)"""
    pairs: int = 8
    """number of (template, reference) pairs"""
    group: Literal["layer", "block"] = "layer"
    """switch the expression branch off per layer or per UNet block"""
    expression_analyser: Spec = "world-expr"
    """expression analyser, a name or a JSON spec"""
    eval_identity_encoder: Spec | None = None
    """identity encoder for the measurement (default: the model's), a name or a JSON spec"""
    style: Style = "shaded"
    """world render style"""
    identity_offset: int = TEST_IDENTITIES[0]
    """first world identity id (default: a range held out from training)"""
    prompt: str | None = None
    """prompt (default: the model's default_prompt, else the world's)"""
    seed: int = 0
    """pair k uses seed+k for its expression, render and noise"""


#: run's keyword arguments -> the option dataclass each is parsed into (`emojidiff.cli`), in --help's order
OPTIONS = {"model_options": ModelOptions, "opts": ProbeOptions, "sampling": SamplingOptions}
#: this command's defaults of shared options
DEFAULTS = {"steps": 20}


# ---------------------------------------------------------------------------------------------
# Pairs, units, switching
# ---------------------------------------------------------------------------------------------


def world_pairs(n: int, style: str, size: int, seed: int, identity_offset: int) -> dict:
    """n cross-identity pairs: template of identity A (expression sampled), reference of B (neutral).

    Returns {"templates": uint8 (n, S, S, 3), "masks": float32 (n, S, S), "refs": uint8 (n, S, S, 3),
    "meta": [per-pair dict of ids, seeds and expression]}.
    """
    import numpy as np

    from emojidiff.world import Expression, Identity, render_batch

    a_ids = [identity_offset + 2 * k for k in range(n)]
    b_ids = [identity_offset + 2 * k + 1 for k in range(n)]
    exprs = [Expression.sample(seed + k) for k in range(n)]
    seeds = [seed + k for k in range(n)]
    render_size = max(size, 32)
    tmpl = render_batch([Identity.sample(i) for i in a_ids], exprs, style, render_size, seeds)
    refs = render_batch(
        [Identity.sample(i) for i in b_ids],
        [Expression.preset("neutral")] * n,
        style,
        render_size,
        [s + 10_000 for s in seeds],
    )
    templates, masks, references = (
        tmpl.images.numpy(),
        tmpl.masks.numpy().astype(np.float32),
        refs.images.numpy(),
    )
    if render_size != size:  # the renderer's minimum is 32 px
        import cv2

        templates = np.stack([cv2.resize(t, (size, size), interpolation=cv2.INTER_AREA) for t in templates])
        masks = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA) for m in masks])
        references = np.stack([cv2.resize(r, (size, size), interpolation=cv2.INTER_AREA) for r in references])
    meta = [
        {"template_identity": a, "reference_identity": b, "seed": s, "expression": e.as_dict()}
        for a, b, s, e in zip(a_ids, b_ids, seeds, exprs, strict=True)
    ]
    return {"templates": templates, "masks": masks, "refs": references, "meta": meta}


def block_of(processor: str) -> str:
    """ "up_blocks.1.attentions.0....processor" -> "up_blocks.1"; "mid_block...." -> "mid_block"."""
    parts = processor.split(".")
    return "mid_block" if parts[0] == "mid_block" else ".".join(parts[:2])


def _unet_position(processor: str) -> tuple[int, int]:
    """Sort key down_blocks.i < mid_block < up_blocks.i (diffusers registers mid_block last)."""
    parts = processor.split(".")
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(parts[0], 3)
    index = int(parts[1]) if stage in (0, 2) and len(parts) > 1 and parts[1].isdigit() else 0
    return stage, index


def expression_units(adapter, group: str) -> dict[str, list[str]]:
    """{unit label: processor keys} over the adapter's expression layers, in UNet order
    (down blocks, mid block, up blocks)."""
    units: dict[str, list[str]] = {}
    for name in sorted(adapter.expression_layers(), key=_unet_position):
        label = name.removesuffix(".processor") if group == "layer" else block_of(name)
        units.setdefault(label, []).append(name)
    return units


def unit_pattern(label: str, group: str) -> str:
    """The `expr_layers` entry that selects this unit."""
    return label if group == "layer" else f"{label}.*"


@contextmanager
def expression_off(adapter, names: list[str]) -> Iterator[None]:
    """Switch the expression branch off in the processors `names`; restored on exit.

    Uses the processor's `has_expr` flag, not `expr_scale`: EmojiDiffPipeline re-applies the
    adapter-wide scales to every processor on each call, which would undo a per-layer scale of 0.
    With the flag off, the layer computes exactly what it does with expr_scale = 0.
    """
    procs = adapter.processors()
    saved = {n: procs[n].has_expr for n in names}
    try:
        for n in names:
            procs[n].has_expr = False
        yield
    finally:
        for n, v in saved.items():
            procs[n].has_expr = v


# ---------------------------------------------------------------------------------------------
# Measurement and reports
# ---------------------------------------------------------------------------------------------


def _generate(model, pairs: dict, id_embeds, prompt: str, sampling: SamplingOptions, size: int):
    import numpy as np
    import torch

    from emojidiff.images import to_tensor

    n, bs, out = len(pairs["meta"]), max(1, sampling.batch_size), []
    for s in range(0, n, bs):
        res = model.pipeline(
            to_tensor(pairs["templates"][s : s + bs]),
            id_embeds=id_embeds[s : s + bs],
            id_image=to_tensor(pairs["refs"][s : s + bs])
            if model.pipeline.adapter.uses_id_features
            else None,
            expr_mask=torch.from_numpy(pairs["masks"][s : s + bs])[:, None].to(model.pipeline.device),
            prompt=prompt,
            generator=[torch.Generator("cpu").manual_seed(m["seed"]) for m in pairs["meta"][s : s + bs]],
            height=size,
            width=size,
            **sampling_kwargs(sampling),
        )
        out.append(res.images)
    return np.concatenate(out)


def _stats(values) -> tuple[float, float, int]:
    import numpy as np

    v = np.asarray(values, np.float64)
    ok = v[np.isfinite(v)]
    if ok.size == 0:
        return float("nan"), float("nan"), 0
    return float(ok.mean()), float(ok.std()), int(ok.size)


def paired_delta(values, baseline) -> tuple[float, float, float]:
    """Mean of the per-pair differences values - baseline over pairs finite in both, with its
    normal-approximation 95% CI (mean +- 1.96 std / sqrt(n)): the same pairs are regenerated in
    every condition, so the pairing removes the pair-to-pair spread. NaN when no pair is finite."""
    import numpy as np

    d = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    half = 1.96 * float(d.std(ddof=1)) / np.sqrt(d.size) if d.size > 1 else float("nan")
    mean = float(d.mean())
    return mean, mean - half, mean + half


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS})
    return path


def sort_units(rows: list[dict]) -> list[dict]:
    """The per-unit rows (not baseline/all-off), largest expression-error increase first."""
    import math

    units = [r for r in rows if r["kind"] in ("layer", "block")]
    return sorted(units, key=lambda r: -r["d_expr_error"] if math.isfinite(r["d_expr_error"]) else math.inf)


def write_markdown(rows: list[dict], path: Path, title: str, notes: list[str]) -> Path:
    def line(r: dict) -> str:
        pattern = f"`{r['pattern']}`" if r["pattern"] else "-"

        def delta(key: str) -> str:
            return f"{r[key]:+.3g} [{r[key + '_ci_low']:+.3g}, {r[key + '_ci_high']:+.3g}]"

        return (
            f"| {r['condition']} | {pattern} | {r['n_layers']} | {r['expr_error']:.4g} | "
            f"{delta('d_expr_error')} | {r['id_similarity']:.4g} | {delta('d_id_similarity')} |"
        )

    head = [
        "| condition | pattern | layers | expr error | Δ expr error [95% CI] | id similarity | Δ id similarity [95% CI] |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    ref = [r for r in rows if r["kind"] in ("baseline", "all-off")]
    text = [
        f"# {title}",
        "",
        *notes,
        "",
        "## Reference",
        "",
        *head,
        *map(line, ref),
        "",
        "## Expression branch off, one at a time (sorted by Δ expression error)",
        "",
        *head,
        *map(line, sort_units(rows)),
        "",
        "## How to read",
        "",
        _HOW_TO_READ,
        "",
    ]
    path.write_text("\n".join(text))
    return path


_HOW_TO_READ = (
    "Δ = (this unit's expression branch off) - (all on). A large positive Δ expression error means the "
    "unit carries expression: keep it in `expr_layers`. Δ expression error near 0 means it does no "
    "expression work: drop it, especially when Δ identity similarity is positive (the branch there "
    "costs identity). Keep the units that together account for most of the all-off row's Δ expression "
    "error; paste their `pattern` entries into `EAdapterConfig.expr_layers`. The brackets are paired 95% "
    "confidence intervals over the pairs (every condition regenerates the same pairs): a Δ whose interval "
    "contains 0 is not distinguishable from no effect; add --pairs to narrow it."
)


def short_label(label: str) -> str:
    """Compact plot label: "up_blocks.1.attentions.0.transformer_blocks.0.attn2" -> "up_blocks.1/att0/tb0"."""
    parts = label.split(".")
    out, i = [], 0
    while i < len(parts):
        p = parts[i]
        if p in ("attentions", "transformer_blocks") and i + 1 < len(parts):
            out.append(("att" if p == "attentions" else "tb") + parts[i + 1])
            i += 2
        elif p == "attn2":
            i += 1
        elif p in ("down_blocks", "up_blocks") and i + 1 < len(parts):
            out.append(f"{p}.{parts[i + 1]}")
            i += 2
        else:
            out.append(p)
            i += 1
    return "/".join(out)


def write_plot(rows: list[dict], path: Path, title: str) -> Path:
    """Two horizontal bar panels (Δ expression error, Δ identity similarity) per unit, all-off dashed."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = sort_units(rows)
    all_off = next((r for r in rows if r["kind"] == "all-off"), None)
    labels = [short_label(r["condition"]) for r in units]
    height = max(2.5, 0.32 * len(units) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    y = list(range(len(units)))
    for ax, key, name in (
        (axes[0], "d_expr_error", "Δ expression error (higher: layer carries expression)"),
        (axes[1], "d_id_similarity", "Δ identity similarity (higher: layer costs identity)"),
    ):
        vals = [r[key] for r in units]
        ax.barh(y, vals, color=["#c0392b" if v > 0 else "#2471a3" for v in vals])
        ax.axvline(0, color="black", linewidth=0.8)
        if all_off is not None and math.isfinite(all_off[key]):
            ax.axvline(
                all_off[key], color="gray", linestyle="--", linewidth=1, label="all expression layers off"
            )
            ax.legend(fontsize=7, loc="best")
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run(opts: ProbeOptions, model_options: ModelOptions, sampling: SamplingOptions) -> list[dict]:
    """Probe and write probe.csv/.md/.png/_config.json; returns the rows (baseline, all-off, units)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from emojidiff.face.analyse import describe_expressions, embed_identities
    from emojidiff.models.bundle import build_expression_analyser, build_identity_encoder
    from emojidiff.world.prompts import portrait_prompt

    if opts.pairs < 1:
        raise ValueError(f"--pairs must be >= 1, got {opts.pairs}")
    t0 = time.perf_counter()
    model = load_model_from_args(model_options)
    adapter = model.pipeline.adapter
    units = expression_units(adapter, opts.group)
    if not units:
        raise ValueError(f"{model.source}: the adapter has no expression layers to probe")
    analyser = build_expression_analyser(opts.expression_analyser)
    id_encoder = (
        build_identity_encoder(opts.eval_identity_encoder)
        if opts.eval_identity_encoder
        else model.pipeline.identity_encoder
    )
    analyser.to(model.pipeline.device)
    id_encoder.to(model.pipeline.device)
    size = sampling.size or model.image_size
    prompt = (
        opts.prompt if opts.prompt is not None else (model.spec.default_prompt or portrait_prompt(opts.style))
    )

    pairs = world_pairs(opts.pairs, opts.style, size, opts.seed, opts.identity_offset)
    names = [f"pair {k} reference" for k in range(opts.pairs)]
    cond_ids = embed_identities(model.pipeline.identity_encoder, pairs["refs"], names)
    ref_emb = (
        cond_ids
        if id_encoder is model.pipeline.identity_encoder
        else embed_identities(id_encoder, pairs["refs"], names)
    )
    tmpl_desc = describe_expressions(
        analyser, pairs["templates"], [f"pair {k} template" for k in range(opts.pairs)]
    )

    conditions = [("baseline", "baseline", "", []), ("all-off", "all-off", "", adapter.expression_layers())]
    conditions += [
        (label, opts.group, unit_pattern(label, opts.group), layers) for label, layers in units.items()
    ]
    rows = []
    columns = (TextColumn("probe {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=sampling.quiet) as progress:
        task = progress.add_task(opts.group, total=len(conditions))
        for label, kind, pattern, layers in conditions:
            with expression_off(adapter, layers):
                images = _generate(model, pairs, cond_ids, prompt, sampling, size)
            gen_names = [f"{label}: output {k}" for k in range(opts.pairs)]
            sim = id_encoder.similarity(
                embed_identities(id_encoder, images, gen_names, on_missing="nan"), ref_emb
            )
            err = analyser.distance(describe_expressions(analyser, images, gen_names), tmpl_desc)
            e_mean, e_std, e_n = _stats(err.numpy())
            s_mean, s_std, s_n = _stats(sim.numpy())
            rows.append(
                {
                    "condition": label,
                    "kind": kind,
                    "pattern": pattern,
                    "n_layers": len(layers),
                    "expr_error": e_mean,
                    "expr_error_std": e_std,
                    "id_similarity": s_mean,
                    "id_similarity_std": s_std,
                    "n_valid": min(e_n, s_n),
                    "_err": err.numpy(),
                    "_sim": sim.numpy(),
                }
            )
            progress.advance(task)
    base = rows[0]
    for r in rows:
        r["d_expr_error"], r["d_expr_error_ci_low"], r["d_expr_error_ci_high"] = paired_delta(
            r["_err"], base["_err"]
        )
        r["d_id_similarity"], r["d_id_similarity_ci_low"], r["d_id_similarity_ci_high"] = paired_delta(
            r["_sim"], base["_sim"]
        )
    for r in rows:
        del r["_err"], r["_sim"]

    out = opts.out_dir
    out.mkdir(parents=True, exist_ok=True)
    title = f"probe-layers ({opts.group}): {model.source}"
    notes = [
        f"{opts.pairs} cross-identity world pairs ({opts.style}, {size} px), {sampling.steps} {sampling.scheduler} "
        f"steps, seed {opts.seed}; expression error: {opts.expression_analyser}; identity: "
        f"{opts.eval_identity_encoder or model.spec.identity_encoder['name']}."
    ]
    if model.untrained:
        notes.append("**The adapter is UNTRAINED (fresh); these numbers say nothing about a trained model.**")
    write_csv(rows, out / "probe.csv")
    write_markdown(rows, out / "probe.md", title, notes)
    write_plot(rows, out / "probe.png", title)
    write_config(
        out / "probe_config.json",
        "probe-layers",
        [model_options, opts, sampling],
        model=model.describe(),
        prompt=prompt,
        size=size,
        units=units,
        pairs=pairs["meta"],
        elapsed_s=round(time.perf_counter() - t0, 3),
    )
    log.info("probe-layers: %d conditions -> %s", len(rows), out)
    return rows
