"""Renderer throughput: images/s of `emojidiff.world.render_batch` per style and size.

    python -m benchmarks.speed.render_throughput [--sizes '[64, 256]'] [--repeats 3] [--threads 0]

Prints a table and writes outputs/bench/world_render.json (with the torch thread count, since the
renderer is a batched tensor program and scales with cores).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from benchmarks.speed.report import machine, print_and_write
from emojidiff.options import parse_options
from emojidiff.world import STYLES, Expression, Identity, render_batch

BATCH_FOR_SIZE = {32: 512, 64: 256, 128: 64, 256: 32, 512: 8}


def measure(style: str, size: int, batch: int, repeats: int) -> float:
    """Best-of-`repeats` images/s for one batch of random identities and expressions."""
    ids = [Identity.sample(k) for k in range(batch)]
    exprs = [Expression.sample(k) for k in range(batch)]
    render_batch(ids[:2], exprs[:2], style, size=size, seeds=[0, 1])  # warm-up
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        render_batch(ids, exprs, style, size=size, seeds=list(range(r * batch, (r + 1) * batch)))
        best = min(best, time.perf_counter() - start)
    return batch / best


@dataclass
class RenderThroughputConfig:
    """The renderer's throughput per style and size.

    Args:
        sizes: image sides (px), each at its batch of BATCH_FOR_SIZE.
        repeats: timed batches per measurement (best kept).
        out: the JSON record.
        threads: torch threads (0: torch's default).
    """

    sizes: list[int] = field(default_factory=lambda: [64, 256])
    repeats: int = 3
    out: Path = Path("outputs/bench/world_render.json")
    threads: int = 0


def main(argv: list[str] | None = None) -> None:
    args, _ = parse_options(RenderThroughputConfig, argv)
    table = Table(title=f"world renderer, torch threads={torch.get_num_threads()}")
    for col in ("size", "batch", *STYLES):
        table.add_column(col, justify="right")
    results = []
    for size in args.sizes:
        batch = BATCH_FOR_SIZE.get(size, 32)
        row = {s: measure(s, size, batch, args.repeats) for s in STYLES}
        results.append({"size": size, "batch": batch, "images_per_s": row})
        table.add_row(str(size), str(batch), *(f"{row[s]:.1f}" for s in STYLES))
    meta = machine()
    print_and_write(args.out, {"meta": meta, "results": results}, table)


if __name__ == "__main__":
    main()
