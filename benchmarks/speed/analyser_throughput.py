"""CPU throughput of the world analysers ("world-id", "world-expr") at batch 64.

    python -m benchmarks.speed.analyser_throughput [--batch 64] [--size 64] [--repeats 5] [--threads 2]

Measures images/s forward only (filtering, evaluation) and forward+backward to the input pixels
(the ICA losses back-propagate through the frozen analysers into the generated image). Prints a
table and writes outputs/bench/world_analyzers.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from emojidiff.face.world_models import WorldExpressionRegressor, WorldIdentityEncoder
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
    return {"forward": b / _best_seconds(forward, repeats), "forward_backward": b / _best_seconds(forward_backward, repeats)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/world_analyzers.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.batch
    batch = render_batch([Identity.sample(k) for k in range(n)], [Expression.sample(k) for k in range(n)],
                         [STYLES[k % len(STYLES)] for k in range(n)], size=args.size, seeds=list(range(n)))
    images = batch.images.permute(0, 3, 1, 2).float().div(255.0)
    models = {"world-id": WorldIdentityEncoder(), "world-expr": WorldExpressionRegressor()}
    table = Table(title=f"world analysers, CPU, torch threads={torch.get_num_threads()}, batch {n}, {args.size}px")
    for col in ("backend", "params", "forward img/s", "fwd+bwd img/s"):
        table.add_column(col, justify="right")
    results = []
    for name, model in models.items():
        row = measure(model, images, args.repeats)
        params = sum(p.numel() for p in model.parameters())
        results.append({"backend": name, "params": params, "batch": n, "size": args.size, "images_per_s": row})
        table.add_row(name, f"{params / 1e3:.0f}k", f"{row['forward']:.0f}", f"{row['forward_backward']:.0f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor()}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
