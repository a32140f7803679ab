"""The embedded synthetic face world: identities, expressions and a procedural portrait renderer.

Identity and expression are separate, known parameter vectors, so every later stage can measure
identity preservation and expression transfer against ground truth.
"""

from .expression import PRESETS, Expression
from .identity import HAIR_STYLES, Identity
from .render import MAX_SIZE, MIN_SIZE, PARTS, STYLES, RenderBatch, render, render_batch

__all__ = [
    "Expression",
    "Identity",
    "PRESETS",
    "HAIR_STYLES",
    "STYLES",
    "PARTS",
    "MIN_SIZE",
    "MAX_SIZE",
    "RenderBatch",
    "render",
    "render_batch",
]
