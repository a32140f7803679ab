"""IDI throughput: the generation job per alterer, and the triplet loader against a training step.

    python -m benchmarks.speed.idi_throughput [--targets 600] [--loader_batches 40] [--batch 32] [--threads 2]
    python -m benchmarks.speed.idi_throughput --onnx_swapper inswapper_128.onnx --arcface_dir models/antelopev2 \
        --photos photos/                                                   # the real-photo alterer too

Generation (one block of `--targets` world targets, the job's own code: `IDIGenerator.predict_step`):
source load (render) time per target, then per alterer the time to alter, score, filter (one
retry) and encode, as targets/s and accepted triplets/s. "adapter" uses an untrained E-Adapter on
the packaged tiny base (`--adapter_steps` denoising steps): its cost, not its quality.

Loader: shards written by a small job, streamed by `datamodules.triplets.TripletDataModule` with
0, 1 and 2 workers (samples/s over `--loader_batches` batches after one warm-up batch), against
the samples/s one training step of the tiny backbone with the E-Adapter consumes
(`benchmarks.speed.adapter_step.bench_tiny`, same batch size). Writes a rich table and
outputs/bench/idi_throughput.json.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

import data_gen.alterers  # noqa: F401
import data_gen.sources  # noqa: F401
from benchmarks.speed.adapter_step import AdapterStepConfig, bench_tiny
from benchmarks.speed.report import print_and_write
from data_gen.job import IDIConfig, build_job, run
from datamodules.triplets import TripletDataModule
from emojidiff.models.bundle import fresh_model
from emojidiff.options import parse_options


def bench_generation(
    alterer: Any, targets: int, source: dict[str, Any] | None = None, **job: Any
) -> dict[str, Any]:
    """Targets/s and triplets/s of one block through `predict_step` with one alterer."""
    source = source or {"name": "world", "init_args": {"num_targets": targets, "images_per_identity": 12}}
    cfg = IDIConfig(
        out_dir=tempfile.mkdtemp(prefix="idi-bench-"),
        source=source,
        alterers=[alterer],
        block_size=targets,
        templates_per_target=1,
        attempts=2,
        progress=False,
        **job,
    )
    module, _, _, src = build_job(cfg)
    indices = np.arange(min(targets, len(src)))
    t0 = time.perf_counter()
    batch = src.load(indices)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = module.predict_step((0, batch), 0)
    step_s = time.perf_counter() - t0
    accepted = len(out["samples"].get(cfg.round, []))
    name = alterer if isinstance(alterer, str) else alterer["name"]
    return {
        "alterer": name,
        "targets": len(batch),
        "candidates": out["candidates"],
        "accepted": accepted,
        "load_targets_per_s": len(batch) / load_s,
        "step_targets_per_s": len(batch) / step_s,
        "job_targets_per_s": len(batch) / (load_s + step_s),
        "job_triplets_per_s": accepted / (load_s + step_s),
    }


def write_bench_shards(out_dir: Path, targets: int) -> Path:
    """A small world job's shards (self pairs and round 1) for the loader benchmark."""
    cfg = IDIConfig(
        out_dir=str(out_dir),
        source={"name": "world", "init_args": {"num_targets": targets}},
        alterers=["world-swap", "world-resynth"],
        self_pairs=True,
        block_size=120,
        num_workers=0,
        progress=False,
    )
    run(cfg)
    return out_dir


def bench_loader(
    shards: Path | list[str], batch: int, batches: int, workers: int, image_size: int = 64
) -> dict[str, Any]:
    """Samples/s of the training loader (resizing to `image_size`) over `batches` batches after one warm-up batch."""

    dm = TripletDataModule(
        train_shards=[str(s) for s in shards] if isinstance(shards, list) else str(shards),
        batch_size=batch,
        num_workers=workers,
        image_size=image_size,
        resampled=True,
        samples_per_epoch=batch * (batches + 1) * max(1, workers),
        seed=0,
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["key"])
    seconds = time.perf_counter() - t0
    return {
        "workers": workers,
        "batch": batch,
        "batches": batches,
        "image_size": image_size,
        "samples_per_s": n / seconds,
    }


