"""Renderer throughput: images/s of `emojidiff.world.render_batch` per style and size.

    python -m benchmarks.speed.render_throughput [--sizes 64 256] [--repeats 3]

Prints a table and writes outputs/bench/world_render.json (with the torch thread count, since the
renderer is a batched tensor program and scales with cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/world_render.json"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = Table(title=f"world renderer, torch threads={torch.get_num_threads()}")
    for col in ("size", "batch", *STYLES):
        table.add_column(col, justify="right")
    results = []
    for size in args.sizes:
        batch = BATCH_FOR_SIZE.get(size, 32)
        row = {s: measure(s, size, batch, args.repeats) for s in STYLES}
        results.append({"size": size, "batch": batch, "images_per_s": row})
        table.add_row(str(size), str(batch), *(f"{row[s]:.1f}" for s in STYLES))
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor()}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
