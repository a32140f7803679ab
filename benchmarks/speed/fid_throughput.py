"""Throughput of the FID feature extractor inside torchmetrics against a bare forward of the network.

    python -m benchmarks.speed.fid_throughput [--n 32] [--size 64] [--repeats 3] [--device cpu] [--threads 0]

Times `FrechetInceptionDistance.update` (built by `benchmarks.evaluation.metrics.make_fid`: TF-FID InceptionV3
TorchScript behind `TFInceptionFeatures`) on N world portraits of SIZE px, and a bare forward of
the same TorchScript on the same batch already resized and mapped to its input range (the
preprocessing is not timed there). The ratio update/bare images per second is the cost of our
wrapper plus torchmetrics' bookkeeping (resize to 299, range mapping, the float64 covariance
update); the target is >= 0.9. Both are warmed up first (TorchScript's profiling executor
optimises on the second call) and timed in alternating order, best of `--repeats`. Writes the figures and
arguments to `--out` (default outputs/bench/fid_throughput.json) and prints a table.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from benchmarks.evaluation.fid_features import make_fid
from benchmarks.speed.report import print_and_write, sync
from emojidiff.images import to_tensor
from emojidiff.options import parse_options
from emojidiff.world import Expression, Identity, render_batch


def world_images(n: int, size: int) -> torch.Tensor:
    """n world portraits: float (n, 3, size, size) in [0, 1]."""
    out = render_batch(
        [Identity.sample(i) for i in range(n)],
        [Expression.sample(i) for i in range(n)],
        "shaded",
        size=size,
        seeds=list(range(n)),
    )
    return to_tensor(out.images)


def measure(n: int = 32, size: int = 64, repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """{"images_per_s": {"bare_forward", "fid_update"}, "ratio": fid_update / bare_forward, "seconds": {...}}."""
    dev = torch.device(device)
    fid = make_fid(dev)
    images = world_images(n, size).to(dev)
    net = fid.inception.net
    with torch.no_grad():
        pre = fid.inception.preprocess(images)
        for _ in range(2):  # warm-up: the profiling executor optimises the graph on its second run
            net(pre[:2])
            fid.update(images[:2], real=False)
    sync(dev)
    seconds: dict[str, list[float]] = {"bare_forward": [], "fid_update": []}

    def bare() -> None:
        with torch.no_grad():
            net(pre)

    def update() -> None:
        fid.update(images, real=True)

    for r in range(repeats):
        order = (("bare_forward", bare), ("fid_update", update))
        for key, call in order if r % 2 == 0 else order[::-1]:  # alternate which one runs first
            start = time.perf_counter()
            call()
            sync(dev)
            seconds[key].append(time.perf_counter() - start)
    ips = {k: n / min(v) for k, v in seconds.items()}
    return {
        "images_per_s": ips,
        "ratio": ips["fid_update"] / ips["bare_forward"],
        "seconds": seconds,
        "n": n,
        "size": size,
        "device": str(dev),
    }


@dataclass
class FIDThroughputConfig:
    """The FID extractor's throughput inside the metric and bare.

    Args:
        n: images per timed batch.
        size: side of the input images (resized to 299 inside).
        repeats: timed batches per way (best kept).
        device: torch device.
        threads: torch threads (0: torch's default).
        out: the JSON record.
    """

    n: int = 32
    size: int = 64
    repeats: int = 3
    device: str = "cpu"
    threads: int = 0
    out: Path = Path("outputs/bench/fid_throughput.json")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, _ = parse_options(FIDThroughputConfig, argv)
    result = measure(args.n, args.size, args.repeats, args.device)
    record = {
        "command": "python -m benchmarks.speed.fid_throughput",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "target_ratio": 0.9,
        **result,
    }
    table = Table(
        title=f"TF-FID Inception, {args.n} images of {args.size} px on {args.device} "
        f"({record['torch_threads']} threads, best of {args.repeats})"
    )
    for column in ("path", "images/s", "best batch seconds"):
        table.add_column(column)
    for key, label in (
        ("bare_forward", "bare TorchScript forward (299 px input)"),
        ("fid_update", "FrechetInceptionDistance.update"),
    ):
        table.add_row(label, f"{result['images_per_s'][key]:.2f}", f"{min(result['seconds'][key]):.2f}")
    table.add_row("ratio update / bare", f"{result['ratio']:.3f}", "target >= 0.9")
    print_and_write(args.out, record, table)
    return record


if __name__ == "__main__":
    main()