def bench_train_step(batch: int, steps: int = 5) -> dict[str, Any]:

    row = bench_tiny(
        AdapterStepConfig(batch=batch, steps=steps, warmup=1, device="cpu"), torch.device("cpu")
    )[0]
    return {"batch": batch, "step_s": row["step_s"], "samples_per_s": batch / row["step_s"]}


@dataclass
class IDIThroughputConfig:
    """The IDI generation and loader throughput.

    Args:
        targets: world targets per generation measurement.
        alterers: alterers measured ("adapter": an untrained E-Adapter on the tiny base).
        adapter_steps: denoising steps of the "adapter" alterer.
        onnx_swapper: inswapper_128-layout ONNX: also measure onnx-swapper.
        arcface_dir: insightface model folder for the swapper's donor embeddings.
        photos: folder of portraits for the onnx-swapper measurement.
        loader_targets: world targets of the loader's shards.
        loader_batches: timed loader batches (after one warm-up batch).
        workers: loader worker counts measured.
        batch: samples per loader batch and per training step.
        threads: torch threads.
        out: the JSON record.
    """

    targets: int = 600
    alterers: list[str] = field(default_factory=lambda: ["world-swap", "world-resynth", "adapter"])
    adapter_steps: int = 10
    onnx_swapper: str | None = None
    arcface_dir: str | None = None
    photos: str | None = None
    loader_targets: int = 480
    loader_batches: int = 40
    workers: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch: int = 32
    threads: int = 2
    out: str = "outputs/bench/idi_throughput.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, _ = parse_options(IDIThroughputConfig, argv)
    gen = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.alterers:
            spec: Any = name
            if name == "adapter":
                folder = Path(tmp) / "adapter-model"
                fresh_model("emojidiff:tiny-sd15").save(folder)
                spec = {
                    "name": "adapter",
                    "init_args": {"model": str(folder), "steps": args.adapter_steps, "batch_size": 64},
                }
            gen.append(bench_generation(spec, args.targets))
        if args.onnx_swapper:
            if not (args.arcface_dir and args.photos):
                raise SystemExit(
                    "benchmarks.speed.idi_throughput: --onnx_swapper needs --arcface_dir and --photos"
                )
            spec = {
                "name": "onnx-swapper",
                "init_args": {
                    "model_path": args.onnx_swapper,
                    "identity_encoder": {
                        "name": "insightface-arcface",
                        "init_args": {"model_dir": args.arcface_dir},
                    },
                },
            }
            gen.append(
                bench_generation(
                    spec,
                    args.targets,
                    {"name": "folder", "init_args": {"root": args.photos}},
                    identity_encoder="dlib",
                    expression_analyser="dlib-lms",
                    aligner="dlib-chip",
                )
            )
        shards = write_bench_shards(Path(tmp) / "shards", args.loader_targets)
        loader = [bench_loader(shards, args.batch, args.loader_batches, w) for w in args.workers]
    step = bench_train_step(args.batch)
    for row in loader:
        row["ratio_to_train_step"] = row["samples_per_s"] / step["samples_per_s"]
    result = {
        "generation": gen,
        "loader": loader,
        "train_step": step,
        "threads": args.threads,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor(),
        },
    }
    gen_table = Table(title="IDI generation (one block, world targets)")
    for c in ("alterer", "targets", "accepted", "load targets/s", "step targets/s", "job triplets/s"):
        gen_table.add_column(c, justify="right", no_wrap=True)
    for r in gen:
        gen_table.add_row(
            r["alterer"],
            str(r["targets"]),
            str(r["accepted"]),
            f"{r['load_targets_per_s']:.0f}",
            f"{r['step_targets_per_s']:.0f}",
            f"{r['job_triplets_per_s']:.0f}",
        )
    loader_table = Table(
        title=f"triplet loader vs tiny training step "
        f"(batch {args.batch}: {step['samples_per_s']:.0f} samples/s)"
    )
    for c in ("workers", "samples/s", "x train step"):
        loader_table.add_column(c, justify="right")
    for r in loader:
        loader_table.add_row(
            str(r["workers"]), f"{r['samples_per_s']:.0f}", f"{r['ratio_to_train_step']:.1f}"
        )
    print_and_write(args.out, result, gen_table, loader_table)
    return result


if __name__ == "__main__":
    main()
