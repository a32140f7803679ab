"""The frozen text-to-image backbone: UNet, VAE, text encoder(s), tokenizer(s), noise scheduler.

`Backbone.from_folder` reads a local diffusers folder (SD1.5 or SDXL layout); nothing is ever
downloaded. An architecture-only folder (`emojidiff:sd15-arch`, `emojidiff:sdxl-arch`: configuration
files, no weights; `emojidiff.models.architecture_only`) gives the real-scale networks with seeded random
weights, for speed, memory and wiring checks. Every weight is frozen (`requires_grad=False`) and stays in eval mode; the E-Adapter
(`emojidiff.models.adapter`) is what trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from emojidiff.errors import MissingWeightsError
from emojidiff.models.architecture_only import backbone_components, read_marker
from emojidiff.models.attention import EmojiDiffAttnProcessor
from emojidiff.packaged import is_architecture_only, resolve_backbone

BACKBONE_KEY = "model.backbone.path"

_ATTENTION = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}


def _component_files(kind: str, variant: str | None = None) -> dict[str, list[tuple[str, ...]]]:
    """Per sub-folder, the files that must exist: each entry is a tuple of alternatives."""
    v = f".{variant}" if variant else ""
    diff_w = (f"diffusion_pytorch_model{v}.safetensors", f"diffusion_pytorch_model{v}.safetensors.index.json")
    tf_w = (f"model{v}.safetensors", f"model{v}.safetensors.index.json")
    tok = [("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json")]
    files = {
        "unet": [("config.json",), diff_w],
        "vae": [("config.json",), diff_w],
        "text_encoder": [("config.json",), tf_w],
        "tokenizer": tok,
        "scheduler": [("scheduler_config.json",)],
    }
    if kind == "sdxl":
        files["text_encoder_2"] = [("config.json",), tf_w]
        files["tokenizer_2"] = tok
    return files


def expected_files(kind: str = "sd15", variant: str | None = None) -> list[str]:
    """The files a local diffusers folder of `kind` must hold (first alternative of each)."""
    return ["model_index.json"] + [
        f"{sub}/{alts[0]}" for sub, entries in _component_files(kind, variant).items() for alts in entries
    ]


def _check_folder(
    path: str | Path | None, key: str, kind: str | None, variant: str | None
) -> tuple[Path, str]:
    """Raise MissingWeightsError naming `key` and the missing files; return (folder, kind)."""
    layout = (
        "SD1.5 layout: "
        + ", ".join(expected_files("sd15", variant))
        + " (SDXL adds text_encoder_2/, tokenizer_2/)"
    )
    if path is None or not Path(path).is_dir():
        raise MissingWeightsError(
            key, path, expected_files(kind or "sd15", variant), hint=f"no such folder. {layout}"
        )
    folder = Path(path)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise MissingWeightsError(key, folder, ["model_index.json"], hint=layout)
    index = json.loads(index_file.read_text())
    if kind is None:
        kind = "sdxl" if index.get("text_encoder_2") and index["text_encoder_2"][0] is not None else "sd15"
    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"unknown backbone kind {kind!r}; expected 'sd15' or 'sdxl'")
    missing = [
        f"{sub}/{alts[0]}"
        for sub, entries in _component_files(kind, variant).items()
        for alts in entries
        if not any((folder / sub / a).is_file() for a in alts)
    ]
    if missing:
        raise MissingWeightsError(
            key, folder, missing, hint=f"weights must be safetensors ({kind} folder). {layout}"
        )
    return folder, kind


class Backbone(nn.Module):
    """A frozen latent-diffusion stack.

    Attributes:
        unet: `UNet2DConditionModel`, eps/v-prediction on latents (B, 4, h, w).
        vae: `AutoencoderKL`, images (B, 3, H, W) in [-1, 1] <-> latents (B, 4, H/f, W/f).
        text_encoder / tokenizer: CLIP text model (SD1.5: last hidden state; SDXL: penultimate).
        text_encoder_2 / tokenizer_2: SDXL only; `CLIPTextModelWithProjection` (pooled embeds).
        noise_scheduler: the training scheduler (DDPMScheduler built from scheduler/ config).
        kind: "sd15" | "sdxl".
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        noise_scheduler: DDPMScheduler,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        kind: str = "sd15",
    ):
        super().__init__()
        if kind not in ("sd15", "sdxl"):
            raise ValueError(f"unknown backbone kind {kind!r}; expected 'sd15' or 'sdxl'")
        if kind == "sdxl" and (text_encoder_2 is None or tokenizer_2 is None):
            raise ValueError("an sdxl backbone needs text_encoder_2 and tokenizer_2")
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.noise_scheduler = noise_scheduler
        self.kind = kind

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_folder(
        cls,
        path: str | Path | None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        gradient_checkpointing: bool = False,
        attention: str = "sdpa",
        kind: str | None = None,
        variant: str | None = None,
        key: str = BACKBONE_KEY,
    ) -> Backbone:
        """Load a local diffusers folder (SD1.5 or SDXL layout, detected from model_index.json).

        Args:
            path: the folder; `key` names the config entry it came from (for error messages).
            dtype: weight dtype of every component (e.g. torch.bfloat16 on GPU).
            gradient_checkpointing: enable activation checkpointing in the UNet (saves memory in
                adapter training; the adapter's processors are re-run inside the checkpoints).
            attention: "sdpa" (diffusers' AttnProcessor2_0) or "eager" (AttnProcessor).
            variant: weight file variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.

        Raises:
            MissingWeightsError: the folder or one of its files is missing (names `key` and files).
        """
        resolved = None if path is None else resolve_backbone(path)
        if resolved is not None and is_architecture_only(resolved):
            parts = backbone_components(resolved, kind or read_marker(resolved)["backbone_kind"], dtype)
            return cls(**parts)._ready(device, attention, gradient_checkpointing)
        folder, kind = _check_folder(resolved, key, kind, variant)
        common = dict(local_files_only=True, use_safetensors=True, variant=variant)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **common)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, **common)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        scheduler_config = DDPMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True)
        noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        text_encoder_2 = tokenizer_2 = None
        if kind == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", dtype=dtype, **common
            )
            tokenizer_2 = CLIPTokenizer.from_pretrained(
                folder, subfolder="tokenizer_2", local_files_only=True
            )
        backbone = cls(unet, vae, text_encoder, tokenizer, noise_scheduler, text_encoder_2, tokenizer_2, kind)
        return backbone._ready(device, attention, gradient_checkpointing)

    def _ready(self, device: str | torch.device, attention: str, gradient_checkpointing: bool) -> Backbone:
        """Frozen, with the attention processors asked for, checkpointing if asked, on `device`."""
        self.freeze()
        self.set_attention(attention)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        return self.to(device)

    # -- state ---------------------------------------------------------------------------------

    def freeze(self) -> Backbone:
        """requires_grad=False on every weight, and eval mode (which `train()` then keeps)."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        """Frozen components stay in eval mode; a component with trainable weights follows `mode`.

        (E.g. base pretraining unfreezes unet/text_encoder; an attached E-Adapter makes the UNet
        hold trainable processor weights, which is harmless: SD's UNet has no dropout/batch-norm.)
        """
        self.training = mode
        for child in self.children():
            child.train(mode and any(p.requires_grad for p in child.parameters()))
        return self

    def set_attention(self, attention: str = "sdpa") -> None:
        """Use diffusers' `AttnProcessor2_0` ("sdpa") or `AttnProcessor` ("eager") in UNet and VAE.

        Call before attaching an adapter: this replaces every UNet processor.
        """
        if attention not in _ATTENTION:
            raise ValueError(f"attention must be one of {sorted(_ATTENTION)}, got {attention!r}")
        if any(isinstance(p, EmojiDiffAttnProcessor) for p in self.unet.attn_processors.values()):
            raise RuntimeError(
                "set_attention would drop the attached E-Adapter's processors: detach it first"
            )
        self.unet.set_attn_processor(_ATTENTION[attention]())
        self.vae.set_attn_processor(_ATTENTION[attention]())

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixel size / latent size (8 for SD, 4 for the tiny VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_image_size(self) -> int:
        """The UNet's native resolution in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # -- text ----------------------------------------------------------------------------------

    def _tokenize(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_prompt(
        self, prompts: str | list[str], height: int | None = None, width: int | None = None
    ) -> dict[str, Any]:
        """Text conditioning for the UNet.

        Returns:
            {"encoder_hidden_states": (B, T, C) float, "added_cond_kwargs": None (sd15) or
            {"text_embeds": (B, P) pooled text embeds, "time_ids": (B, 6)} (sdxl; time ids are
            (height, width, 0, 0, height, width) in pixels, default the UNet's native size)}.
            Unlike the SDXL pipeline, an empty prompt is encoded, not zeroed, for both kinds.
            Gradients flow only when a text encoder has trainable weights (base pretraining).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoders = [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]
        trainable = any(p.requires_grad for m in encoders for p in m.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return self._encode_prompt(prompts, height, width)

    def _encode_prompt(self, prompts: list[str], height: int | None, width: int | None) -> dict[str, Any]:
        ids = self._tokenize(self.tokenizer, prompts)
        if self.kind == "sd15":
            hidden = self.text_encoder(ids)[0]
            return {"encoder_hidden_states": hidden, "added_cond_kwargs": None}
        out_1 = self.text_encoder(ids, output_hidden_states=True)
        out_2 = self.text_encoder_2(self._tokenize(self.tokenizer_2, prompts), output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled = out_2.text_embeds
        size = self.default_image_size
        h, w = height or size, width or size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden.dtype, device=hidden.device).repeat(
            len(prompts), 1
        )
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }

    # -- images --------------------------------------------------------------------------------

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, C, h, w) -> the UNet's latent space: (latents - shift) * scaling_factor."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `scale_latents`: the UNet's latents (B, C, h, w) -> raw VAE latents."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return latents / self.vae.config.scaling_factor + shift

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f) (posterior sample or mode)."""
        dist = self.vae.encode(images.to(device=self.device, dtype=self.vae.dtype)).latent_dist
        return self.scale_latents(dist.sample(generator) if sample else dist.mode())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (clamped).

        Differentiable (no `no_grad`): ICA decodes its one-step x0 and back-propagates through it.
        """
        latents = self.unscale_latents(latents.to(self.vae.dtype))
        return self.vae.decode(latents).sample.clamp(-1, 1)
