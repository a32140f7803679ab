"""How FSDP cuts an adapter-training module into units (`configs/cluster/fsdp.yaml`).

The module is a frozen backbone (most of the weights) with a small trainable E-Adapter whose
attention processors live inside the UNet's blocks. `UNetBlockPolicy` makes each UNet block (down,
mid, up) an FSDP unit, so the frozen UNet is gathered one block at a time rather than as one piece;
the adapter's processors travel with the block they sit in (their gradients are reduced with it)
and its projections stay in the root unit with the encoders. The config says whether the frozen
blocks are sharded like the root (`shard_backbone: true`, least memory per GPU) or replicated
(`shard_backbone: false`: `NO_SHARD`, no all-gather of frozen weights in every step; the trainable
weights of the root are still sharded).
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

#: The block classes of the SD1.5 and SDXL UNets (diffusers), each one an FSDP unit.
UNET_BLOCKS: tuple[type[nn.Module], ...] = (
    CrossAttnDownBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    CrossAttnUpBlock2D,
    UpBlock2D,
)


class UNetBlockPolicy(ModuleWrapPolicy):
    """FSDP auto-wrap policy: one unit per UNet block, sharded with the root's strategy
    (`shard_backbone=True`) or replicated (`NO_SHARD`). A `ModuleWrapPolicy`, so Lightning's
    `FSDPStrategy(auto_wrap_policy=...)` takes it from a config by class_path."""

    def __init__(self, shard_backbone: bool = True):
        super().__init__(UNET_BLOCKS)
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
