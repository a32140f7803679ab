"""How FSDP cuts an adapter-training module into units (`configs/cluster/fsdp.yaml`).

The module is a frozen backbone and frozen encoders (most of the weights) with a small trainable
E-Adapter whose attention processors run inside the UNet's blocks. `BlockWrapPolicy` makes each
UNet block (down, mid, up) and each CLIP transformer layer (the text encoders, the CLIP image
encoder) an FSDP unit, so a frozen network is gathered one block at a time rather than as one
piece, and flattening a unit at wrap time copies one block, not the whole model. The E-Adapter (its
processors are its own submodules, not the UNet's) and the remaining small parts form the root
unit, sharded. The config says whether the frozen blocks are sharded like the root
(`shard_backbone: true`, least memory per GPU) or replicated (`shard_backbone: false`: `NO_SHARD`,
no all-gather of frozen weights in every step).
"""

from __future__ import annotations

import copy
from typing import Any

from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from torch import nn
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

#: The blocks of the frozen networks (diffusers' SD1.5 / SDXL UNet blocks, transformers' CLIP
#: transformer layers), each one an FSDP unit.
FROZEN_BLOCKS: tuple[type[nn.Module], ...] = (
    CrossAttnDownBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    CrossAttnUpBlock2D,
    UpBlock2D,
    CLIPEncoderLayer,
)


class BlockWrapPolicy(ModuleWrapPolicy):
    """FSDP auto-wrap policy: one unit per frozen block (`FROZEN_BLOCKS`), sharded with the root's
    strategy (`shard_backbone=True`) or replicated (`NO_SHARD`). A `ModuleWrapPolicy`, so Lightning's
    `FSDPStrategy(auto_wrap_policy=...)` takes it from a config by class_path."""

    def __init__(self, shard_backbone: bool = True):
        super().__init__(FROZEN_BLOCKS)
        self.shard_backbone = shard_backbone

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        units = super()._run_policy(root_module, ignored_modules, root_kwargs)
        if not self.shard_backbone:
            for module in units:
                if module is not root_module:
                    units[module] = {**copy.copy(root_kwargs), "sharding_strategy": ShardingStrategy.NO_SHARD}
        return units
