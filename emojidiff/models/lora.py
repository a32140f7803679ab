"""A LoRA on the frozen UNet's attention layers, trained together with the E-Adapter.

Departs from the EmojiDiff paper (which trains the adapter alone); IP-Adapter-FaceID and PhotoMaker
add such a LoRA "to improve ID consistency". Built the way diffusers' training scripts do it:
`unet.add_adapter(peft.LoraConfig(...))` on the attention projections (to_q, to_k, to_v, to_out.0
of every self- and cross-attention layer by default), the UNet's own weights frozen, only the
LoRA's A/B matrices trainable. Saved in the layout diffusers' LoRA loader reads:

    <model folder>/unet_lora/pytorch_lora_weights.safetensors   keys "unet.<module>.lora_A.weight", ...

(with the LoraConfig in the file's metadata), so `StableDiffusionPipeline.load_lora_weights(dir)`
and `UNet2DConditionModel.load_lora_adapter(dir, prefix="unet")` both load it.

The E-Adapter's processors call the attention module's to_q/to_k/to_v/to_out, so a LoRA there
acts in the text branch and the query of the identity / expression branches alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from emojidiff.errors import MissingWeightsError

LORA_DIR = "unet_lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
ADAPTER_NAME = "emojidiff"


@dataclass
class UNetLoraConfig:
    """rank: LoRA rank r; alpha: scaling numerator (None: = rank, i.e. scale 1);
    target_modules: attention projections to adapt (peft names, matched at the end of module paths)."""

    rank: int = 8
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def to_peft(self):
        from peft import LoraConfig  # peft costs 1.5 s to import; only a LoRA run pays it

        if self.rank < 1:
            raise ValueError(f"unet_lora.rank must be >= 1, got {self.rank}")
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha or self.rank,
            init_lora_weights="gaussian",
            target_modules=list(self.target_modules),
        )


def has_lora(unet: nn.Module) -> bool:
    """Whether `unet` carries the EmojiDiff LoRA."""
    return ADAPTER_NAME in (getattr(unet, "peft_config", None) or {})


def add_unet_lora(unet: nn.Module, config: UNetLoraConfig | dict[str, Any]) -> UNetLoraConfig:
    """Add a fresh LoRA (B = 0: the UNet's output is unchanged until it trains) to `unet`."""
    config = config if isinstance(config, UNetLoraConfig) else UNetLoraConfig(**config)
    if has_lora(unet):
        raise ValueError("this UNet already carries the EmojiDiff LoRA")
    unet.add_adapter(config.to_peft(), adapter_name=ADAPTER_NAME)
    return config


def lora_config(unet: nn.Module) -> UNetLoraConfig:
    """The UNetLoraConfig of the LoRA `unet` carries."""
    peft_cfg = unet.peft_config[ADAPTER_NAME]
    targets = peft_cfg.target_modules
    return UNetLoraConfig(
        rank=int(peft_cfg.r),
        alpha=float(peft_cfg.lora_alpha),
        target_modules=sorted(targets) if isinstance(targets, (set, list)) else [targets],
    )


def lora_modules(unet: nn.Module) -> nn.ModuleDict:
    """The LoRA's A/B Linear layers of `unet`, keyed by module path ('.' -> '__'), in module order.

    The modules are the UNet's own (shared, not copies): this dict is how trainers hand exactly
    the LoRA's weights to the optimizer, the EMA and the checkpoint.
    """
    suffixes = (f".lora_A.{ADAPTER_NAME}", f".lora_B.{ADAPTER_NAME}")
    return nn.ModuleDict(
        {name.replace(".", "__"): m for name, m in unet.named_modules() if name.endswith(suffixes)}
    )


def save_unet_lora(unet: nn.Module, folder: str | Path) -> Path:
    """Write the LoRA of `unet` to `folder/pytorch_lora_weights.safetensors` in diffusers' layout."""
    # peft (1.5 s to import) and diffusers' loaders only where a LoRA is written
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    state = {
        k: v.detach().float().contiguous().cpu() for k, v in convert_state_dict_to_diffusers(state).items()
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, unet_lora_layers=state, weight_name=LORA_WEIGHTS, unet_lora_adapter_metadata=metadata
    )
    return folder


def load_unet_lora(unet: nn.Module, folder: str | Path, key: str = "unet_lora") -> None:
    """Load a LoRA written by `save_unet_lora` (or any diffusers UNet LoRA) into `unet`, with
    diffusers' own loader; MissingWeightsError naming `key` and the file when it is missing."""
    folder = Path(folder)
    if not (folder / LORA_WEIGHTS).is_file():
        raise MissingWeightsError(
            key, folder, [LORA_WEIGHTS], hint="a UNet LoRA in diffusers' layout (save_unet_lora)"
        )
    unet.load_lora_adapter(str(folder), prefix="unet", adapter_name=ADAPTER_NAME, weight_name=LORA_WEIGHTS)


def describe(unet: nn.Module) -> dict[str, Any] | None:
    """JSON-able LoRA config of `unet`, or None without one."""
    return asdict(lora_config(unet)) if has_lora(unet) else None
