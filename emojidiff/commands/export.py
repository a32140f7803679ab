"""`emojidiff export`: a training checkpoint -> a model folder (`generate` and the evaluation load it).

    emojidiff export --ckpt outputs/train/decoupled/version_0/checkpoints/last.ckpt --out models/stage1
    emojidiff export --ckpt ... --out ... --live true   # the live weights instead of their EMA

Reads the checkpoint with `torch.load(weights_only=True)` (no unpickling of objects) and its
`emojidiff` record (the model spec and the adapter's layer specs, written by the training
modules), so no Lightning module is imported. Writes `emojidiff_model.json`, `adapter/`, the
trained expression encoder's weights and the UNet LoRA when the run trained one (see
`emojidiff.models.bundle`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# torch, diffusers, PIL and the models are imported inside the functions that use them: `emojidiff --help`
# imports this module to list its options (start-up time).
HELP = "write a training checkpoint's (EMA) adapter as a model folder"
log = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    """export"""

    ckpt: Path
    """a checkpoint written by `emojidiff fit` (stage 1 or ICA)"""
    out: Path
    """the model folder to write"""
    live: bool = False
    """export the live weights, not their EMA"""


#: run's keyword arguments -> the option dataclass each is parsed into (`emojidiff.cli`)
OPTIONS = {"opts": ExportOptions}


def _sub(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def export_checkpoint(ckpt: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Write the model folder of checkpoint `ckpt` into `out`; returns `out`."""
    import torch

    from emojidiff.models.adapter import EAdapter, EAdapterConfig
    from emojidiff.models.bundle import build_expression_encoder, save_model

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"--ckpt {ckpt}: no such checkpoint")
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    record = data.get("emojidiff")
    if record is None:
        raise ValueError(
            f"{ckpt} has no 'emojidiff' record: it was not written by an EmojiDiff training module"
        )
    if record.get("model") is None:
        raise ValueError(
            f"{ckpt}: its model was handed to the training module as objects without a ModelSpec, "
            "so nothing says which backbone and encoders to write into a model folder"
        )
    state = data["state_dict"]
    prefix = "ema.module." if use_ema and record.get("ema") else ""
    if use_ema and not record.get("ema"):
        log.warning("%s was trained without EMA: exporting the live weights", ckpt)
    adapter = EAdapter(EAdapterConfig(**record["adapter"]["config"]), layer_specs=record["adapter"]["layers"])
    adapter.load_state_dict(_sub(state, prefix + "adapter."))
    spec = record["model"]
    encoder = build_expression_encoder(spec["expression_encoder"])
    enc_state = _sub(state, prefix + "expression_encoder.")
    if getattr(encoder, "trainable", False):
        if not enc_state:
            raise ValueError(
                f"{ckpt}: the expression encoder is trainable but the checkpoint holds no weights for it"
            )
        encoder.load_state_dict(enc_state)
    unet = None
    if record.get("unet_lora"):
        unet = _lora_unet(spec["backbone"], record["unet_lora"], state, prefix, ckpt)
    return save_model(
        out,
        backbone_path=spec["backbone"],
        adapter=adapter,
        expression_encoder=encoder,
        expression_encoder_spec=spec["expression_encoder"],
        identity_encoder_spec=spec["identity_encoder"],
        image_size=spec.get("image_size"),
        default_prompt=spec.get("default_prompt", ""),
        mask_from=spec.get("mask_from", "none"),
        unet=unet,
    )


def _lora_unet(backbone: str, config: Mapping[str, Any], state: Mapping[str, Any], prefix: str, ckpt: Path):
    """The backbone's UNet carrying the checkpoint's LoRA (EMA weights under `prefix`, else the live ones)."""
    from emojidiff.models.backbone import Backbone
    from emojidiff.models.lora import add_unet_lora, lora_modules

    unet = Backbone.from_folder(backbone, key=f"{ckpt}: emojidiff.model.backbone").unet
    add_unet_lora(unet, config)
    modules = lora_modules(unet)
    if prefix:
        weights = _sub(state, prefix + "unet_lora.")
    else:
        weights = {f"{k}.weight": state.get(f"backbone.unet.{k.replace('__', '.')}.weight") for k in modules}
    missing = [k for k in modules.state_dict() if weights.get(k) is None]
    if missing:
        raise ValueError(
            f"{ckpt}: the run trained a UNet LoRA but the checkpoint lacks {len(missing)} of its "
            f"weights, e.g. {missing[:2]}"
        )
    modules.load_state_dict(weights)
    return unet


def run(opts: ExportOptions) -> Path:
    out = export_checkpoint(opts.ckpt, opts.out, use_ema=not opts.live)
    print(f"wrote {out}")
    return out
