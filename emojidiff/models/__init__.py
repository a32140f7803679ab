"""Backbone loading, the E-Adapter (attention processors, projections) and the inference pipeline."""

from emojidiff.models.adapter import AdapterLoadError, EAdapter, EAdapterConfig, cross_attention_layers
from emojidiff.models.attention import EmojiDiffAttnProcessor
from emojidiff.models.backbone import Backbone
from emojidiff.models.expression_encoder import (
    EXPRESSION_ENCODERS,
    ClipVisionExpressionEncoder,
    ExpressionEncoder,
    TinyConvExpressionEncoder,
)
from emojidiff.models.pipeline import EmojiDiffOutput, EmojiDiffPipeline, make_scheduler
from emojidiff.models.projections import ExpressionProjection, IdentityProjection
from emojidiff.models.tiny import build_tiny_backbone, build_tokenizer, build_vocabulary, save_backbone

__all__ = [
    "EXPRESSION_ENCODERS",
    "AdapterLoadError",
    "Backbone",
    "ClipVisionExpressionEncoder",
    "EAdapter",
    "EAdapterConfig",
    "EmojiDiffAttnProcessor",
    "EmojiDiffOutput",
    "EmojiDiffPipeline",
    "ExpressionEncoder",
    "ExpressionProjection",
    "IdentityProjection",
    "TinyConvExpressionEncoder",
    "build_tiny_backbone",
    "build_tokenizer",
    "build_vocabulary",
    "cross_attention_layers",
    "make_scheduler",
    "save_backbone",
]
