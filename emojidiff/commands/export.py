"""`emojidiff export`: a training checkpoint -> a model folder (`generate` and the evaluation load it),
or a model -> diffusers IP-Adapters that a plain StableDiffusionPipeline loads.

    emojidiff export --ckpt outputs/train/decoupled/version_0/checkpoints/last.ckpt --out models/stage1
    emojidiff export --ckpt ... --out ... --live true   # the live weights instead of their EMA
    emojidiff export --format diffusers --model emojidiff:emojidiff-world --out exports/world \
        [--results docs/results/table.csv --method emojidiff]

The diffusers export (`emojidiff.models.diffusers_export`) writes two IP-Adapter files (identity,
expression), the LoRA when the model has one, the per-block scales, a model card (README.md) and
says what plain diffusers does not carry.

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
from typing import Any, Literal

# torch, diffusers, PIL and the models are imported inside the functions that use them: `emojidiff --help`
# imports this module to list its options (start-up time).
HELP = "a training checkpoint as a model folder, or a model as IP-Adapters for plain diffusers"
log = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    """export"""

    out: Path
    """the folder to write"""
    format: Literal["emojidiff", "diffusers"] = "emojidiff"
    """emojidiff: a checkpoint as a model folder; diffusers: a model as IP-Adapters for plain diffusers"""
    ckpt: Path | None = None
    """(emojidiff) a checkpoint written by `emojidiff fit` (stage 1 or ICA)"""
    live: bool = False
    """(emojidiff) export the live weights, not their EMA"""
    model: str | None = None
    """(diffusers) a model folder or packaged name (emojidiff:emojidiff-world)"""
    results: Path | None = None
    """(diffusers) an evaluation's table.csv whose rows of --method the model card shows"""
    method: str | None = None
    """(diffusers) the method label of this model in --results"""
    examples: list[Path] | None = None
    """(diffusers) identity and expression images for the card's example (default: two world portraits)"""

    def __post_init__(self):
        if self.format == "emojidiff" and (self.ckpt is None or self.model is not None):
            raise ValueError("--format emojidiff exports a checkpoint: give --ckpt (and no --model)")
        if self.format == "diffusers" and (self.model is None or self.ckpt is not None):
            raise ValueError("--format diffusers exports a model folder: give --model (and no --ckpt)")
        if (self.results is None) != (self.method is None):
            raise ValueError("give --results and --method together")
        if self.examples is not None and len(self.examples) != 2:
            raise ValueError(
                "--examples takes two images: the identity reference and the expression template"
            )


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
    if opts.format == "emojidiff":
        out = export_checkpoint(opts.ckpt, opts.out, use_ema=not opts.live)
        print(f"wrote {out}")
        return out
    from emojidiff.models.bundle import load_model
    from emojidiff.models.diffusers_export import export_diffusers

    record = export_diffusers(
        load_model(opts.model), opts.out, examples=opts.examples, results=opts.results, method=opts.method
    )
    for name, f in record["files"].items():
        print(f"wrote {opts.out / name}: {f['parameters']:,} parameters, {f['bytes']:,} bytes")
    print(f"wrote {opts.out / 'README.md'} (model card) and {opts.out / 'emojidiff_export.json'}")
    print("not carried by plain diffusers:")
    for note in record["not_carried"]:
        print(f"  - {note}")
    return opts.out
