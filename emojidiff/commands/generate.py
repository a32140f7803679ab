"""`emojidiff generate`: a portrait of person B (identity reference) wearing a template's expression.

Three forms (the model comes from --model DIR, or --backbone DIR with an untrained adapter):

    single   --id ref.png --expr tmpl.png [--expr_mask mask.png] --out out.png
    CSV      --pairs pairs.csv --out_dir DIR
             columns id,expr and optionally mask,prompt,out,seed; image paths relative to the CSV's
             folder, `out` relative to --out_dir; a missing seed is --seed + row index
    folders  --id_dir DIR --expr_dir DIR [--mask_dir DIR] [--pairing product|zip] --out_dir DIR
             every (identity, template) pair, or the i-th with the i-th; a mask is the file of the
             template's name in --mask_dir

Template masks (white = face): an explicit mask file wins; otherwise --mask_from none|world|aligner
(default: the model's `mask_from`). Images are centre-cropped to squares; templates are resized to
--size. Each image gets its own seeded noise, so an output depends on its seed, not on its batch.
`generate_config.json` (arguments, model, and every item with its seed) is written next to the
outputs; its "arguments" section, saved alone, is a --config file of this command.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from emojidiff.choices import MaskSource
from emojidiff.commands.common import (
    ModelOptions,
    SamplingOptions,
    load_model_from_args,
    sampling_kwargs,
    write_config,
)

# torch, diffusers, PIL and the models are imported inside the functions that use them: `emojidiff --help`
# imports this module to list its options (start-up time).
HELP = "generate portraits: identity reference + expression template -> image"
CONFIG_NAME = "generate_config.json"
log = logging.getLogger(__name__)


@dataclass
class GenerateOptions:
    """inputs: --id/--expr/--out (single), --pairs with --out_dir (CSV), --id_dir/--expr_dir with --out_dir (folders)"""

    id: Path | None = None
    """identity reference image (person B)"""
    expr: Path | None = None
    """expression template image (person A)"""
    out: Path | None = None
    """output PNG (single form)"""
    pairs: Path | None = None
    """CSV with columns id,expr[,mask][,prompt][,out][,seed]"""
    id_dir: Path | None = None
    """folder of identity references"""
    expr_dir: Path | None = None
    """folder of expression templates"""
    mask_dir: Path | None = None
    """folder of template masks named like the templates"""
    pairing: Literal["product", "zip"] = "product"
    """folder form: all pairs, or the i-th identity with the i-th template"""
    out_dir: Path | None = None
    """output folder (CSV and folder forms)"""
    expr_mask: Path | None = None
    """face mask of the template (white = face)"""
    mask_from: MaskSource | None = None
    """how to mask templates without a mask file (default: the model's mask_from)"""
    prompt: str | None = None
    """text prompt (default: the model's default_prompt)"""
    seed: int = 0
    """seed of the single image / of CSV row 0 (row i: seed+i)"""

    def __post_init__(self) -> None:
        if self.expr_mask is not None and self.mask_from is not None:
            raise ValueError("give --expr_mask or --mask_from, not both")


#: run's keyword arguments -> the option dataclass each is parsed into (`emojidiff.cli`), in --help's order
OPTIONS = {"model_options": ModelOptions, "opts": GenerateOptions, "sampling": SamplingOptions}


@dataclass
class Job:
    """One output image: paths of its inputs, its prompt, seed and output path."""

    id: Path
    expr: Path
    mask: Path | None
    prompt: str | None
    seed: int
    out: Path


# ---------------------------------------------------------------------------------------------
# Planning: which images to make
# ---------------------------------------------------------------------------------------------


def _jobs_from_csv(path: Path, out_dir: Path, seed: int) -> list[Job]:
    if not path.is_file():
        raise FileNotFoundError(f"--pairs CSV not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if not {"id", "expr"} <= columns:
            raise ValueError(f"{path} needs the columns id and expr, has {sorted(columns)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path} has no rows")
    base = path.parent
    jobs = []
    for i, row in enumerate(rows):
        line = i + 2
        if not (row.get("id") or "").strip() or not (row.get("expr") or "").strip():
            raise ValueError(f"{path}, line {line}: empty id or expr")
        id_path, expr_path = base / row["id"].strip(), base / row["expr"].strip()
        mask = (row.get("mask") or "").strip()
        out = (row.get("out") or "").strip() or f"{i:04d}_{id_path.stem}__{expr_path.stem}.png"
        seed_text = (row.get("seed") or "").strip()
        try:
            row_seed = int(seed_text) if seed_text else seed + i
        except ValueError:
            raise ValueError(f"{path}, line {line}: seed {seed_text!r} is not an integer") from None
        jobs.append(
            Job(
                id_path,
                expr_path,
                base / mask if mask else None,
                (row.get("prompt") or "").strip() or None,
                row_seed,
                out_dir / out,
            )
        )
    return jobs


def _jobs_from_dirs(opts: GenerateOptions) -> list[Job]:
    from emojidiff.images import list_images

    ids, exprs = list_images(opts.id_dir, "--id_dir"), list_images(opts.expr_dir, "--expr_dir")
    if opts.pairing == "zip":
        if len(ids) != len(exprs):
            raise ValueError(
                f"--pairing zip needs as many identities ({len(ids)}) as templates ({len(exprs)})"
            )
        pairs = list(zip(ids, exprs, strict=True))
    else:
        pairs = [(i, e) for i in ids for e in exprs]
    jobs = []
    for k, (i, e) in enumerate(pairs):
        mask = opts.mask_dir / e.name if opts.mask_dir is not None else None
        jobs.append(Job(i, e, mask, None, opts.seed + k, opts.out_dir / f"{i.stem}__{e.stem}.png"))
    return jobs


def plan(opts: GenerateOptions) -> tuple[list[Job], Path]:
    """The jobs of the chosen form and the folder that gets generate_config.json."""
    batch = opts.pairs is not None or opts.id_dir is not None or opts.expr_dir is not None
    if batch:
        if opts.id is not None or opts.expr is not None or opts.out is not None or opts.expr_mask is not None:
            raise ValueError(
                "give either --id/--expr/--out (single) or --pairs / --id_dir+--expr_dir with --out_dir"
            )
        if opts.out_dir is None:
            raise ValueError("the batch forms need --out_dir")
        if opts.pairs is not None:
            if opts.id_dir is not None or opts.expr_dir is not None:
                raise ValueError("give --pairs or --id_dir/--expr_dir, not both")
            jobs = _jobs_from_csv(opts.pairs, opts.out_dir, opts.seed)
        else:
            if opts.id_dir is None or opts.expr_dir is None:
                raise ValueError("the folder form needs both --id_dir and --expr_dir")
            jobs = _jobs_from_dirs(opts)
        config_dir = opts.out_dir
    else:
        missing = [n for n, v in (("--id", opts.id), ("--expr", opts.expr), ("--out", opts.out)) if v is None]
        if missing:
            raise ValueError(
                f"missing {', '.join(missing)} (or use --pairs / --id_dir+--expr_dir with --out_dir)"
            )
        jobs = [Job(opts.id, opts.expr, opts.expr_mask, None, opts.seed, opts.out)]
        config_dir = opts.out.parent
    outs = [j.out for j in jobs]
    dupes = sorted({str(o) for o in outs if outs.count(o) > 1})
    if dupes:
        raise ValueError(f"several items write the same output file: {', '.join(dupes[:5])}")
    _check_files(jobs)
    return jobs, config_dir


def _check_files(jobs: list[Job]) -> None:
    """Fail before loading any model when an input file is missing (naming it)."""
    from emojidiff.images import InputImageError

    for j in jobs:
        for path, what in (
            (j.id, "identity reference"),
            (j.expr, "expression template"),
            (j.mask, "template mask"),
        ):
            if path is not None and not path.is_file():
                raise InputImageError(f"{what} image not found: {path}")


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _template_masks(jobs: list[Job], mode: str, size: int):
    """(B, 1, S, S) float masks for a chunk, or None when no template is masked."""
    import numpy as np
    import torch

    from emojidiff.face.masks import template_mask
    from emojidiff.images import load_image, load_mask

    if mode == "none" and all(j.mask is None for j in jobs):
        return None
    masks = []
    for job in jobs:
        if job.mask is not None:
            masks.append(load_mask(job.mask, size))
        else:
            full = load_image(job.expr, "expression template") if mode == "aligner" else None
            masks.append(template_mask(full, mode, size, str(job.expr)))
    return torch.from_numpy(np.stack(masks))[:, None]


def generate_jobs(model, jobs: list[Job], sampling: SamplingOptions, mask_mode: str, size: int) -> list[Path]:
    """Run the pipeline over `jobs` in batches of --batch_size; write each output PNG."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from emojidiff.face.analyse import embed_identities
    from emojidiff.images import load_image, save_image, to_tensor

    pipe = model.pipeline
    id_cache: dict[Path, torch.Tensor] = {}
    ref_cache: dict[
        Path, Any
    ] = {}  # reference images, for a model whose identity branch reads their feature map
    written = []
    columns = (TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=sampling.quiet) as progress:
        task = progress.add_task("generate", total=len(jobs))
        for start in range(0, len(jobs), max(1, sampling.batch_size)):
            chunk = jobs[start : start + max(1, sampling.batch_size)]
            for job in chunk:
                if job.id not in id_cache:
                    ref = load_image(job.id, "identity reference")
                    id_cache[job.id] = embed_identities(pipe.identity_encoder, [ref], [str(job.id)])[0]
                    if pipe.adapter.uses_id_features:
                        ref_cache[job.id] = load_image(job.id, "identity reference", size)
            templates = [load_image(j.expr, "expression template", size) for j in chunk]
            masks = _template_masks(chunk, mask_mode, size)
            out = pipe(
                to_tensor(templates),
                id_embeds=torch.stack([id_cache[j.id] for j in chunk]),
                id_image=to_tensor([ref_cache[j.id] for j in chunk]) if ref_cache else None,
                expr_mask=None if masks is None else masks.to(pipe.device),
                prompt=[j.prompt if j.prompt is not None else model.spec.default_prompt for j in chunk],
                generator=[torch.Generator("cpu").manual_seed(j.seed) for j in chunk],
                height=size,
                width=size,
                **sampling_kwargs(sampling),
            )
            for job, image in zip(chunk, out.images, strict=True):
                written.append(save_image(image, job.out))
            progress.advance(task, len(chunk))
    return written


def run(opts: GenerateOptions, model_options: ModelOptions, sampling: SamplingOptions) -> list[Path]:
    """Plan, load the model, generate, write generate_config.json; returns the written images."""
    jobs, config_dir = plan(opts)
    t0 = time.perf_counter()
    model = load_model_from_args(model_options)
    size = sampling.size or model.image_size
    f = model.pipeline.backbone.vae_scale_factor
    if size % f:
        raise ValueError(f"--size must be a multiple of {f} for this backbone, got {size}")
    mask_mode = opts.mask_from or model.spec.mask_from
    for job in jobs:
        if job.prompt is None:
            job.prompt = opts.prompt if opts.prompt is not None else model.spec.default_prompt
    written = generate_jobs(model, jobs, sampling, mask_mode, size)
    write_config(
        config_dir / CONFIG_NAME,
        "generate",
        [model_options, opts, sampling],
        resolved={"size": size, "mask_from": mask_mode, "sampling": sampling_kwargs(sampling)},
        model=model.describe(),
        items=[asdict(j) for j in jobs],
        elapsed_s=round(time.perf_counter() - t0, 3),
    )
    log.info("wrote %d image(s) and %s", len(written), config_dir / CONFIG_NAME)
    return written
