"""The GPU check: one prepared command for a short GPU window (`make gpu-check`; about 8 minutes on one
H100/H200, no internet there).

    python -m benchmarks.speed.gpu_check                    # on the GPU host: docs/scale_gpu_<device>.{json,md}
    python -m benchmarks.speed.gpu_check --dry_run true     # CPU, narrow networks, tiny sizes: every part runs

Parts, in order of what matters most (each one timed against the remaining `budget_s`; a part that
would not fit is recorded as skipped, and the record is rewritten after every part, so a window cut
short still leaves what was measured):

1. the device's measured bf16 matrix-product peak;
2. SD1.5 stage 1 at 512 px, batch 16, bf16: the bare step ("none") and the best options, with FLOPs,
   MFU and a profile of the best step (which operators take the time);
3. SD1.5 ICA at the same size and batch (two UNet passes, VAE decode with gradients, ArcFace backward),
   best options (with checkpointing where the memory needs it): its cost against the stage-1 step;
4. SDXL stage 1 at 1024 px, batch 4, with checkpointing and the best options, then with none;
5. generation at 30 steps (SD1.5 512 px, SDXL 1024 px): seconds per image;
6. the training loader at 512 px with 1..16 workers against what the SD1.5 stage-1 step consumes;
7. the tiny world's stage-1 step (configs/decoupled.yaml) at a large batch;
8. the evaluation's generation and metric throughput (`benchmarks.speed.eval_throughput`);
9. each single option on and off at SD1.5 stage 1 (sdpa, checkpointing, frozen bf16, channels-last,
   fused AdamW, torch.compile), while time remains.

The dry run shrinks the architecture-only networks (`shrink_architecture`: same layouts, widths / 8)
and the sizes, so the whole script runs on a CPU in about a minute: what the tests run.
"""

from __future__ import annotations

import gc
import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.speed.report import machine
from benchmarks.speed.scale import (
    SCALE_IDENTITY,
    VARIANTS,
    StepOptions,
    datasheet_peak,
    matmul_peak,
    stage_case,
    world_shards,
)
from emojidiff.models.architecture_only import shrink_architecture
from emojidiff.options import parse_options
from emojidiff.packaged import PACKAGED_BACKBONES, PACKAGED_ENCODERS


@dataclass
class GpuCheckOptions:
    """The GPU check.

    Args:
        dry_run: on the CPU with narrow networks and tiny sizes (tests every part in about a minute).
        budget_s: seconds the whole check may take (parts that would not fit are skipped).
        out_dir: where scale_gpu_<device>.json and .md are written (the dry run: scale_dry_run.*).
        steps / warmup: measured and warm-up steps per training variant.
    """

    dry_run: bool = False
    budget_s: float = 450.0
    out_dir: str = "docs"
    steps: int = 5
    warmup: int = 2


@dataclass(frozen=True)
class Sizes:
    """Image sizes and batches of the parts (full size on a GPU; tiny in the dry run)."""

    sd15_px: int = 512
    sd15_batch: int = 16
    sdxl_px: int = 1024
    sdxl_batch: int = 4
    generation_batch: int = 4
    loader_workers: tuple[int, ...] = (1, 2, 4, 8, 16)
    loader_batches: int = 20
    tiny_batch: int = 256
    eval_rows: int = 128


FULL = Sizes()
DRY = Sizes(
    sd15_px=64,
    sd15_batch=2,
    sdxl_px=128,
    sdxl_batch=1,
    generation_batch=1,
    loader_workers=(0, 1),
    loader_batches=2,
    tiny_batch=4,
    eval_rows=2,
)


def dry_run_overrides(folder: Path) -> dict[str, dict[str, list[str]]]:
    """Per backbone and stage, the config overrides that swap in narrow copies of the architecture-only
    networks (written into `folder`)."""
    narrow = {
        name: shrink_architecture(src, folder / name)
        for name, src in {**PACKAGED_BACKBONES, **PACKAGED_ENCODERS}.items()
        if name.endswith("-arch")
    }
    model = "--model.init_args.model.init_args"
    identity = json.dumps({**SCALE_IDENTITY, "init_args": {"weights": str(narrow["arcface-r100-arch"])}})
    stage1 = [
        f"{model}.identity_encoder",
        identity,
        f"{model}.expression_encoder",
        json.dumps({"name": "clip", "init_args": {"path": str(narrow["clip-vit-h-14-arch"])}}),
    ]
    ica = ["--model.init_args.loss_identity_encoder.init_args.spec", identity]
    return {
        backbone: {
            "decoupled": [f"{model}.backbone", str(narrow[f"{backbone}-arch"]), *stage1],
            "ica": ica,
        }
        for backbone in ("sd15", "sdxl")
    }


