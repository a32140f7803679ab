"""The on-disk EmojiDiff model a user generates with: backbone reference, E-Adapter, encoders.

A model folder holds

    emojidiff_model.json              what to build (below)
    adapter/                          `EAdapter.save` layout: adapter.safetensors, adapter_config.json
    expression_encoder.safetensors    only when the expression encoder is trainable
    unet_lora/                        only when a LoRA on the UNet trained with the adapter
                                      (`emojidiff.models.lora`: diffusers' LoRA layout)

and `emojidiff_model.json` is

    {"format": "emojidiff-model", "version": 1,
     "backbone": "emojidiff:tiny-sd15",      # packaged (emojidiff.packaged) or a local diffusers folder
     "identity_encoder": {"name": "world-id", "init_args": {}},      # emojidiff.face registry
     "expression_encoder": {"name": "tiny_conv", "init_args": {}},  # EXPRESSION_ENCODERS registry
     "expression_encoder_weights": "expression_encoder.safetensors",  # or null (frozen encoder)
     "image_size": 64, "default_prompt": "a portrait, realistic style", "mask_from": "world",
     "unet_lora": "unet_lora"}                 # or null (no LoRA)

A packaged backbone (`emojidiff:NAME`, see `emojidiff.packaged`) is stored by name. A relative
`backbone` path is resolved against the folder that holds `emojidiff_model.json` (never the
current directory), so a model folder and its backbone can move together; `save_model` turns a
relative path given to it (relative to the current directory) into that form.
`mask_from` is how `emojidiff generate` masks templates by default: "none", "world" (the embedded
world's face-region prior) or "aligner" (a face aligner's landmark hull).

Expression encoder names: the `EXPRESSION_ENCODERS` registry ("tiny_conv", "clip", "vae_patches",
"world_expr_features", "expression_params": the coarse parameter-vector baseline); the aliases
"tiny-conv" and "clip-vision" are accepted and stored under the registry name.

The training configs build their parts here, by `class_path`/`init_args` (the training modules
take objects and build nothing from names): `FreshModel` (a fresh E-Adapter on a backbone, with
encoders by registry name), `TrainedModel` (a model folder to start from), and the face networks
of the losses and validation by registry spec (`build_identity_encoder`, `build_expression_analyser`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from emojidiff import face
from emojidiff.choices import DEFAULT_EXPRESSION_ENCODER, DEFAULT_IDENTITY_ENCODER, MASK_SOURCES
from emojidiff.errors import MissingWeightsError
from emojidiff.face.base import ExpressionAnalyser, IdentityEncoder
from emojidiff.models.adapter import EAdapter, EAdapterConfig
from emojidiff.models.backbone import Backbone
from emojidiff.models.expression_encoder import EXPRESSION_ENCODERS, ExpressionEncoder
from emojidiff.models.lora import LORA_DIR, has_lora, load_unet_lora, save_unet_lora
from emojidiff.models.pipeline import EmojiDiffPipeline
from emojidiff.packaged import DEFAULT_BACKBONE, resolve_backbone, resolve_model
from emojidiff.packaged import PREFIX as PACKAGED_PREFIX
from emojidiff.registry import parse_spec

log = logging.getLogger(__name__)

MODEL_FILE = "emojidiff_model.json"
ADAPTER_DIR = "adapter"
EXPRESSION_WEIGHTS = "expression_encoder.safetensors"
FORMAT = "emojidiff-model"
FORMAT_VERSION = 1
EXPRESSION_ENCODER_ALIASES = {"tiny-conv": "tiny_conv", "clip-vision": "clip"}


# ---------------------------------------------------------------------------------------------
# Specs and encoders by name
# ---------------------------------------------------------------------------------------------


def normalise_spec(spec: str | Mapping[str, Any], aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """ "name" or {"name", "init_args"} -> {"name": canonical name, "init_args": {...}}."""
    name, init_args = parse_spec(spec, "an encoder")
    name = (aliases or {}).get(name, name)
    return {"name": name, "init_args": init_args}


def build_expression_encoder(spec: str | Mapping[str, Any]) -> ExpressionEncoder:
    """An expression encoder from the `EXPRESSION_ENCODERS` registry (aliases accepted)."""
    return EXPRESSION_ENCODERS.build(normalise_spec(spec, EXPRESSION_ENCODER_ALIASES))


def _register_world_models() -> None:
    """Import the world analysers so "world-id"/"world-expr" are registered (when they exist)."""
    try:
        importlib.import_module("emojidiff.face.world_models")
    except ModuleNotFoundError as err:
        if err.name != "emojidiff.face.world_models":
            raise


def build_identity_encoder(spec: str | Mapping[str, Any]) -> IdentityEncoder:
    """An `emojidiff.face.IdentityEncoder` from its registry spec (frozen, eval mode).

    Built under a fixed torch seed, so an encoder without weights (e.g. world-id with
    `weights: null`, for plumbing tests) is the same network every time. A config builds one with
    `class_path: emojidiff.models.bundle.build_identity_encoder` and `init_args: {spec: world-id}`.
    """
    build = face.build_identity_encoder
    _register_world_models()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # an encoder built without weights is random: make it the same each time
        encoder = build(normalise_spec(spec))
    encoder.requires_grad_(False)
    return encoder.eval()


def build_expression_analyser(spec: str | Mapping[str, Any]) -> ExpressionAnalyser:
    """An `emojidiff.face.ExpressionAnalyser` from its registry spec (frozen, eval mode, built under a fixed
    seed); in a config: `class_path: emojidiff.models.bundle.build_expression_analyser`, `init_args: {spec: world-expr}`."""
    build = face.build_expression_analyser
    _register_world_models()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        analyser = build(normalise_spec(spec))
    analyser.requires_grad_(False)
    return analyser.eval()


# ---------------------------------------------------------------------------------------------
# The model description and the loaded model
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """The content of `emojidiff_model.json` (besides format/version)."""

    backbone: str
    identity_encoder: dict[str, Any]
    expression_encoder: dict[str, Any]
    expression_encoder_weights: str | None = None
    image_size: int | None = None
    default_prompt: str = ""
    mask_from: str = "none"
    unet_lora: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: Path) -> ModelSpec:
        if data.get("format") != FORMAT:
            raise ValueError(
                f"{source} is not an EmojiDiff model file (format={data.get('format')!r}, expected {FORMAT!r})"
            )
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{source} has format version {data['version']}; this emojidiff reads <= {FORMAT_VERSION}"
            )
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("backbone", "identity_encoder", "expression_encoder") if k not in data]
        if missing:
            raise ValueError(f"{source} lacks the keys {missing}")
        spec = cls(**{k: v for k, v in data.items() if k in known})
        spec.identity_encoder = normalise_spec(spec.identity_encoder)
        spec.expression_encoder = normalise_spec(spec.expression_encoder, EXPRESSION_ENCODER_ALIASES)
        if spec.mask_from not in MASK_SOURCES:
            raise ValueError(f"{source}: mask_from must be one of {MASK_SOURCES}, got {spec.mask_from!r}")
        return spec


class EmojiDiffModel:
    """A ready pipeline plus what it was built from (what a training module trains and exports).

    pipeline: backbone + attached adapter + expression encoder + identity encoder.
    spec: the model description (for a fresh model: what `save` would write); None for parts built
        as objects, which then train but cannot be written as a model folder.
    source: the model folder, "fresh:<backbone>" for `fresh_model`, or "objects".
    untrained: True for a fresh (random) adapter.

    A plain class, not a dataclass: jsonargparse reads a dataclass-typed argument as a group of
    fields, whereas this type lets a config name a subclass (`FreshModel`, `TrainedModel`) by class_path.
    """

    def __init__(
        self,
        pipeline: EmojiDiffPipeline,
        spec: ModelSpec | None = None,
        source: str = "objects",
        untrained: bool = False,
        info: dict[str, Any] | None = None,
    ):
        self.pipeline = pipeline
        self.spec = spec
        self.source = source
        self.untrained = untrained
        self.info = dict(info or {})

    def require_spec(self) -> ModelSpec:
        if self.spec is None:
            raise ValueError(
                f"the model ({self.source}) was built from objects without a ModelSpec: it names no "
                "backbone folder or encoder specs to write into a model folder"
            )
        return self.spec

    @property
    def image_size(self) -> int:
        """Output side in pixels (the spec's, else the UNet's native size)."""
        size = None if self.spec is None else self.spec.image_size
        return int(size or self.pipeline.backbone.default_image_size)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for the configs commands write next to their outputs."""
        ad = self.pipeline.adapter
        return {
            "source": self.source,
            "untrained": self.untrained,
            **asdict(self.require_spec()),
            "adapter": {
                "config": asdict(ad.config),
                "expression_layers": ad.expression_layers(),
                "identity_layers": ad.identity_layers(),
            },
            **self.info,
        }

    def save(self, folder: str | Path) -> Path:
        """Write this model as a model folder (see `save_model`)."""
        spec = self.require_spec()
        return save_model(
            folder,
            backbone_path=spec.backbone,
            adapter=self.pipeline.adapter,
            expression_encoder=self.pipeline.expression_encoder,
            expression_encoder_spec=spec.expression_encoder,
            identity_encoder_spec=spec.identity_encoder,
            image_size=spec.image_size,
            default_prompt=spec.default_prompt,
            mask_from=spec.mask_from,
            unet=self.pipeline.backbone.unet,
        )


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


