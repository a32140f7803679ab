"""EmojiDiff: expression control with identity preservation for portrait diffusion models."""

from emojidiff import _quiet

_quiet.install()
