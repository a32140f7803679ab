"""Real-scale networks with no weights: the published SD1.5 / SDXL / CLIP ViT-H / ArcFace-R100
configurations, instantiated with seeded random weights.

An architecture-only folder (`emojidiff.packaged`: `emojidiff:sd15-arch`, `emojidiff:sdxl-arch`,
`emojidiff:clip-vit-h-14-arch`, `emojidiff:arcface-r100-arch`) is the diffusers / transformers folder
layout with the configuration files alone (the tokenizer is built in code), plus `architecture_only.json` (what it was copied from,
the seed, and that it is for speed, memory and wiring only). `Backbone.from_folder`, the "clip"
expression encoder and the "arcface-torch" identity encoder accept such a folder wherever they
accept real weights, so the training configs of `configs/sd15/` and `configs/sdxl/` run unchanged but
for those keys. The same folder and seed give the same weights in every process (built on the CPU
under a forked RNG), which is what lets a DDP rank, a resumed run or ICA's reload of a stage-1
export see the network stage 1 saw.

`shrink_architecture` writes a narrow copy of such a folder (every width divided, depths capped):
the GPU check's CPU dry run goes through every code path of the real-scale one in seconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from emojidiff.packaged import ARCHITECTURE_MARKER, is_architecture_only, read_marker

__all__ = [
    "ARCHITECTURE_MARKER",
    "backbone_components",
    "clip_vision_model",
    "is_architecture_only",
    "read_marker",
    "seeded",
    "shrink_architecture",
]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build under torch.manual_seed(seed) without disturbing the caller's CPU random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def backbone_components(folder: str | Path, kind: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The `Backbone` constructor's keyword arguments for an architecture-only backbone folder:
    UNet, VAE and text encoder(s) from their config.json with seeded random weights (cast to
    `dtype`), the project-built tokenizer (`emojidiff.models.tiny.build_tokenizer`: its ids lie within
    the text encoders' vocabulary) at the text encoders' length, and a DDPMScheduler from
    scheduler/scheduler_config.json."""
    from emojidiff.models.tiny import build_tokenizer  # here: tiny imports backbone, which imports this

    folder = Path(folder)
    marker = read_marker(folder)
    with seeded(marker.get("seed", 0)):
        unet = UNet2DConditionModel.from_config(_json(folder / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(_json(folder / "vae" / "config.json"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_json(folder / "text_encoder" / "config.json")))
        text_encoder_2 = tokenizer_2 = None
        if kind == "sdxl":
            config_2 = CLIPTextConfig(**_json(folder / "text_encoder_2" / "config.json"))
            text_encoder_2 = CLIPTextModelWithProjection(config_2)
            tokenizer_2 = build_tokenizer(max_length=config_2.max_position_embeddings)
    scheduler = DDPMScheduler.from_config(_json(folder / "scheduler" / "scheduler_config.json"))
    if dtype != torch.float32:  # built in float32, as a from_pretrained of float32 files would be
        unet, vae, text_encoder = unet.to(dtype), vae.to(dtype), text_encoder.to(dtype)
        text_encoder_2 = None if text_encoder_2 is None else text_encoder_2.to(dtype)
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(max_length=text_encoder.config.max_position_embeddings),
        noise_scheduler=scheduler,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        kind=kind,
    )


def clip_vision_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> CLIPVisionModel:
    """The vision tower of an architecture-only CLIP folder (config.json of a
    CLIPVisionModelWithProjection; the projection is not built: the encoder reads hidden states)."""
    folder = Path(folder)
    marker = read_marker(folder)
    config = {k: v for k, v in _json(folder / "config.json").items() if k != "architectures"}
    with seeded(marker.get("seed", 0)):
        model = CLIPVisionModel(CLIPVisionConfig(**config))
    return model if dtype == torch.float32 else model.to(dtype)


# ---------------------------------------------------------------------------------------------
# Narrow copies for dry runs
# ---------------------------------------------------------------------------------------------


def _narrow(width: int, divisor: int, multiple: int) -> int:
    return max(multiple, (width // divisor) // multiple * multiple)


def _shrink_text(cfg: dict[str, Any], divisor: int, depth: int) -> dict[str, Any]:
    heads = cfg["num_attention_heads"]
    hidden = _narrow(cfg["hidden_size"], divisor, heads)
    return {
        **cfg,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": min(depth, cfg["num_hidden_layers"]),
        "projection_dim": hidden,
    }


def shrink_architecture(src: str | Path, dst: str | Path, divisor: int = 8, depth: int = 2) -> Path:
    """Write a narrow copy of the architecture-only folder `src` into `dst`: the same layout, block
    types and wiring (cross-attention width = text width, SDXL's pooled + time-id input), every
    channel width divided by `divisor`, transformer depths capped at `depth`. For dry runs only."""
    src, dst = Path(src), Path(dst)
    marker = read_marker(src)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    marker = {**marker, "shrunk": {"from": str(src), "divisor": divisor, "depth": depth}}
    (dst / ARCHITECTURE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    def rewrite(rel: str, cfg: dict[str, Any]) -> None:
        (dst / rel).write_text(json.dumps(cfg, indent=2) + "\n")

    kind = marker["kind"]
    if kind == "identity_encoder":
        rewrite(ARCHITECTURE_MARKER, {**marker, "arch": "iresnet18"})
    elif kind == "expression_encoder":
        rewrite("config.json", _shrink_text(_json(src / "config.json"), divisor, depth))
    elif kind == "backbone":
        text = _shrink_text(_json(src / "text_encoder" / "config.json"), divisor, depth)
        rewrite("text_encoder/config.json", text)
        cross = text["hidden_size"]
        unet = _json(src / "unet" / "config.json")
        if (src / "text_encoder_2").is_dir():
            text_2 = _shrink_text(_json(src / "text_encoder_2" / "config.json"), divisor, depth)
            rewrite("text_encoder_2/config.json", text_2)
            cross += text_2["hidden_size"]
            unet["projection_class_embeddings_input_dim"] = (
                text_2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
            )
        groups = 8
        unet.update(
            block_out_channels=[_narrow(c, divisor, groups * 2) for c in unet["block_out_channels"]],
            norm_num_groups=groups,
            cross_attention_dim=cross,
        )
        if isinstance(unet.get("transformer_layers_per_block"), list):
            unet["transformer_layers_per_block"] = [
                min(depth, n) for n in unet["transformer_layers_per_block"]
            ]
        rewrite("unet/config.json", unet)
        vae = _json(src / "vae" / "config.json")
        vae.update(block_out_channels=[_narrow(c, divisor, groups) for c in vae["block_out_channels"]])
        vae["norm_num_groups"] = groups
        rewrite("vae/config.json", vae)
    else:
        raise ValueError(f"{src}: unknown architecture kind {kind!r}")
    return dst
