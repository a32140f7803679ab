"""The E-Adapter in diffusers' IP-Adapter layout: what a plain `StableDiffusionPipeline` loads.

An EmojiDiff model becomes two IP-Adapters beside its backbone, loaded together with
`pipe.load_ip_adapter(folder, subfolder="", weight_name=[IDENTITY_FILE, EXPRESSION_FILE],
image_encoder_folder=None)`. Each file holds

    image_proj.*                  one of diffusers' image projections (IP-Adapter-FaceID's layout)
    ip_adapter.{2i+1}.to_k_ip.weight / to_v_ip.weight
                                  the branch's K/V of the i-th cross-attention layer (diffusers
                                  numbers them as IP-Adapter did: self-attention took the even ids)

Diffusers' `IPAdapterAttnProcessor2_0` computes text attention + scale * attention over each
adapter's tokens, which is `EmojiDiffAttnProcessor`'s sum term for term. A layer that does not carry
a branch gets zero K/V for it (attention over zero values adds nothing), and `ip_adapter_scales`
gives per-block scales that are 0.0 there, so diffusers skips those layers' work.

The image projection of a branch, by what the adapter's projection is (`BranchLayout`):

- "embedding": the identity MLP (Linear(D, kD), GELU, Linear, LayerNorm) is FaceID's own; the
  embeds are the raw identity embeddings (B, 1, D), as for IP-Adapter-FaceID.
- "first_linear": an MLP whose hidden width is no whole multiple of its input (FaceID's `mult`
  cannot say it), the expression MLP on pooled features (depth 0) and the per-token expression
  projection (depth -1): FaceID's layout with the identity as its first Linear; the embeds are the
  activations after the branch's own first Linear (and the mean over feature tokens), (B, 1, H),
  or (B, M, C) with one token per "image" for the per-token projection. Exact.
- "tokens": the expression resampler (depth >= 1) has no diffusers class (its feed-forward layers
  carry biases and its heads are not 64 wide, both fixed in diffusers' IP-Adapter-Plus). The embeds
  are the branch's tokens before their LayerNorm, standardised per token, one token per "image";
  the exported projection passes them through (identity weights shifted by +K, which GELU leaves
  unchanged once every input is >= 6, then -K) into the branch's LayerNorm. Equal to EmojiDiff's
  tokens to ~1e-5 (the LayerNorm's eps acts on the standardised variance).

Not expressible, so the export refuses with a message: spatial identity tokens
(`num_id_feature_tokens`), whose tokens carry a second LayerNorm that one image projection cannot.
Diffusers' guidance is the two-term CFG: EmojiDiff's compositional guidance with separate identity
and expression weights (`id_guidance`, `expr_guidance`) has no equivalent and is left out.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from emojidiff.face.masks import template_mask
from emojidiff.images import load_image, save_image, to_tensor
from emojidiff.models.adapter import EAdapter
from emojidiff.models.bundle import EmojiDiffModel, load_model
from emojidiff.models.lora import LORA_DIR, LORA_WEIGHTS
from emojidiff.models.model_card import model_card, results_rows
from emojidiff.packaged import resolve_model
from emojidiff.splits import TEST_IDENTITIES, TEST_SEEDS
from emojidiff.world import Expression, Identity, render_batch

IDENTITY_FILE = "ip-adapter-identity.safetensors"
EXPRESSION_FILE = "ip-adapter-expression.safetensors"
BRANCHES = ("identity", "expression")

Layout = Literal["embedding", "first_linear", "tokens"]


class NotExportableError(ValueError):
    """The model holds a part that diffusers' IP-Adapter layout cannot carry; the message says which."""


@dataclass(frozen=True)
class BranchLayout:
    """How one branch is exported: its layout (module docstring) and its embeds' shape per sample,
    (images, channels) as `ip_adapter_image_embeds` takes them (B, images, channels)."""

    layout: Layout
    images: int
    channels: int


