"""How close a tiny backbone's text-to-image samples come to the world: the world-FD.

    python -m benchmarks.diagnostics.base_quality [--backbone emojidiff:tiny-sd15|DIR] [--n 384] [--steps 30] [--guidance 3]

Draws N held-out world portraits (identities never trained on) with their training-style
captions, samples the backbone once per caption (diffusers' StableDiffusionPipeline, DDIM), and
computes the Frechet distance between samples and portraits with `benchmarks.evaluation.metrics.WorldFD`
(torchmetrics' `FrechetInceptionDistance`) on two feature spaces of the packaged world analysers:

- "world-id": the 128-d identity embedding (does it look like a person of the world);
- "world-expr": the 10 expression parameters (are eyes, brows and mouth well formed).

Inception features mean little on 64 px cartoons; these are the features the later stages are
judged with. The floor is the same distance between two disjoint sets of N real portraits (the
estimator's bias at this N): a perfect backbone scores about the floor. The same distance for the
VAE's reconstructions of the held-out portraits is the ceiling the UNet works under (it pairs each
portrait with its own reconstruction, so it can fall below the floor). Writes the figures and
the resolved arguments to `--out` (default outputs/bench/base_quality.json).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from benchmarks.evaluation.metrics import WORLD_FEATURES, WorldFD
from datamodules.world_portraits import WorldPortraitStream
from emojidiff.images import to_unit
from emojidiff.models.pipeline import load_sd_pipeline
from emojidiff.options import parse_options
from emojidiff.packaged import DEFAULT_BACKBONE, resolve_backbone
from emojidiff.splits import TEST_IDENTITIES, identity_range

FEATURES = WORLD_FEATURES


def world_fd(
    backbone: str | Path,
    n: int = 384,
    batch: int = 64,
    steps: int = 30,
    guidance: float = 3.0,
    seed: int = 0,
    specs: dict[str, str | dict] | None = None,
) -> dict[str, Any]:
    """{"fd": {feature: FD(samples, real)}, "vae_recon": {feature: FD(VAE reconstructions, real)},
    "floor": {feature: FD(real, other real)}, ...}.

    The VAE-reconstruction distance (encode the held-out portraits, decode the posterior mode) is the
    ceiling the UNet works under: no sampler can draw finer eyes than the decoder can render.
    `specs` maps a feature name to the analyser spec that computes it (default: the packaged one).
    """
    specs = specs or {}
    # float32 throughout: the packaged base is stored as fp16, and transformers would keep that dtype
    pipe = load_sd_pipeline(resolve_backbone(backbone), "ddim", dtype=torch.float32)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    held_out = WorldPortraitStream(
        batch_size=batch, size=size, identity_range=identity_range(TEST_IDENTITIES, 10_000)
    )
    other = WorldPortraitStream(
        batch_size=batch, size=size, identity_range=identity_range(TEST_IDENTITIES, 10_000, offset=10_000)
    )
    metrics, floors, recons = (WorldFD({f: specs.get(f) for f in FEATURES}) for _ in range(3))
    start = time.perf_counter()
    for k in track(range(-(-n // batch)), description="sampling"):
        real = held_out.batch(seed * 1_000_003 + k)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
        fake = pipe(
            real["prompts"],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pt",
        ).images
        with torch.no_grad():
            posterior = pipe.vae.encode(real["pixels"].to(pipe.vae.dtype)).latent_dist
            recon_01 = to_unit(pipe.vae.decode(posterior.mode()).sample.float().clamp(-1, 1))
        real_01 = to_unit(real["pixels"])
        other_01 = to_unit(other.batch(seed * 1_000_003 + k)["pixels"])
        metrics.update(real_01, real=True)
        metrics.update(fake.float().clamp(0, 1), real=False)
        recons.update(real_01, real=True)
        recons.update(recon_01, real=False)
        floors.update(real_01, real=True)
        floors.update(other_01, real=False)
    return {
        "fd": {f: float(v) for f, v in metrics.compute().items()},
        "vae_recon": {f: float(v) for f, v in recons.compute().items()},
        "floor": {f: float(v) for f, v in floors.compute().items()},
        "n": -(-n // batch) * batch,
        "seconds": time.perf_counter() - start,
    }


@dataclass
class BaseQualityConfig:
    """The world-FD of a backbone's text-to-image samples.

    Args:
        backbone: packaged name (emojidiff:tiny-sd15) or diffusers folder.
        n: samples (rounded up to whole batches).
        batch: samples per batch.
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        seed: the samples' seed.
        threads: torch threads (0: torch's default).
        out: the JSON record.
    """

    backbone: str = DEFAULT_BACKBONE
    n: int = 384
    batch: int = 64
    steps: int = 30
    guidance: float = 3.0
    seed: int = 0
    threads: int = 0
    out: Path = Path("outputs/bench/base_quality.json")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, _ = parse_options(BaseQualityConfig, argv)
    if not (resolve_backbone(args.backbone) / "model_index.json").is_file():
        raise SystemExit(
            f"--backbone {args.backbone}: no model_index.json there (a diffusers folder, or emojidiff:tiny-sd15)"
        )
    result = world_fd(args.backbone, args.n, args.batch, args.steps, args.guidance, args.seed)
    record = {
        "command": "python -m benchmarks.diagnostics.base_quality",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    table = Table(title=f"world-FD of {args.backbone} ({record['n']} samples)")
    for column in ("features", "FD samples vs real", "VAE reconstructions vs real", "floor (real vs real)"):
        table.add_column(column)
    for f in FEATURES:
        table.add_row(
            f, f"{result['fd'][f]:.4f}", f"{result['vae_recon'][f]:.4f}", f"{result['floor'][f]:.4f}"
        )
    Console().print(table)
    return record


if __name__ == "__main__":
    main()
