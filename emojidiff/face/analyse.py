"""Identity embeddings and expression descriptors of uint8 images, aligned as each model asks.

A model with `aligner_name` "none" (the world's analysers) takes the whole image resized; any other
gets the crops of that registered face aligner, and an image without a face gets a NaN row (or
FaceNotFoundError naming it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from emojidiff.errors import FaceNotFoundError
from emojidiff.face.base import build_face_aligner
from emojidiff.images import square, to_tensor


@functools.lru_cache(maxsize=4)
def _aligner(name: str):
    return build_face_aligner(name)


def _crops(
    model, images: Sequence[np.ndarray], names: Sequence[str], size: int, on_missing: Literal["raise", "nan"]
) -> tuple[torch.Tensor, list[bool]]:
    """Model input (B, 3, S, S) [0, 1] and which images had a face (all True for aligner "none")."""
    if model.aligner_name == "none":
        resized = [np.asarray(square(Image.fromarray(im), size)) for im in images]
        return to_tensor(resized), [True] * len(images)
    aligned = _aligner(model.aligner_name).align_batch(
        list(images), names=list(names), on_missing="raise" if on_missing == "raise" else "none"
    )
    found = [a is not None for a in aligned]
    crops = [a.crop if a is not None else np.zeros((size, size, 3), np.uint8) for a in aligned]
    crops = [np.asarray(square(Image.fromarray(c), size)) for c in crops]
    return to_tensor(crops), found


@torch.no_grad()
def embed_identities(
    encoder, images: Sequence[np.ndarray], names: Sequence[str], on_missing: Literal["raise", "nan"] = "raise"
) -> torch.Tensor:
    """(B, D) L2-normalised embeddings of uint8 images, aligned as `encoder.aligner_name` asks.

    on_missing="raise": FaceNotFoundError naming the image; "nan": a NaN row for it.
    """
    device = next(encoder.parameters(), torch.empty(0)).device
    x, found = _crops(encoder, images, names, encoder.input_size, on_missing)
    emb = encoder(x.to(device)).float().cpu()
    emb[~torch.tensor(found)] = float("nan")
    return emb


@torch.no_grad()
def describe_expressions(analyser, images: Sequence[np.ndarray], names: Sequence[str]) -> torch.Tensor:
    """(B, K) expression descriptors of uint8 images; a NaN row where no face was found."""
    device = next(analyser.parameters(), torch.empty(0)).device
    size = images[0].shape[0]
    x, found = _crops(analyser, images, names, size, "nan")
    try:
        desc = analyser(x.to(device)).float().cpu()
    except FaceNotFoundError:  # an analyser that finds faces itself and raises: one image at a time
        rows = []
        for i in range(x.shape[0]):
            try:
                rows.append(analyser(x[i : i + 1].to(device)).float().cpu())
            except FaceNotFoundError:
                rows.append(torch.full((1, analyser.descriptor_dim), float("nan")))
        desc = torch.cat(rows)
    desc[~torch.tensor(found)] = float("nan")
    return desc
