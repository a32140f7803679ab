"""Pretraining the embedded tiny backbone on the synthetic world (the stand-in for SD1.5): `make base`.

Two LightningModules, each one LightningCLI fit (`python -m emojidiff.cli fit -c configs/base/vae.yaml`,
then `-c configs/base/unet.yaml`), both writing one backbone folder (`export_dir`, diffusers layout):

- `TinyVAEPretrain`: AutoencoderKL on world portraits, L1 reconstruction weighted up on the face
  and more on the eyes, brows, nose and mouth (expressions live in a few pixels and must survive
  the latent space), optionally perceptual terms in the feature spaces of the world's training
  analysers (`emojidiff.losses.perceptual_loss`: what the expression analyser and the identity
  encoder see of the face must survive, not only the pixels), plus a small KL term. When fit ends
  it sets the VAE's latent scale from the latents' spread (as SD did) and writes the backbone
  (trained VAE, the untrained UNet and text encoder of its seed) to `export_dir`.
- `TinyUNetPretrain`: text-conditioned UNet2DConditionModel (epsilon prediction) on the frozen
  VAE's latents, with the tiny CLIP text encoder trained jointly (it starts random, unlike SD's),
  10% empty captions for classifier-free guidance, Min-SNR-gamma loss weighting (Hang et al.
  2023, as diffusers' `--snr_gamma`: the easy low-noise timesteps stop dominating the gradient,
  which converges faster), and an EMA copy of the UNet for sampling. Batches hold either pixels
  (encoded every step) or precomputed VAE posteriors (`datamodules.latent_portraits`). When fit
  ends it writes the backbone with the EMA UNet to `export_dir`.

Both add their part to the folder's record `pretrain_config.json` (command line, resolved config,
timings, final metrics); `python -m lightning_modules.base_release` then draws the sample grid and
installs the folder into the package.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics import MeanAbsoluteError
from torchmetrics.image import PeakSignalNoiseRatio

from emojidiff.cli import fit_record
from emojidiff.images import to_unit
from emojidiff.losses import min_snr_weights, perceptual_loss, snr
from emojidiff.models.backbone import Backbone
from emojidiff.models.tiny import save_backbone

#: The backbone folder's record of how it was made (each stage adds its part).
RECORD = "pretrain_config.json"


def _image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (3, rows*H, cols*W) in [0, 1] for TensorBoard."""
    b, c, h, w = images.shape
    cols = b // rows
    grid = (
        images[: rows * cols]
        .reshape(rows, cols, c, h, w)
        .permute(2, 0, 3, 1, 4)
        .reshape(c, rows * h, cols * w)
    )
    return to_unit(grid.clamp(-1, 1))


