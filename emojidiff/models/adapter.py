"""The E-Adapter: identity and expression branches beside a frozen UNet's text cross-attention.

Trainable: `id_proj` (IdentityProjection), `expr_proj` (ExpressionProjection) and, per
cross-attention layer carrying a branch, the new K/V Linear layers of its
`EmojiDiffAttnProcessor` (in `layers`, keyed by the sanitized processor name). The UNet stays
frozen; `attach(unet)` installs the processors, `detach(unet)` restores the originals.

After `attach`, the UNet's attention modules call the processors, but the processors stay this
adapter's submodules alone (plain attributes there, not registered children as diffusers would make
them): every weight has one name, `unet.parameters()` and `unet.state_dict()` hold no adapter weight,
and FSDP can cut the UNet into units. Build optimisers from `adapter.trainable_parameters()`.

Classifier-free guidance / condition dropout: a dropped condition is the projection of a zero
input (zero identity embedding, zero expression features), IP-Adapter's convention; there are no
separate learned null tokens. Training drops with `encode_conditions(..., drop_id=, drop_expr=)`
and the pipeline's unconditional passes use exactly the same zeros.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file, save_file
from torch import nn

from emojidiff.errors import MissingWeightsError
from emojidiff.models.attention import EmojiDiffAttnProcessor
from emojidiff.models.projections import ExpressionProjection, IdentityFeatureProjection, IdentityProjection

ADAPTER_KEY = "model.adapter.path"
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "emojidiff-e-adapter"
FORMAT_VERSION = 1


class AdapterLoadError(ValueError):
    """Saved adapter weights/config do not fit the adapter or UNet they are loaded into."""


@dataclass
class EAdapterConfig:
    """E-Adapter hyper-parameters.

    Layer selections (`id_layers`, `expr_layers`) are "all" or a list of names / fnmatch patterns
    over the UNet's `attn_processors` keys, e.g.
    "up_blocks.1.attentions.*.transformer_blocks.*.attn2.processor"; the ".processor" suffix may
    be left out. Only cross-attention layers are candidates; a pattern that matches none raises.
    """

    id_embed_dim: int = 512
    num_id_tokens: int = 4
    #: Spatial identity tokens (0: none): the identity encoder's feature map (`token_features`), L
    #: positions of `id_feature_dim` channels, projected to L more identity tokens after the N global ones.
    num_id_feature_tokens: int = 0
    id_feature_dim: int = 0
    num_expr_tokens: int = 16
    expr_feature_dim: int = 1024
    id_layers: list[str] | str = "all"
    expr_layers: list[str] | str = "all"
    id_scale: float = 1.0
    expr_scale: float = 1.0
    id_hidden_dim: int | None = None
    #: 2: Perceiver resampler layers; 0: MLP on pooled features; -1: per-token projection (see ExpressionProjection)
    expr_resampler_depth: int = 2
    expr_resampler_heads: int = 4
    #: Filled from the UNet when left None (its cross-attention layers' input channels).
    cross_attention_dim: int | None = None

    @property
    def id_token_count(self) -> int:
        """Identity tokens in the sequence: N global + L spatial."""
        return self.num_id_tokens + self.num_id_feature_tokens


# ---------------------------------------------------------------------------------------------
# Layer discovery and selection
# ---------------------------------------------------------------------------------------------


def cross_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """{processor key: Attention module} for every cross-attention layer, in module order."""
    return {
        f"{name}.processor": module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    }


def module_key(processor_name: str) -> str:
    """Processor key -> nn.ModuleDict key ('.' is not allowed there)."""
    return processor_name.replace(".", "__")


def select_layers(selection: Sequence[str] | str, names: Sequence[str], what: str) -> list[str]:
    """Names (in `names` order) matching "all" or any pattern; raises if a pattern matches none."""
    if isinstance(selection, str):
        if selection == "all":
            return list(names)
        selection = [selection]
    chosen: set[str] = set()
    for pattern in selection:
        hits = {
            n
            for n in names
            if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.removesuffix(".processor"), pattern)
        }
        if not hits:
            raise ValueError(
                f"{what} pattern {pattern!r} matches no cross-attention layer of this UNet; available:\n  "
                + "\n  ".join(names)
            )
        chosen |= hits
    return [n for n in names if n in chosen]


def _layer_spec(attn: Attention, has_id: bool, has_expr: bool) -> dict[str, Any]:
    return {
        "hidden_size": attn.to_k.out_features,
        "cross_attention_dim": attn.to_k.in_features,
        "has_id": has_id,
        "has_expr": has_expr,
        "bias": attn.to_k.bias is not None,
    }


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


class EAdapter(nn.Module):
    """Projections + per-layer decoupled K/V for the identity and expression branches.

    Build with a UNet (`EAdapter(config, unet)`: layers chosen from the UNet, K/V initialised
    from its to_k/to_v) or from saved layer specs (`EAdapter.load`).
    """

    def __init__(
        self,
        config: EAdapterConfig,
        unet: UNet2DConditionModel | None = None,
        layer_specs: dict[str, dict[str, Any]] | None = None,
    ):
        super().__init__()
        if (unet is None) == (layer_specs is None):
            raise ValueError("give exactly one of `unet` or `layer_specs`")
        attns: dict[str, Attention] = {}
        if unet is not None:
            attns = cross_attention_layers(unet)
            if not attns:
                raise ValueError("this UNet has no cross-attention layers")
            names = list(attns)
            id_names = set(select_layers(config.id_layers, names, "id_layers"))
            expr_names = set(select_layers(config.expr_layers, names, "expr_layers"))
            layer_specs = {n: _layer_spec(a, n in id_names, n in expr_names) for n, a in attns.items()}
        assert layer_specs is not None
        dims = {s["cross_attention_dim"] for s in layer_specs.values()}
        if len(dims) != 1:
            raise ValueError(f"cross-attention layers disagree on cross_attention_dim: {sorted(dims)}")
        dim = dims.pop()
        if config.cross_attention_dim not in (None, dim):
            raise ValueError(
                f"config.cross_attention_dim={config.cross_attention_dim} but the UNet's is {dim}"
            )
        self.config = replace(config, cross_attention_dim=dim)
        config = self.config
        self.layer_specs: dict[str, dict[str, Any]] = {n: dict(s) for n, s in layer_specs.items()}

        self.id_proj = IdentityProjection(
            config.id_embed_dim, dim, config.num_id_tokens, config.id_hidden_dim
        )
        if config.num_id_feature_tokens:
            if config.id_feature_dim < 1:
                raise ValueError(
                    "num_id_feature_tokens > 0 needs id_feature_dim (the identity encoder's feature channels)"
                )
            self.id_feature_proj = IdentityFeatureProjection(
                config.id_feature_dim, dim, config.num_id_feature_tokens
            )
        self.expr_proj = ExpressionProjection(
            config.expr_feature_dim,
            dim,
            config.num_expr_tokens,
            config.expr_resampler_depth,
            config.expr_resampler_heads,
        )
        self.layers = nn.ModuleDict()
        for name, spec in self.layer_specs.items():
            proc = EmojiDiffAttnProcessor(
                spec["hidden_size"],
                spec["cross_attention_dim"],
                config.id_token_count,
                config.num_expr_tokens,
                has_id=spec["has_id"],
                has_expr=spec["has_expr"],
                id_scale=config.id_scale,
                expr_scale=config.expr_scale,
                bias=spec["bias"],
            )
            if name in attns:
                proc.init_from(attns[name])
            self.layers[module_key(name)] = proc
        self._originals: dict[int, dict[str, Any]] = {}

    # -- layers --------------------------------------------------------------------------------

    def processors(self) -> dict[str, EmojiDiffAttnProcessor]:
        """{processor key: processor} for every cross-attention layer (with or without branches)."""
        return {name: self.layers[module_key(name)] for name in self.layer_specs}

    def expression_layers(self) -> list[str]:
        """Processor keys of the layers carrying the expression branch."""
        return [n for n, s in self.layer_specs.items() if s["has_expr"]]

    def identity_layers(self) -> list[str]:
        """Processor keys of the layers carrying the identity branch."""
        return [n for n, s in self.layer_specs.items() if s["has_id"]]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Projections and new K/V weights (everything in the adapter with requires_grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def check_unet(self, unet: nn.Module) -> None:
        """Raise AdapterLoadError naming every layer that does not fit `unet`."""
        attns = cross_attention_layers(unet)
        problems = [
            f"{n}: not a cross-attention layer of this UNet" for n in self.layer_specs if n not in attns
        ]
        problems += [
            f"{n}: the UNet's layer has no adapter processor" for n in attns if n not in self.layer_specs
        ]
        for name in set(attns) & set(self.layer_specs):
            want = _layer_spec(attns[name], False, False)
            have = self.layer_specs[name]
            for k in ("hidden_size", "cross_attention_dim"):
                if want[k] != have[k]:
                    problems.append(f"{name}: adapter {k}={have[k]}, UNet {k}={want[k]}")
        if problems:
            raise AdapterLoadError("adapter does not fit this UNet:\n  " + "\n  ".join(sorted(problems)))

    def is_attached(self, unet: nn.Module) -> bool:
        return id(unet) in self._originals

    def attach(self, unet: UNet2DConditionModel) -> EAdapter:
        """Install the processors into `unet` (moving the adapter to the UNet's device).

        Self-attention processors are kept; the originals are remembered for `detach`.
        """
        if id(unet) in self._originals:
            raise RuntimeError("this adapter is already attached to this UNet")
        self.check_unet(unet)
        self.to(device=unet.device)
        originals = unet.attn_processors
        procs = dict(originals)
        procs.update(self.processors())
        unet.set_attn_processor(procs)
        for attn in self._attention_modules(unet):
            # one owner per weight: the processor stays this adapter's submodule and becomes a plain
            # attribute of the attention module (diffusers registers an nn.Module processor as a child
            # there too, and a weight under two names breaks FSDP's units and state dicts)
            processor = attn._modules.pop("processor")
            object.__setattr__(attn, "processor", processor)
        self._originals[id(unet)] = originals
        return self

    def _attention_modules(self, unet: UNet2DConditionModel) -> list[nn.Module]:
        """The UNet's attention modules whose processor is one of this adapter's."""
        mine = {id(p) for p in self.layers.values()}
        return [m for m in unet.modules() if id(getattr(m, "processor", None)) in mine]

    def detach(self, unet: UNet2DConditionModel) -> None:
        """Restore the processors `unet` had before `attach`."""
        originals = self._originals.pop(id(unet), None)
        if originals is None:
            raise RuntimeError("this adapter is not attached to this UNet")
        for attn in self._attention_modules(unet):  # back to diffusers' layout, which set_processor expects
            attn._modules["processor"] = attn.__dict__.pop("processor")
        unet.set_attn_processor(originals)

    def set_scales(self, id_scale: float | None = None, expr_scale: float | None = None) -> None:
        """Set the branch weights in every layer (None keeps the current value)."""
        if id_scale is not None:
            self.config.id_scale = float(id_scale)
        if expr_scale is not None:
            self.config.expr_scale = float(expr_scale)
        for proc in self.layers.values():
            proc.id_scale = self.config.id_scale
            proc.expr_scale = self.config.expr_scale

    def gradient_checkpointing_func(self) -> Callable[..., Any]:
        """A `gradient_checkpointing_func` for `UNet2DConditionModel.enable_gradient_checkpointing`: torch's
        non-reentrant checkpoint, whose recomputation runs every processor in the state it had in the
        original forward (branch scales, recording on or off).

        ICA changes that state between its two UNet passes (`recording`, the expression-off pass) and
        back-propagates after both; diffusers' default checkpoint would recompute a block with the
        state of backward time, saving a different set of tensors (torch raises CheckpointError) or,
        worse, a different function. Records made while recomputing go to a list that is dropped.
        """
        layers = list(self.layers.values())

        def checkpointed(block: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            forward_state = [(p.recorder is not None, p.id_scale, p.expr_scale) for p in layers]
            calls = {"n": 0}

            def run(*a: Any, **kw: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == 1:  # the original forward, in the state as it is
                    return block(*a, **kw)
                now = [(p.recorder, p.id_scale, p.expr_scale) for p in layers]
                try:
                    for p, (recording, id_scale, expr_scale) in zip(layers, forward_state, strict=True):
                        p.recorder = [] if recording else None
                        p.id_scale, p.expr_scale = id_scale, expr_scale
                    return block(*a, **kw)
                finally:
                    for p, (recorder, id_scale, expr_scale) in zip(layers, now, strict=True):
                        p.recorder, p.id_scale, p.expr_scale = recorder, id_scale, expr_scale

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

        return checkpointed

    def enable_gradient_checkpointing(self, unet: UNet2DConditionModel) -> None:
        """Activation checkpointing in `unet` (this adapter attached) with `gradient_checkpointing_func`."""
        unet.enable_gradient_checkpointing(self.gradient_checkpointing_func())

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, list[dict[str, torch.Tensor]]]]:
        """Within the block, every identity layer records its image queries and identity keys.

        Yields {processor key: [{"query": (B, L, hidden), "id_keys": (B, N, hidden)}, one per UNet call]}.
        """
        records: dict[str, list[dict[str, torch.Tensor]]] = {}
        procs = {n: self.layers[module_key(n)] for n in self.identity_layers()}
        for name, proc in procs.items():
            proc.recorder = records.setdefault(name, [])
        try:
            yield records
        finally:
            for proc in procs.values():
                proc.recorder = None

    # -- conditions ----------------------------------------------------------------------------

    @staticmethod
    def _drop(x: torch.Tensor, drop: torch.Tensor | bool | None) -> torch.Tensor:
        if drop is None or drop is False:
            return x
        if drop is True:
            return torch.zeros_like(x)
        keep = (~drop.to(device=x.device, dtype=torch.bool)).to(x.dtype)
        return x * keep.view(-1, *([1] * (x.ndim - 1)))

    @property
    def uses_id_features(self) -> bool:
        """Whether the identity branch also reads the identity encoder's spatial feature map."""
        return self.config.num_id_feature_tokens > 0

    def encode_conditions(
        self,
        id_embeds: torch.Tensor | None,
        expr_features: torch.Tensor | None,
        drop_id: torch.Tensor | bool | None = None,
        drop_expr: torch.Tensor | bool | None = None,
        id_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Condition tokens [id | expr].

        Args:
            id_embeds: (B, D_id) identity embeddings, or None for the null identity.
            expr_features: (B, L, F) or (B, F) expression features, or None for the null expression.
            drop_id / drop_expr: bool or (B,) bool tensor; True replaces that sample's input by
                zeros before projection (the null condition used for CFG).
            id_features: (B, L_id, F_id) the identity encoder's spatial features of the reference
                (only for an adapter with `num_id_feature_tokens`; None: zeros, the null identity);
                dropped with `drop_id`.

        Returns:
            (B, N + L_id + M, C) tokens, C = cross_attention_dim.
        """
        ref = id_embeds if id_embeds is not None else expr_features
        if ref is None:
            raise ValueError("give id_embeds or expr_features (None means the null condition)")
        b, device = ref.shape[0], ref.device
        dtype = self.id_proj.norm.weight.dtype
        if id_embeds is None:
            id_embeds = torch.zeros(b, self.config.id_embed_dim, device=device, dtype=dtype)
        if expr_features is None:
            expr_features = torch.zeros(b, 1, self.config.expr_feature_dim, device=device, dtype=dtype)
        id_tokens = self.id_proj(self._drop(id_embeds, drop_id))
        if self.uses_id_features:
            if id_features is None:
                c = self.config
                id_features = torch.zeros(
                    b, c.num_id_feature_tokens, c.id_feature_dim, device=device, dtype=dtype
                )
            id_tokens = torch.cat([id_tokens, self.id_feature_proj(self._drop(id_features, drop_id))], dim=1)
        expr_tokens = self.expr_proj(self._drop(expr_features, drop_expr))
        return torch.cat([id_tokens, expr_tokens], dim=1)

    forward = encode_conditions

    def build_encoder_hidden_states(self, text_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """text (B or 1, T, C) + condition tokens (B, N + M, C) -> (B, T + N + M, C) [text | id | expr]."""
        if text_states.shape[-1] != tokens.shape[-1]:
            raise ValueError(
                f"text channels {text_states.shape[-1]} != condition channels {tokens.shape[-1]}"
            )
        if tokens.shape[1] != self.config.id_token_count + self.config.num_expr_tokens:
            raise ValueError(
                f"expected {self.config.id_token_count}+{self.config.num_expr_tokens} tokens, got {tokens.shape[1]}"
            )
        if text_states.shape[0] != tokens.shape[0]:
            text_states = text_states.expand(tokens.shape[0], -1, -1)
        return torch.cat([text_states, tokens.to(text_states.dtype)], dim=1)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `adapter.safetensors` (adapter weights only) and `adapter_config.json` into `path`."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(
            state, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)}
        )
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": asdict(self.config),
            "layers": self.layer_specs,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(
        cls, path: str | Path | None, unet: UNet2DConditionModel | None = None, key: str = ADAPTER_KEY
    ) -> EAdapter:
        """Read an adapter saved by `save`; with `unet`, check it fits and attach it.

        Raises:
            MissingWeightsError: folder or files missing (names `key`).
            AdapterLoadError: weights whose names or shapes do not match the config, or layers
                that do not fit `unet` (each offending key/layer is named).
        """
        folder = Path(path) if path is not None else None
        expected = [WEIGHTS_NAME, CONFIG_NAME]
        if folder is None or not all((folder / f).is_file() for f in expected):
            missing = expected if folder is None else [f for f in expected if not (folder / f).is_file()]
            raise MissingWeightsError(
                key, folder, missing, hint="an E-Adapter folder written by EAdapter.save"
            )
        meta = json.loads((folder / CONFIG_NAME).read_text())
        if meta.get("format") != FORMAT:
            raise AdapterLoadError(
                f"{folder / CONFIG_NAME} is not an E-Adapter config (format={meta.get('format')!r})"
            )
        adapter = cls(EAdapterConfig(**meta["config"]), layer_specs=meta["layers"])
        state = load_file(str(folder / WEIGHTS_NAME))
        own = adapter.state_dict()
        problems = [f"missing: {k}" for k in own if k not in state]
        problems += [f"unexpected: {k}" for k in state if k not in own]
        problems += [
            f"shape: {k} saved {tuple(state[k].shape)}, expected {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if problems:
            raise AdapterLoadError(
                f"adapter weights in {folder} do not match its config:\n  " + "\n  ".join(problems)
            )
        adapter.load_state_dict(state)
        if unet is not None:
            adapter.attach(unet)
        return adapter
