"""`make base`: pretrain the embedded tiny backbone on the world and install it as `emojidiff:tiny-sd15`.

    python -m lightning_modules.pretrain_base --out cache/base/tiny-sd15 [--install] [--vae-steps N] [--unet-steps N]

Stage 1 trains the VAE (L1 weighted on the face and its features, plus perceptual terms in the
features of the world's training analysers, `--perceptual-expr-weight` / `--perceptual-id-weight`),
whose latent scale is then set from the latents' spread (as SD did); the frozen VAE then encodes
`--latent-cache` portraits once (`datamodules.latent_portraits`), and stage 2 trains the
text-conditioned UNet and the tiny text encoder on those posteriors (half the cost of a step that
renders and encodes its own batch; `--latent-cache 0` does that instead). Stage 2 seeds itself, so
`--vae-from DIR` computes the UNet a full run with the same seed computes. The folder gets the
standard diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
`samples.png` (rows: realistic, anime, painting prompts), the TensorBoard logs, and
`pretrain_config.json` with the resolved arguments, seed, timings and final metrics. `--install`
also writes the fp16 copy into the package (`install_backbone`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from datamodules.latent_portraits import LatentPortraitDataModule, encode_portraits, vae_posterior
from datamodules.world_portraits import WorldPortraitDataModule, WorldPortraitStream
from emojidiff.models.backbone import Backbone
from emojidiff.models.bundle import build_expression_analyzer, build_identity_encoder
from emojidiff.models.tiny import DEFAULT_VOCABULARY, build_tiny_backbone, save_backbone
from emojidiff.packaged import PACKAGED_BACKBONES
from emojidiff.registry import spec_from_text
from emojidiff.world import STYLES
from emojidiff.world.prompts import portrait_prompt
from lightning_modules.base_pretrain import TinyUNetPretrain, TinyVAEPretrain


def _trainer(out: Path, name: str, steps: int, val_every: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        logger=TensorBoardLogger(out / "logs", name=name),
        enable_checkpointing=False,
        val_check_interval=min(val_every, steps),
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        gradient_clip_val=1.0,
    )


@torch.no_grad()
def estimate_scaling_factor(vae: torch.nn.Module, data: WorldPortraitDataModule, batches: int = 32) -> float:
    """1 / std of the VAE's latent means over a few training batches."""
    latents = [vae.encode(data.train_dataloader().dataset.batch(10_000 + k)["pixels"]).latent_dist.mean for k in range(batches)]
    return float(1.0 / torch.cat(latents).std())