def branch_layouts(adapter: EAdapter) -> dict[str, BranchLayout]:
    """{"identity": ..., "expression": ...} for `adapter` (raises NotExportableError)."""
    config = adapter.config
    if adapter.uses_id_features:
        raise NotExportableError(
            f"the identity branch reads {config.num_id_feature_tokens} spatial feature tokens through a "
            "LayerNorm of their own: one IP-Adapter image projection carries one token LayerNorm, so the "
            "identity branch cannot be written in diffusers' layout"
        )
    first = adapter.id_proj.proj[0]
    if first.out_features % first.in_features == 0:
        identity = BranchLayout("embedding", 1, first.in_features)
    else:
        identity = BranchLayout("first_linear", 1, first.out_features)
    proj, c = adapter.expr_proj, config.cross_attention_dim
    if proj.depth == 0:
        expression = BranchLayout("first_linear", 1, c)
    elif proj.depth == -1:
        expression = BranchLayout("first_linear", config.num_expr_tokens, c)
    else:
        expression = BranchLayout("tokens", config.num_expr_tokens, c)
    return {"identity": identity, "expression": expression}


def passthrough_shift(channels: int) -> float:
    """K with x + K >= 6 for every entry x of a standardised C-vector (|x| <= sqrt(C - 1)): GELU
    returns such inputs unchanged in float32 (erf rounds to 1)."""
    return float(math.ceil(math.sqrt(channels)) + 8)


def _faceid_projection(
    first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], norm: nn.LayerNorm
) -> dict[str, Tensor]:
    """IP-Adapter-FaceID's image projection keys: Linear `first`, GELU, Linear `second`, LayerNorm."""
    return {
        "proj.0.weight": first[0],
        "proj.0.bias": first[1],
        "proj.2.weight": second[0],
        "proj.2.bias": second[1],
        "norm.weight": norm.weight,
        "norm.bias": norm.bias,
    }


