"""The evaluation protocol as a file: every method sees exactly the same rows.

A row is (identity reference, expression template, style, prompt, seed). On the world it names
renders by their parameters, so ground truth is known: the reference is a held-out identity in
a held-out expression and scene, the template is *another* held-out identity wearing a held-out
expression, and the ground-truth answer is the reference identity wearing the template's
expression. On real data it names image files (a folder of identity photos x a folder of
templates).

    python -m benchmarks.evaluation.protocol --preset small --out configs/eval/protocol_world_small.csv
    python -m benchmarks.evaluation.protocol --preset paper --out configs/eval/protocol_world_paper.csv   # 50 x 30 x 3
    python -m benchmarks.evaluation.protocol --ids photos/ --template_dir templates/ --out protocol_real.csv

CSV columns: row_id, kind ("world" | "files"), style, prompt, seed, then for world rows
ref_identity, ref_expression_seed, ref_scene_seed, tmpl_identity, tmpl_expression_seed,
tmpl_scene_seed, tmpl_style; for file rows ref_path, tmpl_path (relative to the CSV).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np

from emojidiff.images import list_images
from emojidiff.options import parse_options
from emojidiff.splits import TEST_IDENTITIES, TEST_SEEDS, get_split
from emojidiff.world import STYLES
from emojidiff.world.prompts import portrait_prompt

#: Presets of the world protocol: identities x templates per identity x styles.
PRESETS: dict[str, tuple[int, int]] = {"small": (8, 6), "paper": (50, 30)}
_SALT = 0xE7A1


@dataclass(frozen=True)
class ProtocolRow:
    """One evaluation row (see the module docstring). Unused fields are -1 / ""."""

    row_id: int
    kind: str
    style: str
    prompt: str
    seed: int
    ref_identity: int = -1
    ref_expression_seed: int = -1
    ref_scene_seed: int = -1
    tmpl_identity: int = -1
    tmpl_expression_seed: int = -1
    tmpl_scene_seed: int = -1
    tmpl_style: str = ""
    ref_path: str = ""
    tmpl_path: str = ""


_FIELDS = {f.name for f in fields(ProtocolRow)}
_INT_FIELDS = {f.name for f in fields(ProtocolRow) if f.type in ("int", int)}


def world_protocol(
    identities: int, templates: int, styles: Sequence[str] = STYLES, seed: int = 0, split: str = "test"
) -> list[ProtocolRow]:
    """`identities` held-out people x `templates` held-out expression templates (each worn by
    another held-out person, in a random style) x `styles` output styles; rows in that order."""
    s = get_split(split)
    rng = np.random.default_rng([seed, _SALT])
    lo, hi = s.seeds
    people = s.identities[0] + np.arange(identities)
    donors = s.identities[0] + identities + np.arange(templates)  # template wearers: never a reference person
    refs = [(int(p), int(rng.integers(lo, hi)), int(rng.integers(lo, hi))) for p in people]
    tmpls = [
        (int(d), int(rng.integers(lo, hi)), int(rng.integers(lo, hi)), STYLES[int(rng.integers(len(STYLES)))])
        for d in donors
    ]
    rows = []
    for p, p_expr, p_scene in refs:
        for d, d_expr, d_scene, d_style in tmpls:
            for style in styles:
                rows.append(
                    ProtocolRow(
                        row_id=len(rows),
                        kind="world",
                        style=style,
                        prompt=portrait_prompt(style),
                        seed=int(rng.integers(lo, hi)),
                        ref_identity=p,
                        ref_expression_seed=p_expr,
                        ref_scene_seed=p_scene,
                        tmpl_identity=d,
                        tmpl_expression_seed=d_expr,
                        tmpl_scene_seed=d_scene,
                        tmpl_style=d_style,
                    )
                )
    return rows


def files_protocol(
    ids_dir: Path,
    templates_dir: Path,
    relative_to: Path,
    prompt: str = "a portrait photo of a person",
    seed: int = 0,
) -> list[ProtocolRow]:
    """Every identity photo x every template (sorted file names), paths relative to `relative_to`."""

    ids, tmpls = list_images(ids_dir, "identity"), list_images(templates_dir, "template")
    rng = np.random.default_rng([seed, _SALT])
    rows = []
    for ref in ids:
        for tmpl in tmpls:
            rows.append(
                ProtocolRow(
                    row_id=len(rows),
                    kind="files",
                    style="photo",
                    prompt=prompt,
                    seed=int(rng.integers(0, 2**31)),
                    ref_path=os.path.relpath(Path(ref).resolve(), relative_to.resolve()),
                    tmpl_path=os.path.relpath(Path(tmpl).resolve(), relative_to.resolve()),
                )
            )
    return rows


def write_protocol(rows: Sequence[ProtocolRow], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(ProtocolRow)])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    return path


def read_protocol(path: str | Path) -> list[ProtocolRow]:
    """Rows of a protocol CSV; file rows get absolute paths, checked to exist (the error names the
    CSV, the row and the missing file); world rows are checked to be held out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"protocol file not found: {path}")
    rows = []
    with open(path, newline="") as f:
        for n, raw in enumerate(csv.DictReader(f)):
            missing = {"row_id", "kind", "style", "prompt", "seed"} - set(raw)
            if missing:
                raise ValueError(f"{path}: columns {sorted(missing)} are missing")
            row = ProtocolRow(
                **{k: int(v) if k in _INT_FIELDS else v for k, v in raw.items() if k in _FIELDS and v != ""}
            )
            if row.kind == "files":
                for key in ("ref_path", "tmpl_path"):
                    file = (path.parent / getattr(row, key)).resolve()
                    if not file.is_file():
                        raise FileNotFoundError(
                            f"{path}: row {row.row_id} (line {n + 2}): {key} {file} does not exist"
                        )
                row = ProtocolRow(
                    **{
                        **asdict(row),
                        "ref_path": str((path.parent / row.ref_path).resolve()),
                        "tmpl_path": str((path.parent / row.tmpl_path).resolve()),
                    }
                )
            elif row.kind == "world":
                _check_held_out(row, path)
            else:
                raise ValueError(
                    f"{path}: row {row.row_id}: kind must be 'world' or 'files', got {row.kind!r}"
                )
            rows.append(row)
    ids = [r.row_id for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: row_id values repeat")
    return rows


def _check_held_out(row: ProtocolRow, path: Path) -> None:
    test = get_split("test")
    people = (row.ref_identity, row.tmpl_identity)
    seeds = (
        row.ref_expression_seed,
        row.ref_scene_seed,
        row.tmpl_expression_seed,
        row.tmpl_scene_seed,
        row.seed,
    )
    val = get_split("val")
    for p in people:
        if not (test.has_identity(p) or val.has_identity(p)):
            raise ValueError(
                f"{path}: row {row.row_id}: identity {p} is not held out (test {TEST_IDENTITIES})"
            )
    for s in seeds:
        if not (test.has_seed(s) or val.has_seed(s)):
            raise ValueError(f"{path}: row {row.row_id}: seed {s} is not held out (test {TEST_SEEDS})")
    if row.ref_identity == row.tmpl_identity:
        raise ValueError(
            f"{path}: row {row.row_id}: the template must show another person than the reference"
        )


@dataclass
class ProtocolConfig:
    """A protocol file to write: world rows (a preset, or identities x templates) or real-data rows.

    Args:
        out: the CSV to write.
        preset: a world protocol preset (identities x templates per identity).
        identities: world: held-out reference identities.
        templates: world: templates per identity.
        ids: real data: folder of identity photos.
        template_dir: real data: folder of expression templates.
        seed: the rows' seeds.
    """

    out: Path
    preset: Literal["paper", "small"] | None = None
    identities: int | None = None
    templates: int | None = None
    ids: Path | None = None
    template_dir: Path | None = None
    seed: int = 0


def main(argv: list[str] | None = None) -> Path:
    args, _ = parse_options(ProtocolConfig, argv)
    if args.ids or args.template_dir:
        if not (args.ids and args.template_dir):
            raise SystemExit("benchmarks.evaluation.protocol: real data needs both --ids and --template_dir")
        rows = files_protocol(args.ids, args.template_dir, args.out.parent, seed=args.seed)
    else:
        n_ids, n_tmpl = PRESETS[args.preset] if args.preset else (args.identities, args.templates)
        if not n_ids or not n_tmpl:
            raise SystemExit("benchmarks.evaluation.protocol: give --preset, or --identities and --templates")
        rows = world_protocol(n_ids, n_tmpl, seed=args.seed)
    out = write_protocol(rows, args.out)
    print(f"{len(rows)} rows -> {out}")
    return out


if __name__ == "__main__":
    main()
