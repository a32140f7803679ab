"""Names that configs and command lines choose from, declared once and torch-free.

The modules that implement them (`emojidiff.models.pipeline`, `emojidiff.models.bundle`,
`emojidiff.world.render`) import these, and so do the `emojidiff` commands' option dataclasses,
whose `--help` must not import torch. A `Literal` is the type an option is declared with (its
choices show in `--help` and are checked when parsing); the tuple beside it is for code that checks
or indexes a value.
"""

from __future__ import annotations

from typing import Literal, get_args

#: Inference schedulers of `emojidiff.models.pipeline.make_scheduler`.
Scheduler = Literal["ddim", "dpm++", "euler", "ddpm"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)

#: How a template without a mask file is masked (a model's `mask_from`, `generate --mask_from`).
MaskSource = Literal["none", "world", "aligner"]
MASK_SOURCES: tuple[str, ...] = get_args(MaskSource)

#: Render styles of the embedded world (`emojidiff.world.render`).
Style = Literal["shaded", "cel", "brush"]
STYLES: tuple[str, ...] = get_args(Style)

#: The encoders of a fresh model (`emojidiff.models.bundle.fresh_model`, `--backbone` runs).
DEFAULT_IDENTITY_ENCODER = "world-id"
DEFAULT_EXPRESSION_ENCODER = "tiny_conv"
