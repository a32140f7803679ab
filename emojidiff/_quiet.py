"""Silence one misleading third-party warning.

transformers warns, the first time diffusers touches ``CLIPImageProcessor``, that torchvision is
missing and advises installing it. This project must not install torchvision (its wheel is
CUDA-only and breaks transformers and diffusers imports once present), and the PIL image
processor transformers falls back to is the one it uses, so the advice is wrong here. Only that
record is dropped; every other transformers message passes.
"""

from __future__ import annotations

import logging

_LOGGER = "transformers.utils.import_utils"
_MESSAGE = "requires torchvision (not installed)"


class _DropTorchvisionAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _MESSAGE not in record.getMessage()


def install() -> None:
    """Attach the filter once (idempotent)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _DropTorchvisionAdvice) for f in logger.filters):
        logger.addFilter(_DropTorchvisionAdvice())