class Check:
    """Runs the parts within the budget and rewrites the record after each."""

    def __init__(self, opts: GpuCheckOptions, device: torch.device, out_json: Path, out_md: Path):
        self.opts, self.device, self.out_json, self.out_md = opts, device, out_json, out_md
        self.start = time.perf_counter()
        self.record: dict[str, Any] = {
            "command": "make gpu-check" + (" GPU_CHECK_ARGS='--dry_run true'" if opts.dry_run else ""),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "options": asdict(opts),
            "machine": {**machine(), "python": platform.python_version()},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "parts": {},
        }

    def left(self) -> float:
        return self.opts.budget_s - (time.perf_counter() - self.start)

    def part(self, name: str, needs_s: float, fn: Callable[[], Any]) -> Any:
        """Run one part if `needs_s` (its estimate) fits the time left; record its result or error."""
        if self.left() < needs_s:
            self.record["parts"][name] = {"skipped": f"needs ~{needs_s:.0f} s, {self.left():.0f} s left"}
        else:
            started = time.perf_counter()
            try:
                result = fn()
            except Exception as err:  # a failed part is a finding; the next ones still run
                result = {
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            if isinstance(result, dict):
                result["part_s"] = time.perf_counter() - started
            self.record["parts"][name] = result
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.write()
        return self.record["parts"][name]

    def write(self) -> None:
        self.record["elapsed_s"] = time.perf_counter() - self.start
        self.out_json.parent.mkdir(parents=True, exist_ok=True)
        self.out_json.write_text(json.dumps(self.record, indent=2) + "\n")
        self.out_md.write_text(markdown(self.record))


def markdown(record: dict[str, Any]) -> str:
    """The record as a page: one table of training steps, then generation, loader, tiny and evaluation."""
    parts = record["parts"]
    peak = parts.get("matmul_peak", {})
    lines = [
        f"# Scale check on {record['device']}",
        "",
        f"`{record['command']}`, {record['started']}, {record['elapsed_s']:.0f} s; torch "
        f"{record['machine']['torch']}, Python {record['machine']['python']}. Architecture-only networks "
        "(the published SD1.5 / SDXL / CLIP ViT-H/14 / ArcFace-R100 shapes, seeded random weights): speed "
        "and memory, not quality.",
        "",
    ]
    if "flops_per_s" in peak:
        lines += [
            f"Measured {peak['dtype']} matrix-product peak ({peak['n']}^3): {peak['flops_per_s'] / 1e12:.3g} "
            f"TFLOP/s; MFU below is against {record.get('peak_flops_per_s', 0) / 1e12:.3g} TFLOP/s "
            f"({record.get('peak_source', '')}).",
            "",
        ]
    lines += [
        "| part | backbone | stage | px | batch | variant | s/step | samples/s | memory GiB | TFLOP/step | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, part in parts.items():
        for variant, v in part.get("variants", {}).items() if isinstance(part, dict) else ():
            cells = [
                _cell(v, "step_s", ".3f", v.get("error", "-")),
                _cell(v, "samples_per_s", ".2f"),
                _cell(v, "memory_gib", ".1f"),
                f"{v['flops_per_step'] / 1e12:.3g}" if "flops_per_step" in v else "-",
                _cell(v, "mfu", ".1%"),
            ]
            lines.append(
                f"| {name} | {part['backbone']} | {part['stage']} | {part['image_size']} | {part['batch']} | "
                f"{variant} | " + " | ".join(cells) + " |"
            )
    lines.append("")
    for name, part in parts.items():
        if not isinstance(part, dict) or "variants" in part:
            continue
        if "skipped" in part or "error" in part:
            lines.append(f"- **{name}**: {part.get('skipped') or part.get('error')}")
        elif name.startswith("generation"):
            lines.append(
                f"- **{name}**: {part['s_per_image']:.3f} s/image at {part['steps']} steps, "
                f"{part['image_size']} px, batch {part['batch']}"
            )
        elif name == "loader":
            rows = ", ".join(f"{r['workers']} workers {r['samples_per_s']:.0f}/s" for r in part["workers"])
            lines.append(
                f"- **loader** at {part['image_size']} px, batch {part['batch']}: {rows}; the SD1.5 stage-1 "
                f"step consumes {part.get('step_consumes_per_s') or float('nan'):.1f} samples/s"
            )
        elif name == "evaluation":
            gen = ", ".join(f"{k} {v:.1f}" for k, v in part["generation_rows_per_s"].items())
            met = ", ".join(f"{k} {v:.0f}" for k, v in part["metric_rows_per_s"].items())
            not_run = "".join(f"; {k} not run ({v})" for k, v in part.get("metrics_not_run", {}).items())
            lines.append(f"- **evaluation** rows/s: generation {gen}; metrics {met}{not_run}")
    for name, part in parts.items():
        for variant, v in part.get("variants", {}).items() if isinstance(part, dict) else ():
            if "profile" in v:
                lines += [
                    "",
                    f"Where the time of one {name} step ({variant}) goes:",
                    "",
                    "| op | share | ms |",
                ]
                lines.append("| --- | --- | --- |")
                lines += [f"| `{r['op']}` | {r['share']:.1%} | {r['ms']:.1f} |" for r in v["profile"]]
                parts_flops = v.get("flops_by_part", {})
                total = sum(parts_flops.values()) or 1
                lines += ["", "Its FLOPs by network (forward; a recomputation counts in its network):", ""]
                lines += ["| network | TFLOP | share |", "| --- | --- | --- |"]
                lines += [f"| {k} | {f / 1e12:.3g} | {f / total:.1%} |" for k, f in parts_flops.items()]
    return "\n".join(lines) + "\n"


def _cell(values: dict[str, Any], key: str, spec: str, missing: str = "-") -> str:
    return format(values[key], spec) if key in values else missing


def loader_part(shards: list[str], sizes: Sizes, px: int, step_samples_per_s: float | None) -> dict[str, Any]:
    from benchmarks.speed.idi_throughput import bench_loader

    rows = [
        bench_loader(shards, sizes.sd15_batch, sizes.loader_batches, workers, image_size=px)
        for workers in sizes.loader_workers
    ]
    return {
        "image_size": px,
        "batch": sizes.sd15_batch,
        "workers": rows,
        "step_consumes_per_s": step_samples_per_s,
    }


def run(opts: GpuCheckOptions) -> dict[str, Any]:
    if not opts.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; on a CPU run it with --dry_run true")
    device = torch.device("cpu" if opts.dry_run else "cuda")
    sizes = DRY if opts.dry_run else FULL
    steps, warmup = (1, 0) if opts.dry_run else (opts.steps, opts.warmup)
    name = "dry_run" if opts.dry_run else "gpu_" + torch.cuda.get_device_name(device).split()[1].lower()
    out = Path(opts.out_dir)
    check = Check(opts, device, out / f"scale_{name}.json", out / f"scale_{name}.md")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        overrides = dry_run_overrides(work / "narrow") if opts.dry_run else {}
        shards = world_shards(
            work / "shards", n=max(sizes.sd15_batch, sizes.generation_batch), size=min(sizes.sd15_px, 512)
        )

        peak = check.part("matmul_peak", 5, lambda: matmul_peak(device))
        check.record["peak_flops_per_s"] = datasheet_peak(device) or peak.get("flops_per_s")
        check.record["peak_source"] = "datasheet dense bf16" if datasheet_peak(device) else "measured matmul"
        flop_peak = check.record["peak_flops_per_s"]

        def variant(name: str) -> StepOptions:  # the dry run compiles without code generation
            return replace(VARIANTS[name], compile_backend="eager") if opts.dry_run else VARIANTS[name]

        def case(backbone, stage, px, batch, variants, profile=False, generation=0):
            return stage_case(
                backbone,
                stage,
                device,
                px,
                batch,
                {v: variant(v) for v in variants},
                steps,
                warmup,
                shards,
                work,
                profile=profile,
                generation_steps=generation,
                peak=flop_peak,
                overrides=overrides.get(backbone, {}),
            )

        sd15 = check.part(
            "sd15_stage1",
            60,
            lambda: case(
                "sd15",
                "decoupled",
                sizes.sd15_px,
                sizes.sd15_batch,
                ["none", "best"],
                profile=True,
                generation=30,
            ),
        )
        check.part(
            "sd15_ica",
            80,
            lambda: case(
                "sd15", "ica", sizes.sd15_px, sizes.sd15_batch, ["best", "best_checkpointing"], profile=True
            ),
        )
        check.part(
            "sdxl_stage1",
            120,
            lambda: case(
                "sdxl",
                "decoupled",
                sizes.sdxl_px,
                sizes.sdxl_batch,
                ["best_checkpointing", "none"],
                generation=30,
            ),
        )
        best = sd15.get("variants", {}).get("best", {}) if isinstance(sd15, dict) else {}
        check.part(
            "loader",
            30,
            lambda: loader_part(shards, sizes, min(sizes.sd15_px, 512), best.get("samples_per_s")),
        )
        check.part(
            "tiny_stage1",
            20,
            lambda: stage_case(
                "tiny",
                "decoupled",
                device,
                64,
                sizes.tiny_batch,
                {v: variant(v) for v in ("none", "best")},
                steps,
                warmup,
                world_shards(work / "tiny-shards", n=sizes.tiny_batch, size=64, identity_encoder="world-id"),
                work,
                peak=flop_peak,
            ),
        )
        check.part("evaluation", 40, lambda: evaluation_part(sizes, device, opts.dry_run))
        check.part(
            "sd15_options",
            120,
            lambda: case(
                "sd15",
                "decoupled",
                sizes.sd15_px,
                sizes.sd15_batch,
                ["sdpa", "checkpointing", "frozen_bf16", "channels_last", "fused_adamw", "best_compiled"],
            ),
        )
    check.write()
    print(check.out_md.read_text())
    print(f"wrote {check.out_json} and {check.out_md}")
    return check.record


def evaluation_part(sizes: Sizes, device: torch.device, dry_run: bool) -> dict[str, Any]:
    from benchmarks.speed import eval_throughput

    with tempfile.TemporaryDirectory() as tmp:
        args = ["--rows", str(sizes.eval_rows), "--device", device.type, "--out", f"{tmp}/eval.json"]
        if dry_run:
            args += ["--steps", "2"]
        return eval_throughput.main(args)


def main(argv: list[str] | None = None) -> int:
    opts, _ = parse_options(GpuCheckOptions, argv)
    run(opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