def _stored_backbone_path(backbone_path: str | Path, folder: Path) -> str:
    """Packaged names and absolute paths stay; a CWD-relative path becomes relative to the model folder."""
    path = Path(backbone_path)
    if str(backbone_path).startswith(PACKAGED_PREFIX) or path.is_absolute():
        return str(path)
    return os.path.relpath(path.resolve(), folder.resolve())


def save_model(
    folder: str | Path,
    *,
    backbone_path: str | Path,
    adapter: EAdapter,
    expression_encoder: ExpressionEncoder,
    expression_encoder_spec: str | Mapping[str, Any],
    identity_encoder_spec: str | Mapping[str, Any],
    image_size: int | None = None,
    default_prompt: str = "",
    mask_from: str = "none",
    unet: torch.nn.Module | None = None,
) -> Path:
    """Write a model folder: emojidiff_model.json, adapter/, the expression encoder's weights
    when it is trainable (a frozen encoder, e.g. CLIP from a local folder, is rebuilt from its spec)
    and, when `unet` carries the EmojiDiff LoRA, that LoRA in unet_lora/ (diffusers' layout).

    `backbone_path` is recorded, not copied; see the module docstring for how it is resolved.
    The specs must rebuild the same classes: `expression_encoder_spec` is checked against
    `expression_encoder`'s registered class.
    """
    folder = Path(folder)
    expr_spec = normalise_spec(expression_encoder_spec, EXPRESSION_ENCODER_ALIASES)
    expected_cls = EXPRESSION_ENCODERS.get(expr_spec["name"])
    if isinstance(expected_cls, type) and not isinstance(expression_encoder, expected_cls):
        raise ValueError(
            f"expression_encoder_spec names {expr_spec['name']!r} ({expected_cls.__name__}) but the encoder is a "
            f"{type(expression_encoder).__name__}"
        )
    if mask_from not in MASK_SOURCES:
        raise ValueError(f"mask_from must be one of {MASK_SOURCES}, got {mask_from!r}")
    folder.mkdir(parents=True, exist_ok=True)
    adapter.save(folder / ADAPTER_DIR)
    weights = None
    if getattr(expression_encoder, "trainable", False):
        state = {k: v.detach().contiguous().cpu() for k, v in expression_encoder.state_dict().items()}
        save_file(
            state,
            str(folder / EXPRESSION_WEIGHTS),
            metadata={"format": FORMAT, "spec": json.dumps(expr_spec)},
        )
        weights = EXPRESSION_WEIGHTS
    lora = None
    if unet is not None and has_lora(unet):
        save_unet_lora(unet, folder / LORA_DIR)
        lora = LORA_DIR
    spec = ModelSpec(
        backbone=_stored_backbone_path(backbone_path, folder),
        identity_encoder=normalise_spec(identity_encoder_spec),
        expression_encoder=expr_spec,
        expression_encoder_weights=weights,
        image_size=None if image_size is None else int(image_size),
        default_prompt=default_prompt,
        mask_from=mask_from,
        unet_lora=lora,
    )
    (folder / MODEL_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return folder


def model_fingerprint(folder: str | Path) -> str:
    """16 hex digits of sha256 over a model folder's files (relative names and bytes): it changes
    whenever the folder is retrained or re-exported, so a cache keyed on it never serves a stale model."""
    folder = resolve_model(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def read_spec(folder: str | Path, key: str = "--model") -> ModelSpec:
    """Parse `folder/emojidiff_model.json` (`emojidiff:NAME`: a packaged model); MissingWeightsError
    if the folder or file is missing."""
    folder = resolve_model(folder)
    file = folder / MODEL_FILE
    if not file.is_file():
        raise MissingWeightsError(
            key,
            folder,
            [MODEL_FILE, f"{ADAPTER_DIR}/adapter.safetensors", f"{ADAPTER_DIR}/adapter_config.json"],
            hint="an EmojiDiff model folder written by emojidiff.models.bundle.save_model",
        )
    return ModelSpec.from_json(json.loads(file.read_text()), file)


def _check_dims(adapter: EAdapter, id_encoder, expr_encoder: ExpressionEncoder, where: str) -> None:
    problems = []
    if id_encoder is not None and adapter.config.id_embed_dim != id_encoder.embedding_dim:
        problems.append(
            f"adapter id_embed_dim={adapter.config.id_embed_dim}, identity encoder gives {id_encoder.embedding_dim}"
        )
    c = adapter.config
    if (
        id_encoder is not None
        and c.num_id_feature_tokens
        and (
            (c.num_id_feature_tokens, c.id_feature_dim)
            != (
                getattr(id_encoder, "num_token_features", None),
                getattr(id_encoder, "token_feature_dim", None),
            )
        )
    ):
        problems.append(
            f"adapter takes {c.num_id_feature_tokens} identity feature tokens of {c.id_feature_dim} channels, "
            f"identity encoder gives {getattr(id_encoder, 'num_token_features', 0)} of "
            f"{getattr(id_encoder, 'token_feature_dim', 0)}"
        )
    if adapter.config.expr_feature_dim != expr_encoder.feature_dim:
        problems.append(
            f"adapter expr_feature_dim={adapter.config.expr_feature_dim}, expression encoder gives {expr_encoder.feature_dim}"
        )
    if problems:
        raise ValueError(f"{where}: the encoders do not fit the adapter: " + "; ".join(problems))


def load_model(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    load_identity_encoder: bool = True,
    key: str = "--model",
) -> EmojiDiffModel:
    """Build the pipeline a model folder describes.

    The backbone weights take `dtype`; the adapter and encoders stay float32 (they are small and
    the processors cast to the UNet's dtype). Raises MissingWeightsError naming the json key and
    the expected files when the backbone, adapter or expression-encoder weights are missing.
    `folder` may name a packaged model (`emojidiff:emojidiff-world`; the model's `source` keeps the name).
    """
    source = str(folder)
    folder = resolve_model(folder)
    spec = read_spec(folder, key)
    backbone_dir = resolve_backbone(spec.backbone)
    if not backbone_dir.is_absolute():
        backbone_dir = folder / backbone_dir
    backbone = Backbone.from_folder(
        backbone_dir, dtype=dtype, device=device, key=f"{folder / MODEL_FILE}: backbone"
    )
    if spec.unet_lora is not None:
        load_unet_lora(backbone.unet, folder / spec.unet_lora, key=f"{folder / MODEL_FILE}: unet_lora")
        backbone.unet.requires_grad_(False)
    adapter = EAdapter.load(folder / ADAPTER_DIR, key=f"{folder / MODEL_FILE}: adapter ({ADAPTER_DIR}/)")
    expr_encoder = build_expression_encoder(spec.expression_encoder)
    if spec.expression_encoder_weights is not None:
        weights = folder / spec.expression_encoder_weights
        if not weights.is_file():
            raise MissingWeightsError(
                f"{folder / MODEL_FILE}: expression_encoder_weights",
                folder,
                [spec.expression_encoder_weights],
                hint="the trained expression encoder's state (written by save_model)",
            )
        expr_encoder.load_state_dict(load_file(str(weights)))
    expr_encoder.requires_grad_(False)
    id_encoder = build_identity_encoder(spec.identity_encoder) if load_identity_encoder else None
    _check_dims(adapter, id_encoder, expr_encoder, str(folder))
    pipeline = EmojiDiffPipeline(backbone, adapter, expr_encoder.eval(), id_encoder).to(device)
    return EmojiDiffModel(pipeline, spec, source, untrained=False)


def load_pipeline(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> EmojiDiffPipeline:
    """The `EmojiDiffPipeline` of a model folder (see `load_model`)."""
    return load_model(folder, device, dtype).pipeline


def fresh_model(
    backbone_path: str | Path = DEFAULT_BACKBONE,
    identity_encoder_spec: str | Mapping[str, Any] = DEFAULT_IDENTITY_ENCODER,
    expression_encoder_spec: str | Mapping[str, Any] = DEFAULT_EXPRESSION_ENCODER,
    adapter_config: EAdapterConfig | Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    default_prompt: str = "a portrait, realistic style",
    mask_from: str = "world",
    backbone_key: str = "--backbone",
) -> EmojiDiffModel:
    """A pipeline with an UNTRAINED (randomly initialised, seeded) E-Adapter for `backbone_path`.

    For running `generate` end to end before stage-1 training exists; its outputs follow the
    prompt and the seed, not the identity or the expression. `adapter_config` fields override the
    defaults; id_embed_dim and expr_feature_dim default to the encoders' dimensions. A trainable
    expression encoder (tiny_conv) is random as well. `backbone_key` names the backbone path in
    a missing-weights error (the config key the caller reads it from).
    """
    backbone = Backbone.from_folder(backbone_path, dtype=dtype, device=device, key=backbone_key)
    id_spec = normalise_spec(identity_encoder_spec)
    expr_spec = normalise_spec(expression_encoder_spec, EXPRESSION_ENCODER_ALIASES)
    id_encoder = build_identity_encoder(id_spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expr_encoder = build_expression_encoder(expr_spec)
        overrides = (
            asdict(adapter_config)
            if isinstance(adapter_config, EAdapterConfig)
            else dict(adapter_config or {})
        )
        overrides.setdefault("id_embed_dim", id_encoder.embedding_dim)
        overrides.setdefault("expr_feature_dim", expr_encoder.feature_dim)
        if overrides.get("num_id_feature_tokens"):
            if not hasattr(id_encoder, "token_features"):
                raise ValueError(
                    f"adapter num_id_feature_tokens needs an identity encoder with token_features; "
                    f"{id_spec['name']!r} has none"
                )
            overrides.setdefault("id_feature_dim", id_encoder.token_feature_dim)
        adapter = EAdapter(EAdapterConfig(**overrides), backbone.unet)
    _check_dims(adapter, id_encoder, expr_encoder, f"fresh model on {backbone_path}")
    expr_encoder.requires_grad_(False)
    pipeline = EmojiDiffPipeline(backbone, adapter, expr_encoder.eval(), id_encoder).to(device)
    spec = ModelSpec(
        backbone=str(backbone_path),
        identity_encoder=id_spec,
        expression_encoder=expr_spec,
        expression_encoder_weights=None,
        image_size=backbone.default_image_size,
        default_prompt=default_prompt,
        mask_from=mask_from,
    )
    log.warning(
        "UNTRAINED E-Adapter: random identity/expression branches (seed %d) on %s; the images follow the prompt "
        "and seed only. Train stage 1 and pass --model DIR for real results.",
        seed,
        backbone_path,
    )
    return EmojiDiffModel(
        pipeline, spec, f"fresh:{backbone_path}", untrained=True, info={"adapter_seed": seed}
    )


# ---------------------------------------------------------------------------------------------
# The parts a training config builds (class_path/init_args)
# ---------------------------------------------------------------------------------------------

#: Where the training configs build their model (`model.init_args.model`): the config key a
#: missing-weights error of `FreshModel` / `TrainedModel` names.
TRAINING_KEY = "model.init_args.model.init_args"


class FreshModel(EmojiDiffModel):
    """A fresh E-Adapter (seeded) on a frozen backbone, with its encoders by registry name: the
    starting point of stage 1 (`fresh_model`).

    Args:
        backbone: a local diffusers folder or a packaged name (`emojidiff:tiny-sd15`).
        identity_encoder: `emojidiff.face` registry spec of the identity embedding the adapter consumes.
        expression_encoder: EXPRESSION_ENCODERS spec of the template encoder.
        adapter: EAdapterConfig fields (id/expr dims default to the encoders').
        seed: seeds the adapter's (and a trainable expression encoder's) initialisation.
        default_prompt / mask_from: recorded in the exported model folder (`emojidiff generate`'s defaults).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        identity_encoder: str | dict[str, Any] = DEFAULT_IDENTITY_ENCODER,
        expression_encoder: str | dict[str, Any] = DEFAULT_EXPRESSION_ENCODER,
        adapter: dict[str, Any] | None = None,
        seed: int = 0,
        default_prompt: str = "a portrait, realistic style",
        mask_from: str = "world",
    ):
        made = fresh_model(
            backbone,
            identity_encoder,
            expression_encoder,
            adapter_config=adapter or {},
            seed=seed,
            default_prompt=default_prompt,
            mask_from=mask_from,
            backbone_key=f"{TRAINING_KEY}.backbone",
        )
        super().__init__(made.pipeline, made.spec, made.source, made.untrained, made.info)


class TrainedModel(EmojiDiffModel):
    """The model a model folder describes (`load_model`), e.g. stage 1's export, to continue training.

    Args:
        folder: a model folder or a packaged model (`emojidiff:emojidiff-world`).
    """

    def __init__(self, folder: str):
        made = load_model(folder, key=f"{TRAINING_KEY}.folder")
        super().__init__(made.pipeline, made.spec, made.source, made.untrained, made.info)