@torch.no_grad()
def sample_grid(folder: Path, columns: int = 8, steps: int = 30, guidance: float = 3.0, seed: int = 0) -> np.ndarray:
    """Text-to-image samples of the saved backbone with diffusers' own SD pipeline: a row per style."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows = []
    for k, style in enumerate(STYLES):
        prompts = [portrait_prompt(style)] * columns
        generator = torch.Generator().manual_seed(seed + k)
        images = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generator, output_type="np").images
        rows.append(np.concatenate(list((images * 255).round().astype(np.uint8)), axis=1))
    return np.concatenate(rows, axis=0)


def install_backbone(folder: Path, dest: Path = PACKAGED_BACKBONES["tiny-sd15"],
                     record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Install the trained backbone in `folder` into the package (`dest`, default the folder behind
    `emojidiff:tiny-sd15`) as fp16 safetensors in the diffusers layout, with `base_record.json`:
    parameter counts per component, the stored dtype, the VAE's scaling factor and `record` (the
    pretraining record). Replaces whatever was installed there. Returns the base record."""
    backbone = Backbone.from_folder(folder, key="--out")
    counts = {name: sum(p.numel() for p in getattr(backbone, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_backbone(backbone.to(torch.float16), staging)
    base_record = {"name": "emojidiff:tiny-sd15", "dtype": "float16", "parameters": counts,
                   "scaling_factor": float(backbone.vae.config.scaling_factor), "pretrain": record or {}}
    (staging / "base_record.json").write_text(json.dumps(base_record, indent=2) + "\n")
    for f in staging.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600; these are package data, readable by all
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return base_record


def load_vae(folder: Path) -> AutoencoderKL:
    """The frozen AutoencoderKL in `folder`/vae (a backbone folder written by this script)."""
    if not (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"--vae-from {folder}: no vae/config.json there (expected a backbone folder "
                                "written by `make base`)")
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    return vae.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("cache/base/tiny-sd15"))
    parser.add_argument("--kind", choices=["sd15"], default="sd15")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=2800, help="0: train and save only the VAE (an experiment)")
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--unet-batch", type=int, default=24)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--perceptual-expr-weight", type=float, default=1.0,
                        help="weight of the VAE's perceptual term in the expression analyser's features (0: off)")
    parser.add_argument("--perceptual-expr-analyzer", default="world-expr",
                        help="expression analyser (registry name or JSON spec) whose features that term matches")
    parser.add_argument("--perceptual-id-weight", type=float, default=1.0,
                        help="weight of the VAE's perceptual term in the identity encoder's features (0: off)")
    parser.add_argument("--perceptual-id-encoder", default="world-id",
                        help="identity encoder (registry name or JSON spec) whose features that term matches")
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="reuse the trained VAE of this backbone folder (its vae/) and train only the UNet")
    parser.add_argument("--latent-cache", type=int, default=12288,
                        help="portraits encoded once for UNet training (0: render and encode every step)")
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting (<= 0: off)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--sample-steps", type=int, default=30, help="DDIM steps for the sample grid")
    parser.add_argument("--grid", type=Path, default=None, help="also copy the sample grid here (e.g. docs/)")
    parser.add_argument("--install", action="store_true",
                        help="install the result into the package as emojidiff:tiny-sd15 (fp16, with base_record.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"command": "python -m lightning_modules.pretrain_base",
                              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    from emojidiff.world.prompts import WORLD_VOCABULARY

    vocabulary = list(dict.fromkeys([*DEFAULT_VOCABULARY, *WORLD_VOCABULARY]))
    backbone = build_tiny_backbone(args.kind, vocabulary=vocabulary, seed=args.seed)

    start = time.perf_counter()
    vae_data = WorldPortraitDataModule(batch_size=args.vae_batch, size=args.size, steps_per_epoch=args.vae_steps,
                                       seed=args.seed)
    if args.vae_from is not None:
        backbone.vae = load_vae(args.vae_from)
        record["vae"] = {"from": str(args.vae_from), "scaling_factor": backbone.vae.config.scaling_factor}
    else:
        perceptual, weights = {}, {}
        if args.perceptual_expr_weight > 0:
            perceptual["expr"] = build_expression_analyzer(spec_from_text(args.perceptual_expr_analyzer))
            weights["expr"] = args.perceptual_expr_weight
        if args.perceptual_id_weight > 0:
            perceptual["id"] = build_identity_encoder(spec_from_text(args.perceptual_id_encoder))
            weights["id"] = args.perceptual_id_weight
        vae_module = TinyVAEPretrain(backbone.vae, lr=args.vae_lr, perceptual=perceptual, perceptual_weights=weights)
        vae_trainer = _trainer(out, "vae", args.vae_steps, val_every=200)
        vae_trainer.fit(vae_module, datamodule=vae_data)
        vae_metrics = {k: float(v) for k, v in vae_trainer.callback_metrics.items()}
        backbone.vae.eval().requires_grad_(False)
        backbone.vae.register_to_config(scaling_factor=estimate_scaling_factor(backbone.vae, vae_data))
        record["vae"] = {"seconds": time.perf_counter() - start, "metrics": vae_metrics,
                         "scaling_factor": backbone.vae.config.scaling_factor}

    if args.unet_steps == 0:  # a VAE experiment: the folder holds the trained VAE and an untrained UNet
        save_backbone(backbone, out)
        record["unet"] = "untrained (--unet-steps 0)"
        (out / "pretrain_config.json").write_text(json.dumps(record, indent=2) + "\n")
        return record

    # The UNet stage seeds itself, so `--vae-from DIR` (DIR written by a full run with the same
    # seed) reproduces the full run's UNet exactly, whatever the VAE stage drew.
    L.seed_everything(args.seed + 1, workers=True)
    start = time.perf_counter()
    if args.latent_cache > 0:
        train_stream = WorldPortraitStream(batch_size=64, size=args.size, identity_range=vae_data.hparams.train_identities)
        val_stream = WorldPortraitStream(batch_size=args.unet_batch, size=args.size,
                                         identity_range=vae_data.hparams.val_identities)
        posterior = vae_posterior(backbone.vae)
        unet_data = LatentPortraitDataModule(
            encode_portraits(posterior, train_stream, args.latent_cache, seed=args.seed + 1),
            encode_portraits(posterior, val_stream, 2 * args.unet_batch, seed=args.seed + 10_007, description="validation set"),
            batch_size=args.unet_batch, seed=args.seed)
        record["latent_cache_seconds"] = time.perf_counter() - start
    else:
        unet_data = WorldPortraitDataModule(batch_size=args.unet_batch, size=args.size,
                                            steps_per_epoch=args.unet_steps, seed=args.seed + 1)
    unet_module = TinyUNetPretrain(backbone, lr=args.unet_lr, snr_gamma=args.snr_gamma if args.snr_gamma > 0 else None)
    unet_trainer = _trainer(out, "unet", args.unet_steps, val_every=250)
    unet_trainer.fit(unet_module, datamodule=unet_data)
    record["unet"] = {"seconds": time.perf_counter() - start,
                      "metrics": {k: float(v) for k, v in unet_trainer.callback_metrics.items()}}
    backbone.unet.load_state_dict(unet_module.ema_state_dict())
    backbone.freeze()

    save_backbone(backbone, out)
    start = time.perf_counter()
    grid = sample_grid(out, steps=args.sample_steps, seed=args.seed)
    Image.fromarray(grid).save(out / "samples.png")
    unet_trainer.logger.experiment.add_image("samples", grid, unet_trainer.global_step, dataformats="HWC")
    if args.grid is not None:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "samples.png", args.grid)
    record["sampling_seconds"] = time.perf_counter() - start
    if args.install:
        record["installed"] = install_backbone(out, record=dict(record))["parameters"]
    (out / "pretrain_config.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "args"}, indent=2))
    return record


if __name__ == "__main__":
    main()