def _identity_linear(channels: int, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    return torch.eye(channels), torch.full((channels,), shift)


def _linear(layer: nn.Linear) -> tuple[Tensor, Tensor]:
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
    return layer.weight, bias


def image_projection(adapter: EAdapter, branch: str) -> dict[str, Tensor]:
    """The `image_proj.*` state of `branch` ("identity" or "expression"), without the prefix."""
    layout = branch_layouts(adapter)[branch]
    if branch == "identity":
        mlp, norm = adapter.id_proj.proj, adapter.id_proj.norm
        if layout.layout == "embedding":
            return _faceid_projection(_linear(mlp[0]), _linear(mlp[2]), norm)
        return _faceid_projection(_identity_linear(layout.channels), _linear(mlp[2]), norm)
    proj = adapter.expr_proj
    if layout.layout == "first_linear":  # depth 0: proj_out = (GELU, Linear); depth -1 the same per token
        return _faceid_projection(_identity_linear(layout.channels), _linear(proj.proj_out[1]), proj.norm)
    k = passthrough_shift(layout.channels)
    return _faceid_projection(
        _identity_linear(layout.channels, k), _identity_linear(layout.channels, -k), proj.norm
    )


def attention_weights(adapter: EAdapter, branch: str) -> dict[str, Tensor]:
    """The `ip_adapter.*` state of `branch`: K/V per cross-attention layer in the UNet's order, zeros
    for a layer that does not carry the branch."""
    out: dict[str, Tensor] = {}
    for i, (name, proc) in enumerate(adapter.processors().items()):
        spec = adapter.layer_specs[name]
        if spec["bias"]:
            raise NotExportableError(
                f"{name}: its K/V layers have biases; diffusers' to_k_ip / to_v_ip have none"
            )
        carries = spec["has_id"] if branch == "identity" else spec["has_expr"]
        shape = (spec["hidden_size"], spec["cross_attention_dim"])
        if carries:
            k, v = (proc.to_k_id, proc.to_v_id) if branch == "identity" else (proc.to_k_expr, proc.to_v_expr)
            k, v = k.weight, v.weight
        else:
            k, v = torch.zeros(shape), torch.zeros(shape)
        out[f"{2 * i + 1}.to_k_ip.weight"] = k
        out[f"{2 * i + 1}.to_v_ip.weight"] = v
    return out


def ip_adapter_state(adapter: EAdapter, branch: str) -> dict[str, Tensor]:
    """One IP-Adapter file's tensors (`image_proj.*`, `ip_adapter.*`), contiguous float32 on the CPU."""
    state = {f"image_proj.{k}": v for k, v in image_projection(adapter, branch).items()}
    state |= {f"ip_adapter.{k}": v for k, v in attention_weights(adapter, branch).items()}
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.|^mid_block\.")


def _block_scales(adapter: EAdapter, branch: str, scale: float) -> float | dict[str, Any]:
    """`set_ip_adapter_scale`'s entry for one branch: `scale` where a layer carries it, else 0.0."""
    carried = {
        n: (s["has_id"] if branch == "identity" else s["has_expr"]) for n, s in adapter.layer_specs.items()
    }
    if all(carried.values()):
        return scale
    groups: dict[str, dict[int, dict[int, bool]]] = {"down": {}, "up": {}}
    mid = False
    for name, on in carried.items():
        m = _LAYER.match(name)
        if m is None:
            raise NotExportableError(
                f"{name}: not a down/mid/up block layer diffusers' block scales can name"
            )
        if m.group(1) is None:
            mid = mid or on
            continue
        side = "down" if m.group(1) == "down_blocks" else "up"
        block = groups[side].setdefault(int(m.group(2)), {})
        block[int(m.group(3))] = block.get(int(m.group(3)), False) or on
    out: dict[str, Any] = {"mid": scale if mid else 0.0}
    for side, blocks in groups.items():
        out[side] = {
            f"block_{b}": [scale if attns[a] else 0.0 for a in sorted(attns)]
            for b, attns in sorted(blocks.items())
        }
    return out


def ip_adapter_scales(
    adapter: EAdapter, id_scale: float | None = None, expr_scale: float | None = None
) -> list[float | dict[str, Any]]:
    """[identity, expression] for `pipe.set_ip_adapter_scale`: a float where the branch sits in every
    cross-attention layer, else per-block dicts ({"down": {"block_0": [s]}, "mid": 0.0, ...}) that
    are zero outside its layers. Scales default to the adapter's own."""
    c = adapter.config
    return [
        _block_scales(adapter, "identity", c.id_scale if id_scale is None else id_scale),
        _block_scales(adapter, "expression", c.expr_scale if expr_scale is None else expr_scale),
    ]


def _standardised(tokens: Tensor, eps: float) -> Tensor:
    """Per-token (x - mean) / sqrt(var + eps), biased variance, as LayerNorm normalises."""
    mean = tokens.mean(dim=-1, keepdim=True)
    var = tokens.var(dim=-1, keepdim=True, unbiased=False)
    return (tokens - mean) / torch.sqrt(var + eps)


@torch.no_grad()
def branch_embeds(adapter: EAdapter, id_embeds: Tensor, expr_features: Tensor) -> dict[str, Tensor]:
    """{"identity": (B, images, channels), "expression": ...}: what each exported image projection
    turns into the branch's tokens (`branch_layouts`). id_embeds (B, D_id); expr_features (B, L, F)
    or (B, F); a zero input is the dropped (unconditional) condition, as in `EAdapter`."""
    layouts = branch_layouts(adapter)
    dtype = adapter.id_proj.norm.weight.dtype
    id_embeds = id_embeds.to(dtype)
    if layouts["identity"].layout == "embedding":
        ident = id_embeds[:, None]
    else:
        ident = adapter.id_proj.proj[0](id_embeds)[:, None]
    proj = adapter.expr_proj
    if proj.depth == 0:
        expr = proj.inputs(expr_features)[:, None]
    elif proj.depth == -1:
        expr = proj.inputs(expr_features)
    else:
        expr = _standardised(proj.pre_norm(expr_features), proj.norm.eps)
    return {"identity": ident, "expression": expr}


def ip_adapter_image_embeds(
    adapter: EAdapter, id_embeds: Tensor, expr_features: Tensor, guidance: bool = True
) -> list[Tensor]:
    """`ip_adapter_image_embeds` for a StableDiffusionPipeline carrying the export: [identity,
    expression], each (2B, images, channels) with the dropped-condition half first under guidance
    (zero identity embedding and zero expression features, EmojiDiff's null condition), else (B, ...).

    id_embeds (B, D_id): the identity encoder's embeddings; expr_features (B, L, F): the expression
    encoder's features of the templates (`EmojiDiffPipeline.condition_inputs` computes both from images).
    """
    cond = branch_embeds(adapter, id_embeds, expr_features)
    if not guidance:
        return [cond["identity"], cond["expression"]]
    null = branch_embeds(adapter, torch.zeros_like(id_embeds), torch.zeros_like(expr_features))
    return [torch.cat([null[b], cond[b]]) for b in BRANCHES]


def export_record(adapter: EAdapter) -> dict[str, Any]:
    """What the export writes beside the files: layouts, scales and what diffusers cannot do."""
    layouts = branch_layouts(adapter)
    return {
        "weight_names": [IDENTITY_FILE, EXPRESSION_FILE],
        "layouts": {branch: asdict(layout) for branch, layout in layouts.items()},
        "ip_adapter_scales": ip_adapter_scales(adapter),
        "expression_layers": adapter.expression_layers(),
        "identity_layers": adapter.identity_layers(),
        "not_carried": not_carried(adapter),
    }


def not_carried(adapter: EAdapter) -> list[str]:
    """Sentences naming what a plain diffusers pipeline does differently from EmojiDiffPipeline."""
    notes = [
        "compositional guidance (separate identity and expression guidance weights) is EmojiDiffPipeline's "
        "own: diffusers applies one CFG weight to text, identity and expression together",
        "the identity and expression embeddings come from EmojiDiff's encoders: compute them with "
        "emojidiff.models.diffusers_export.image_embeds (the card shows how)",
    ]
    if branch_layouts(adapter)["expression"].layout == "tokens":
        notes.append(
            "the expression resampler has no diffusers image projection: the embeds are its tokens, "
            "standardised, and the exported projection passes them through to the LayerNorm (~1e-5 apart)"
        )
    return notes


# ---------------------------------------------------------------------------------------------
# The export folder and the embeds helper
# ---------------------------------------------------------------------------------------------

MODEL_SUBDIR = "emojidiff"
RECORD_FILE = "emojidiff_export.json"
EXAMPLES = ("examples/identity.png", "examples/expression.png")


def _world_examples(size: int) -> list[np.ndarray]:
    """An identity reference and an expression template of held-out world people (the card's inputs)."""
    people = [Identity.sample(TEST_IDENTITIES[0] + 7), Identity.sample(TEST_IDENTITIES[0] + 8)]
    faces = [Expression.sample(TEST_SEEDS[0] + 1), Expression.sample(TEST_SEEDS[0] + 2)]
    out = render_batch(people, faces, "shaded", size=size, seeds=[TEST_SEEDS[0] + 3, TEST_SEEDS[0] + 4])
    return [im.numpy() for im in out.images]


def export_diffusers(
    model: EmojiDiffModel,
    out: str | Path,
    name: str | None = None,
    examples: Sequence[str | Path] | None = None,
    results: Path | None = None,
    method: str | None = None,
) -> dict[str, Any]:
    """Write `model` as diffusers IP-Adapters into `out` (module docstring): the two adapter files,
    the UNet LoRA when the model carries one (`pipe.load_lora_weights`), `emojidiff_export.json`,
    the EmojiDiff model folder (`emojidiff/`, the embeds helper's encoders), two example inputs and
    the model card `README.md`. examples: (identity image, expression image), default two held-out
    world portraits; results / method: an evaluation's table.csv and the method whose rows the
    card shows. Returns the export record (with each file's parameters and bytes).
    Raises NotExportableError before writing anything when the layout cannot carry the model."""
    adapter, spec = model.pipeline.adapter, model.require_spec()
    record = export_record(adapter)  # raises NotExportableError first
    if results is not None:
        results_rows(results, method or "")  # a wrong table or method fails before any writing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, int]] = {}
    for branch, file in zip(BRANCHES, record["weight_names"], strict=True):
        state = ip_adapter_state(adapter, branch)
        save_file(state, str(out / file), metadata={"format": "pt", "emojidiff_branch": branch})
        files[file] = {
            "parameters": sum(t.numel() for t in state.values()),
            "bytes": (out / file).stat().st_size,
        }
    model.save(out / MODEL_SUBDIR)
    if model.source not in ("objects",) and not str(model.source).startswith("fresh:"):
        for rec in ("train_record.json", "package_record.json"):  # how the model was made, for the card
            if (resolve_model(model.source) / rec).is_file():
                shutil.copyfile(resolve_model(model.source) / rec, out / MODEL_SUBDIR / rec)
    if spec.unet_lora is not None:
        lora = out / LORA_WEIGHTS
        shutil.copyfile(out / MODEL_SUBDIR / LORA_DIR / LORA_WEIGHTS, lora)
        weights = load_file(str(lora))
        files[LORA_WEIGHTS] = {
            "parameters": sum(t.numel() for t in weights.values()),
            "bytes": lora.stat().st_size,
        }
    inputs = (
        [load_image(p, role) for p, role in zip(examples, ("identity", "expression"), strict=True)]
        if examples
        else _world_examples(model.image_size)
    )
    for rel, image in zip(EXAMPLES, inputs, strict=True):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        save_image(image, out / rel)
    record |= {"source": model.source, "backbone": spec.backbone, "files": files, "examples": list(EXAMPLES)}
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    card = model_card(
        out,
        name or Path(str(model.source)).name,
        spec.backbone,
        record,
        files,
        spec.default_prompt,
        EXAMPLES,
        results=results,
        method=method,
    )
    (out / "README.md").write_text(card)
    return record


@functools.lru_cache(maxsize=2)
def _export_model(folder: str) -> EmojiDiffModel:
    return load_model(Path(folder) / MODEL_SUBDIR, key=f"{folder}: {MODEL_SUBDIR}/")


def image_embeds(
    source: str | Path | EmojiDiffModel,
    id_image: str | Path | np.ndarray,
    expr_image: str | Path | np.ndarray,
    expr_mask: np.ndarray | None = None,
    guidance: bool = True,
) -> list[Tensor]:
    """`ip_adapter_image_embeds` of one identity reference and one expression template for a
    diffusers pipeline carrying an export: [identity, expression], the unconditional half first
    under guidance. source: the export folder (its `emojidiff/` model is loaded once) or a model.
    Images: paths (centre-cropped and resized, as `emojidiff generate` reads them) or uint8 arrays at
    the model's size; the template is masked as the model's mask_from says unless `expr_mask`
    (float (H, W) in [0, 1]) is given."""
    model = source if isinstance(source, EmojiDiffModel) else _export_model(str(source))
    size = model.image_size
    ref = load_image(id_image, "identity reference", size) if isinstance(id_image, (str, Path)) else id_image
    if isinstance(expr_image, (str, Path)):
        full, name = load_image(expr_image, "expression template"), str(expr_image)
        tmpl = load_image(expr_image, "expression template", size)
    else:
        full, name, tmpl = expr_image, "expression template", expr_image
    mode = model.spec.mask_from if model.spec is not None else "none"
    if expr_mask is None and mode != "none":
        expr_mask = template_mask(full, mode, size, name)
    mask = None if expr_mask is None else torch.from_numpy(np.asarray(expr_mask, np.float32))[None, None]
    pipe = model.pipeline
    id_embeds, _, features = pipe.condition_inputs(
        to_tensor(tmpl[None]), id_image=to_tensor(ref[None]), expr_mask=mask
    )
    return ip_adapter_image_embeds(pipe.adapter, id_embeds, features, guidance=guidance)
