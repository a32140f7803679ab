"""Text prompts for world portraits and the words a tiny tokenizer must know for them.

Prompts name the style ("a portrait, anime style") and, optionally, the hair, the one identity
attribute a caption would mention; identity and expression proper are the adapter's business.
"""

from __future__ import annotations

import numpy as np

from .identity import HAIR_STYLES, Identity

STYLE_WORDS: dict[str, str] = {"shaded": "realistic", "cel": "anime", "brush": "painting"}
# Names along the hair-colour ramp of `palette.HAIR`, at the same positions.
HAIR_COLOUR_WORDS: tuple[str, ...] = (
    "black",
    "brunette",
    "brown",
    "auburn",
    "ginger",
    "blond",
    "platinum",
    "grey",
)

WORLD_VOCABULARY: tuple[str, ...] = (
    "a",
    "portrait",
    "style",
    "with",
    "hair",
    *STYLE_WORDS.values(),
    *HAIR_COLOUR_WORDS,
    *HAIR_STYLES,
)


def hair_words(identity: Identity) -> str:
    """e.g. "ginger long hair": the nearest named colour on the ramp and the style."""
    colour = HAIR_COLOUR_WORDS[int(round(identity.hair_colour * (len(HAIR_COLOUR_WORDS) - 1)))]
    return f"{colour} {HAIR_STYLES[identity.hair_style]} hair"


def portrait_prompt(style: str, identity: Identity | None = None) -> str:
    """ "a portrait, anime style" or, given the identity, "a portrait, anime style, with ginger long hair"."""
    try:
        text = f"a portrait, {STYLE_WORDS[style]} style"
    except KeyError:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLE_WORDS)}") from None
    return text if identity is None else f"{text}, with {hair_words(identity)}"


def sample_prompt(
    style: str, identity: Identity, rng: np.random.Generator, hair_probability: float = 0.5
) -> str:
    """A training caption: the style always, the hair with probability `hair_probability`."""
    return portrait_prompt(style, identity if rng.random() < hair_probability else None)
