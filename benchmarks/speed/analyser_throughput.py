"""CPU throughput of the world analysers ("world-id", "world-expr") at batch 64.

    python -m benchmarks.speed.analyser_throughput [--batch 64] [--size 64] [--repeats 5] [--threads 2] [-c bench.yaml]

Measures images/s forward only (filtering, evaluation) and forward+backward to the input pixels
(the ICA losses back-propagate through the frozen analysers into the generated image). Prints a
table and writes outputs/bench/world_analysers.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor

from benchmarks.speed.report import machine, print_and_write
from emojidiff.face.world_models import WorldExpressionRegressor, WorldIdentityEncoder
from emojidiff.images import to_tensor
from emojidiff.options import parse_options
from emojidiff.world import STYLES, Expression, Identity, render_batch


def _best_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(model: torch.nn.Module, images: Tensor, repeats: int) -> dict[str, float]:
    """images/s of `model(images)` without gradients and of forward+backward to the pixels."""

    def forward() -> None:
        with torch.no_grad():
            model(images)

    def forward_backward() -> None:
        x = images.detach().requires_grad_(True)
        model(x).square().sum().backward()

    b = images.shape[0]
    return {
        "forward": b / _best_seconds(forward, repeats),
        "forward_backward": b / _best_seconds(forward_backward, repeats),
    }


@dataclass
class AnalyserThroughputConfig:
    """The world analysers' CPU throughput.

    Args:
        batch: images per timed call.
        size: side of the rendered images (px).
        repeats: timed calls per measurement (best kept).
        threads: torch threads.
        out: the JSON record.
    """

    batch: int = 64
    size: int = 64
    repeats: int = 5
    threads: int = 2
    out: Path = Path("outputs/bench/world_analysers.json")


def main(argv: list[str] | None = None) -> None:
    args, _ = parse_options(AnalyserThroughputConfig, argv)
    n = args.batch
    batch = render_batch(
        [Identity.sample(k) for k in range(n)],
        [Expression.sample(k) for k in range(n)],
        [STYLES[k % len(STYLES)] for k in range(n)],
        size=args.size,
        seeds=list(range(n)),
    )
    images = to_tensor(batch.images)
    models = {"world-id": WorldIdentityEncoder(), "world-expr": WorldExpressionRegressor()}
    table = Table(
        title=f"world analysers, CPU, torch threads={torch.get_num_threads()}, batch {n}, {args.size}px"
    )
    for col in ("backend", "params", "forward img/s", "fwd+bwd img/s"):
        table.add_column(col, justify="right")
    results = []
    for name, model in models.items():
        row = measure(model, images, args.repeats)
        params = sum(p.numel() for p in model.parameters())
        results.append(
            {"backend": name, "params": params, "batch": n, "size": args.size, "images_per_s": row}
        )
        table.add_row(name, f"{params / 1e3:.0f}k", f"{row['forward']:.0f}", f"{row['forward_backward']:.0f}")
    meta = {"device": "cpu", **machine()}
    print_and_write(args.out, {"meta": meta, "results": results}, table)


if __name__ == "__main__":
    main()