def _log_grid(module: L.LightningModule, tag: str, images: torch.Tensor, rows: int) -> None:
    experiment = getattr(module.logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_image"):
        experiment.add_image(tag, _image_grid(images.detach().cpu().float(), rows), module.global_step)


def read_record(folder: str | Path) -> dict[str, Any]:
    """The record `pretrain_config.json` of a backbone folder ({} when there is none)."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(folder: str | Path, record: dict[str, Any]) -> Path:
    path = Path(folder) / RECORD
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL, data: L.LightningDataModule, batches: int = 32) -> float:
    """1 / std of the VAE's latent means over `batches` training batches of `data` (a
    `WorldPortraitDataModule`: its stream's batches for seeds 10_000 + k)."""
    stream = data.train_dataloader().dataset
    latents = [
        vae.encode(stream.batch(10_000 + k)["pixels"].to(vae.device)).latent_dist.mean for k in range(batches)
    ]
    return float(1.0 / torch.cat(latents).std())


class TinyVAEPretrain(L.LightningModule):
    """Trains `backbone.vae` (all its parameters; the rest of the backbone stays as built) to
    reconstruct batches of {"pixels", "masks"}.

    perceptual: named frozen networks with `feature_maps(images [0, 1]) -> list[Tensor]` (the
    world's training analysers: {"expr": world-expr, "id": world-id}); for each, its
    `perceptual_loss` between reconstruction and input is added with `perceptual_weights[name]`.
    They stay frozen: only the VAE's parameters are optimised. An analyser with `describe` (the
    expression one) also reads the validation reconstructions (`val/expr_error`).

    export_dir: where `on_fit_end` writes the backbone once the VAE's `scaling_factor` is set from
    `scaling_batches` training batches (None: nothing written), with its record `pretrain_config.json`.
    """

    def __init__(
        self,
        backbone: Backbone,
        lr: float = 2e-3,
        kl_weight: float = 1e-6,
        face_weight: float = 4.0,
        feature_weight: float = 8.0,
        initial_logvar: float | None = -8.0,
        warmup_steps: int = 50,
        perceptual: dict[str, torch.nn.Module] | None = None,
        perceptual_weights: dict[str, float] | None = None,
        export_dir: str | None = None,
        scaling_batches: int = 32,
    ):
        super().__init__()
        perceptual, perceptual_weights = dict(perceptual or {}), dict(perceptual_weights or {})
        if set(perceptual) != set(perceptual_weights):
            raise ValueError(
                f"perceptual networks {sorted(perceptual)} and perceptual_weights "
                f"{sorted(perceptual_weights)} must name the same terms"
            )
        self.backbone = backbone.freeze()  # frozen and in eval mode but for the VAE
        vae = self.vae
        vae.requires_grad_(True).train()
        self.perceptual = torch.nn.ModuleDict(
            {k: m.requires_grad_(False).eval() for k, m in perceptual.items()}
        )
        self.reader = next((m for m in perceptual.values() if hasattr(m, "describe")), None)
        if initial_logvar is not None:
            # A fresh encoder's posterior has std ~1, which drowns the latents in noise for the
            # first thousand steps; starting it near-deterministic lets short CPU runs converge.
            with torch.no_grad():
                self.vae.encoder.conv_out.bias[vae.config.latent_channels :] = initial_logvar
        self.save_hyperparameters(ignore=["backbone", "perceptual"])
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.val_face_psnr = PeakSignalNoiseRatio(data_range=2.0)
        # the latent ceiling while it trains: the perceptual analyser's reading of reconstructions
        # against the renders' ground-truth expressions (natural units; benchmarks.diagnostics.latent_ceiling)
        self.val_expr_error = MeanAbsoluteError()

    @property
    def vae(self) -> AutoencoderKL:
        return self.backbone.vae

    def train(self, mode: bool = True) -> TinyVAEPretrain:
        super().train(mode)
        self.perceptual.eval()  # frozen: their BatchNorm statistics never move
        return self

    def _loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x, mask = batch["pixels"], batch["masks"]
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        weight = 1.0 + self.hparams.face_weight * mask
        if "feature_masks" in batch:
            weight = weight + self.hparams.feature_weight * batch["feature_masks"]
        l1 = (weight * (recon - x).abs()).mean() / weight.mean()
        kl = posterior.kl().mean()
        out = {"loss": l1 + self.hparams.kl_weight * kl, "l1": l1}
        for name, net in self.perceptual.items():
            out[f"perceptual_{name}"] = perceptual_loss(net.feature_maps, to_unit(recon), to_unit(x)).mean()
            out["loss"] = out["loss"] + self.hparams.perceptual_weights[name] * out[f"perceptual_{name}"]
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._loss(batch)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["pixels"])
        )
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, mask = batch["pixels"], batch["masks"].bool().expand_as(batch["pixels"])
        recon = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        self.val_psnr.update(recon, x)
        self.val_face_psnr.update(recon[mask], x[mask])
        self.log_dict({"val/psnr": self.val_psnr, "val/face_psnr": self.val_face_psnr}, batch_size=len(x))
        if self.reader is not None and "expressions" in batch:
            self.val_expr_error.update(self.reader.describe(to_unit(recon)), batch["expressions"])
            self.log("val/expr_error", self.val_expr_error, batch_size=len(x))
        if batch_idx == 0:
            _log_grid(self, "val/reconstruction", torch.cat([x[:8], recon[:8]]), rows=2)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the VAE's parameters only (the analysers and the rest of the backbone are frozen)."""
        opt = torch.optim.AdamW(self.vae.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
        total = max(self.trainer.max_steps, self.hparams.warmup_steps + 1)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=total, pct_start=self.hparams.warmup_steps / total
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self) -> None:
        run = fit_record(self.trainer)
        seconds = time.perf_counter() - self._start
        self.vae.eval().requires_grad_(False)
        scale = estimate_scaling_factor(self.vae, self.trainer.datamodule, self.hparams.scaling_batches)
        self.vae.register_to_config(scaling_factor=scale)
        if self.hparams.export_dir is None or not self.trainer.is_global_zero:
            return
        # a new VAE: the folder's record starts again (a UNet stage on it adds its part)
        save_backbone(self.backbone, self.hparams.export_dir)
        write_record(
            self.hparams.export_dir,
            {
                "vae": {
                    **run,
                    "global_step": self.global_step,
                    "seconds": seconds,
                    "metrics": _metrics(self.trainer),
                    "scaling_factor": scale,
                }
            },
        )


