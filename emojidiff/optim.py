"""The training modules' optimizer and learning-rate schedule, as the configs name them.

A training module takes `optimizer` (an `OptimizerCallable`: parameter groups -> optimizer) and
`lr_scheduler` (an `LRSchedulerCallable`: optimizer -> scheduler, stepped every optimizer step),
which LightningCLI builds from the YAML:

    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 2.0e-3, weight_decay: 0.01}
    lr_scheduler:
      class_path: emojidiff.optim.LinearWarmup
      init_args: {warmup_steps: 100}

`adamw` and `LinearWarmup` (no warm-up) are the modules' defaults.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


def adamw(params: Iterable[Any]) -> torch.optim.Optimizer:
    """AdamW at lr 1e-4, weight decay 0.01, betas (0.9, 0.999): the training modules' default optimizer."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)


class LinearWarmup(LambdaLR):
    """Linear warm-up, then constant: at scheduler step s the learning rate is the optimizer's times
    min(1, (s + 1) / warmup_steps) (the first step already at 1 / warmup_steps), and the optimizer's
    own from then on; warmup_steps 0: constant throughout. Step it every optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, last_epoch: int = -1):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        warmup = self.warmup_steps

        def factor(step: int) -> float:
            return min(1.0, (step + 1) / warmup) if warmup else 1.0

        super().__init__(optimizer, factor, last_epoch)
