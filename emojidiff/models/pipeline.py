"""Inference: identity embedding + expression template (+ prompt) -> portrait.

`EmojiDiffPipeline` wraps a `Backbone`, an attached `EAdapter`, an expression encoder and
optionally an identity encoder. Compositional classifier-free guidance (nested, as in
InstructPix2Pix), with eps(text, id, expr) the UNet's prediction under those conditions, "-"
the null condition (negative prompt for text, zero-input tokens for id/expr; see adapter.py):

    eps = eps(-, -, -)
        + g_text * (eps(p, -, -) - eps(-, -, -))
        + g_id   * (eps(p, i, -) - eps(p, -, -))
        + g_expr * (eps(p, i, e) - eps(p, i, -))

i.e. weights (1 - g_text, g_text - g_id, g_id - g_expr, g_expr) on the four predictions; those
with weight 0 are not computed, so with g_id = g_expr = g_text = g (the default) this is plain
CFG, eps(-,-,-) + g * (eps(p,i,e) - eps(-,-,-)), two UNet passes per step (one when g == 1).
The formula applies to whatever the UNet predicts (epsilon or v); the scheduler interprets it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from emojidiff.choices import SCHEDULERS
from emojidiff.images import to_signed, to_tensor, to_uint8, to_unit
from emojidiff.models.adapter import EAdapter
from emojidiff.models.backbone import Backbone
from emojidiff.models.expression_encoder import ExpressionEncoder


def make_scheduler(name: str, config: dict):
    """An inference scheduler of `name` (one of `emojidiff.choices.SCHEDULERS`) from a scheduler config."""
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def load_sd_pipeline(
    folder: str | Path, scheduler: str = "ddim", dtype: torch.dtype | None = None
) -> StableDiffusionPipeline:
    """diffusers' own text-to-image pipeline of a local SD1.5-layout folder (model_index.json): nothing
    downloaded, nothing unpickled (safetensors only), no safety checker, the inference `scheduler` by
    name, progress bar off. dtype: the weights' dtype (None: as stored)."""
    pipe = StableDiffusionPipeline.from_pretrained(
        folder,
        local_files_only=True,
        use_safetensors=True,
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_image_tensor(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """PIL / numpy uint8 (H, W, 3) or (B, H, W, 3) / float tensor (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.ndim == 3:
            x = x[None]
        return x.to(device)
    if not isinstance(images, np.ndarray):
        images = np.asarray(images)  # PIL image
    arr = images[None] if images.ndim == 3 else images
    if arr.dtype == np.uint8:
        return to_tensor(arr).to(device)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().to(device)


@dataclass
class EmojiDiffOutput:
    """images: (B, H, W, 3) uint8; latents: (B, 4, H/f, W/f) final (scaled) latents."""

    images: np.ndarray
    latents: torch.Tensor


class EmojiDiffPipeline:
    """Backbone + E-Adapter + encoders -> images.

    Args:
        backbone: the frozen backbone; the adapter is attached to its UNet if it is not yet.
        adapter: a trained (or fresh) `EAdapter`.
        expression_encoder: `(images (B,3,H,W) in [0,1], mask (B,1,H,W) | None) -> (B, L, F)`.
        identity_encoder: optional `images (B,3,H,W) in [0,1] -> (B, D_id)`, needed for `id_image`.
    """

    def __init__(
        self,
        backbone: Backbone,
        adapter: EAdapter,
        expression_encoder: ExpressionEncoder | Callable[..., torch.Tensor],
        identity_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.backbone = backbone
        self.adapter = adapter
        self.expression_encoder = expression_encoder
        self.identity_encoder = identity_encoder
        if not adapter.is_attached(backbone.unet):
            adapter.attach(backbone.unet)

    def to(self, device: torch.device | str) -> EmojiDiffPipeline:
        for m in (self.backbone, self.adapter, self.expression_encoder, self.identity_encoder):
            if isinstance(m, torch.nn.Module):
                m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def _conditions(self, prompts, negative, tokens, height, width, weights):
        """Stack (encoder_hidden_states, added_cond_kwargs) of the conditions with non-zero weight."""
        text = self.backbone.encode_prompt(prompts, height, width)
        neg = self.backbone.encode_prompt(negative, height, width)
        full, id_only, null = tokens
        table = [(neg, null), (text, null), (text, id_only), (text, full)]
        used = [(w, t, k) for w, (t, k) in zip(weights, table, strict=True) if w != 0]
        ehs = torch.cat(
            [self.adapter.build_encoder_hidden_states(t["encoder_hidden_states"], k) for _, t, k in used]
        )
        added = None
        if self.backbone.kind == "sdxl":
            added = {
                key: torch.cat([t["added_cond_kwargs"][key] for _, t, _ in used])
                for key in ("text_embeds", "time_ids")
            }
        return [w for w, _, _ in used], ehs, added

    @torch.no_grad()
    def condition_inputs(
        self,
        expr_image,
        expr_mask: torch.Tensor | None = None,
        *,
        id_embeds: torch.Tensor | None = None,
        id_image=None,
        id_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The adapter's inputs for B templates (arguments as `__call__`'s): identity embeddings
        (B, D_id), identity feature maps (B, L, F) or None, expression features (B, L, F)."""
        device = self.device
        expr_x = to_image_tensor(expr_image, device)
        b = expr_x.shape[0]
        if id_embeds is None:
            if id_image is None or self.identity_encoder is None:
                raise ValueError("give id_embeds, or id_image together with an identity_encoder")
            id_embeds = self.identity_encoder(to_image_tensor(id_image, device))
        id_embeds = torch.as_tensor(id_embeds, device=device)
        id_embeds = id_embeds[None] if id_embeds.ndim == 1 else id_embeds
        if id_embeds.shape[0] == 1 and b > 1:
            id_embeds = id_embeds.expand(b, -1)
        if id_embeds.shape[0] != b:
            raise ValueError(f"{id_embeds.shape[0]} identity embeddings for {b} expression templates")
        if self.adapter.uses_id_features and id_features is None:
            if id_image is None or not hasattr(self.identity_encoder, "token_features"):
                raise ValueError(
                    "this model's identity branch reads the reference image's feature map: pass id_image "
                    "(with an identity encoder that has token_features) or id_features"
                )
            id_features = self.identity_encoder.token_features(to_image_tensor(id_image, device))
        if id_features is not None and id_features.shape[0] == 1 and b > 1:
            id_features = id_features.expand(b, -1, -1)
        return id_embeds, id_features, self.expression_encoder(expr_x, expr_mask)

    @torch.no_grad()
    def __call__(
        self,
        expr_image,
        id_embeds: torch.Tensor | None = None,
        id_image=None,
        id_features: torch.Tensor | None = None,
        expr_mask: torch.Tensor | None = None,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] = "",
        guidance_scale: float = 5.0,
        id_guidance: float | None = None,
        expr_guidance: float | None = None,
        num_inference_steps: int = 30,
        scheduler: str = "ddim",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        id_scale: float | None = None,
        expr_scale: float | None = None,
        init_image: torch.Tensor | None = None,
        strength: float = 1.0,
        init_mask: torch.Tensor | None = None,
        step_callback: Callable[[int, int], None] | None = None,
    ) -> EmojiDiffOutput:
        """Generate B portraits (B = batch of the expression template).

        Args:
            expr_image: expression template(s): tensor (B, 3, H, W) in [0, 1] (or uint8), numpy
                uint8 (B, H, W, 3) / (H, W, 3), or a PIL image.
            id_embeds: (B, D_id) or (D_id,) identity embeddings; or give `id_image` and an identity encoder.
            id_image: identity reference(s) (same forms as expr_image): embedded when `id_embeds` is
                None, and the source of `id_features` for an adapter whose identity branch reads the
                encoder's spatial feature map (`EAdapter.uses_id_features`).
            id_features: (B, L, F) those features, precomputed (else taken from `id_image`).
            expr_mask: (B, 1, H, W) in [0, 1] face mask of the template (None: unmasked).
            prompt / negative_prompt: str or B strings.
            guidance_scale / id_guidance / expr_guidance: g_text, g_id, g_expr of the module
                docstring's formula; id/expr default to guidance_scale.
            scheduler: "ddim" | "dpm++" | "euler" | "ddpm", built from the backbone's scheduler config.
            seed / generator: the initial noise (and any scheduler noise) comes from this CPU
                generator (default: seed 0), so a seed gives the same images on any device.
            height / width: pixels (default the UNet's native size); multiples of the VAE factor.
            id_scale / expr_scale: branch weights for this call only (None: the adapter's current).
            init_image / strength / init_mask: start from (B, 3, H, W) images in [0, 1] noised to
                `strength` of the schedule (SDEdit) instead of pure noise; with init_mask (B, 1, H, W)
                in [0, 1], only the masked region is regenerated: outside it the init image's
                latents, noised to each step's level, replace the sample at every step.
            step_callback: called as (steps done, steps in all) after every denoising step (a progress bar).
        """
        bb, device = self.backbone, self.device
        id_embeds, id_features, expr_feats = self.condition_inputs(
            expr_image, expr_mask, id_embeds=id_embeds, id_image=id_image, id_features=id_features
        )
        b = expr_feats.shape[0]
        prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
        negative = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
        height = height or bb.default_image_size
        width = width or bb.default_image_size
        f = bb.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")

        g_t = float(guidance_scale)
        g_i = g_t if id_guidance is None else float(id_guidance)
        g_e = g_t if expr_guidance is None else float(expr_guidance)
        weights = [1.0 - g_t, g_t - g_i, g_i - g_e, g_e]

        ad = self.adapter
        tokens = (
            ad.encode_conditions(id_embeds, expr_feats, id_features=id_features),
            ad.encode_conditions(id_embeds, expr_feats, drop_expr=True, id_features=id_features),
            ad.encode_conditions(id_embeds, expr_feats, drop_id=True, drop_expr=True),
        )
        weights, ehs, added = self._conditions(prompts, negative, tokens, height, width, weights)
        k = len(weights)

        if generator is None:
            generator = torch.Generator("cpu").manual_seed(0 if seed is None else seed)
        sched = make_scheduler(scheduler, bb.noise_scheduler.config)
        sched.set_timesteps(num_inference_steps, device=device)
        shape = (b, bb.unet.config.in_channels, height // f, width // f)
        latents = (
            randn_tensor(shape, generator=generator, device=device, dtype=bb.dtype) * sched.init_noise_sigma
        )
        timesteps, init, keep = sched.timesteps, None, None
        if init_image is not None:
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"strength must lie in (0, 1], got {strength}")
            noise = latents / sched.init_noise_sigma
            init = bb.encode_images(to_signed(to_image_tensor(init_image, device)), sample=False)
            timesteps = sched.timesteps[num_inference_steps - max(1, round(num_inference_steps * strength)) :]
            latents = sched.add_noise(init, noise, timesteps[:1].repeat(b))
            if init_mask is not None:
                keep = 1.0 - torch.nn.functional.interpolate(
                    init_mask.to(device, bb.dtype), size=shape[-2:], mode="area"
                )

        old_scales = (ad.config.id_scale, ad.config.expr_scale)
        ad.set_scales(id_scale, expr_scale)
        try:
            for i, t in enumerate(timesteps):
                model_in = sched.scale_model_input(torch.cat([latents] * k), t)
                pred = bb.unet(model_in, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
                eps = sum(w * p for w, p in zip(weights, pred.chunk(k), strict=True))
                latents = sched.step(eps, t, latents, generator=generator).prev_sample
                if keep is not None:  # outside the mask: the init latents at the level of the next step
                    known = (
                        init
                        if i + 1 == len(timesteps)
                        else sched.add_noise(init, noise, timesteps[i + 1 : i + 2].repeat(b))
                    )
                    latents = keep * known + (1.0 - keep) * latents
                if step_callback is not None:
                    step_callback(i + 1, len(timesteps))
        finally:
            ad.set_scales(*old_scales)

        images = to_uint8(to_unit(bb.decode_latents(latents).float()))
        return EmojiDiffOutput(images=images, latents=latents)