class TinyUNetPretrain(L.LightningModule):
    """Trains `backbone.unet` and `backbone.text_encoder` (epsilon loss); the VAE stays frozen.

    export_dir: where `on_fit_end` writes the backbone with the EMA UNet (None: nothing written), and
    its part of the record `pretrain_config.json` (the VAE stage's part is kept when that stage wrote
    this folder's VAE, else the VAE's folder and scaling factor are named).
    """

    def __init__(
        self,
        backbone: Backbone,
        lr: float = 1e-3,
        caption_dropout: float = 0.1,
        ema_decay: float = 0.995,
        warmup_steps: int = 50,
        snr_gamma: float | None = 5.0,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.backbone.vae.requires_grad_(False).eval()
        self.backbone.unet.requires_grad_(True).train()
        self.backbone.text_encoder.requires_grad_(True).train()
        self.save_hyperparameters(ignore=["backbone"])
        self.ema = AveragedModel(
            self.backbone.unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True
        )
        self.ema.requires_grad_(False)

    def train(self, mode: bool = True) -> TinyUNetPretrain:
        super().train(mode)
        self.backbone.vae.eval()  # frozen, never in train mode
        return self

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(B, T, C) text states, with gradients into the (trainable) text encoder."""
        return self.backbone.encode_prompt(prompts)["encoder_hidden_states"]

    @torch.no_grad()
    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scaled latents (B, C, h, w): a posterior sample of the batch's pixels or cached posteriors."""
        if "latent_mean" not in batch:
            return self.backbone.encode_images(batch["pixels"])
        mean, std = batch["latent_mean"], batch["latent_std"]
        return self.backbone.scale_latents(mean + std * torch.randn_like(mean))

    def _loss(self, batch: dict[str, Any], drop_captions: bool, weighted: bool = True) -> torch.Tensor:
        prompts = list(batch["prompts"])
        if drop_captions:
            keep = torch.rand(len(prompts)) >= self.hparams.caption_dropout
            prompts = [p if k else "" for p, k in zip(prompts, keep.tolist(), strict=True)]
        latents = self._latents(batch)
        noise = torch.randn_like(latents)
        scheduler = self.backbone.noise_scheduler
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = self.backbone.unet(noisy, t, self._encode_text(prompts)).sample
        per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if weighted and self.hparams.snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(
                snr(scheduler.alphas_cumprod, t), self.hparams.snr_gamma, "epsilon"
            )
        return per_sample.mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, drop_captions=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompts"]))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update_parameters(self.backbone.unet)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(batch_idx)  # the same noise and timesteps at every validation
        # unweighted epsilon MSE: comparable across snr_gamma settings
        self.log(
            "val/loss",
            self._loss(batch, drop_captions=False, weighted=False),
            batch_size=len(batch["prompts"]),
        )
        torch.random.set_rng_state(generator_state)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the UNet's and the text encoder's parameters (the VAE is frozen)."""
        params = list(self.backbone.unet.parameters()) + list(self.backbone.text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=1e-2)
        total = max(self.trainer.max_steps, self.hparams.warmup_steps + 1)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=total, pct_start=self.hparams.warmup_steps / total
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA UNet's weights, keyed like `backbone.unet.state_dict()`."""
        return dict(self.ema.module.state_dict())

    def on_fit_start(self) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self) -> None:
        run = fit_record(self.trainer)
        seconds = time.perf_counter() - self._start
        self.backbone.unet.load_state_dict(self.ema_state_dict())
        self.backbone.freeze()
        folder = self.hparams.export_dir
        if folder is None or not self.trainer.is_global_zero:
            return
        source = self.backbone.vae.config.get("_name_or_path")  # the vae/ folder `load_vae` read, if any
        vae_folder = Path(source).parent if source else None
        same = vae_folder is not None and vae_folder.resolve() == Path(folder).resolve()
        vae_record = read_record(folder).get("vae") if same else None
        if vae_record is None:
            vae_record = {
                "from": None if vae_folder is None else str(vae_folder),
                "scaling_factor": self.backbone.vae.config.scaling_factor,
            }
        record: dict[str, Any] = {"vae": vae_record}  # a new UNet: what a release added to the record is gone
        seconds_cache = getattr(self.trainer.datamodule, "encode_seconds", None)
        if seconds_cache is not None:
            record["latent_cache_seconds"] = seconds_cache
        record["unet"] = {
            **run,
            "global_step": self.global_step,
            "seconds": seconds,
            "metrics": _metrics(self.trainer),
        }
        save_backbone(self.backbone, folder)
        write_record(folder, record)
