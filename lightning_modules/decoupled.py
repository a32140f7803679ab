"""Stage 1, decoupled training: the diffusion loss on IDI triplets.

    python -m emojidiff.cli fit -c configs/decoupled.yaml

A step: encode the target `tgt` (identity A, expression e) to latents, noise them at a uniform
timestep, and predict the noise (or velocity, as the backbone's scheduler says) with the UNet
conditioned on [prompt | identity tokens of A's embedding | expression tokens of the template
`tmpl`, e on another identity]. Each condition is dropped at its own rate (the datamodule's
flags) so classifier-free guidance works per condition. Because the template never shows A, the
expression branch can only lower the loss by carrying e, not A's appearance; the identity has to
come through the identity branch.

Options: Min-SNR-gamma weighting (`snr_gamma`); face-region weighting (`face_weight`: the loss
inside the template's face mask counts 1 + face_weight times). The template's mask stands in for
the target's face: exact for round-0 self pairs and world-swap templates (made in place from the
target), approximate for templates re-rendered in another scene (world-resynth: another portrait
of the same framing, so the faces overlap but do not coincide).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from emojidiff.losses import TIMESTEP_SAMPLING, diffusion_loss, min_snr_weights, snr
from emojidiff.models.bundle import EmojiDiffModel
from lightning_modules.adapter_training import AdapterTrainingModule


class DecoupledModule(AdapterTrainingModule):
    """Stage 1 (see the module docstring). Arguments of `AdapterTrainingModule`, plus:

    snr_gamma: Min-SNR-gamma weighting of the per-sample loss (None: plain MSE).
    face_weight: extra weight of the face region in the loss (0: none).
    timestep_sampling: how the diffusion timesteps are drawn (`emojidiff.losses.sample_timesteps`:
        "uniform", or "cubic", which favours the high-noise steps where identity is decided).
    """

    stage = "decoupled"

    def __init__(
        self,
        model: EmojiDiffModel,
        *args: Any,
        snr_gamma: float | None = None,
        face_weight: float = 0.0,
        timestep_sampling: str = "uniform",
        **kwargs: Any,
    ):
        super().__init__(model, *args, **kwargs)
        if face_weight < 0 or (snr_gamma is not None and snr_gamma <= 0):
            raise ValueError(f"face_weight must be >= 0 and snr_gamma > 0, got {face_weight}, {snr_gamma}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}"
            )
        self.snr_gamma, self.face_weight, self.timestep_sampling = (
            snr_gamma,
            float(face_weight),
            timestep_sampling,
        )

    def face_weights(self, batch: Mapping[str, Any], shape: torch.Size) -> Tensor | None:
        """(B, 1, h, w) 1 + face_weight * (template face mask at latent size), or None."""
        if self.face_weight == 0:
            return None
        mask = F.interpolate(batch["tmpl_mask"].to(self.device, torch.float32), size=shape[-2:], mode="area")
        return 1.0 + self.face_weight * mask

    def diffusion_term(
        self, batch: Mapping[str, Any], pred: Tensor, latents: Tensor, noise: Tensor, t: Tensor
    ) -> Tensor:
        """(B,) the stage-1 loss of a prediction (B, C, h, w) of the noised `latents` at timesteps t."""
        weights = None
        if self.snr_gamma is not None:
            weights = min_snr_weights(snr(self.alphas_cumprod, t), self.snr_gamma, self.prediction_type)
        target = self.diffusion_target(latents, noise, t)
        return diffusion_loss(pred, target, weights, self.face_weights(batch, latents.shape))

    def compute_losses(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        latents, noise, t, noisy = self.noised(batch, generator=generator, sampling=self.timestep_sampling)
        ehs, added = self.condition(batch)
        pred = self.unet(noisy, t, ehs, added)
        return {"diffusion": self.diffusion_term(batch, pred, latents, noise, t)}
