"""The embedded world's fixed face region (world portraits are centred)."""

from __future__ import annotations

import functools

import cv2
import numpy as np

from emojidiff.splits import VAL_IDENTITIES
from emojidiff.world.expression import Expression
from emojidiff.world.identity import Identity
from emojidiff.world.render import render_batch


@functools.lru_cache(maxsize=8)
def world_prior_mask(size: int, samples: int = 64) -> np.ndarray:
    """The embedded world's face region at `size`: pixels that are face in >= 5% of `samples`
    renders (varied identities, expressions and pose jitter). float32 (size, size) in {0, 1}.

    World portraits are centred, so this fixed region covers any world template's face.
    """
    ids = [Identity.sample(VAL_IDENTITIES[0] + i) for i in range(samples)]
    exprs = [Expression.sample(i) for i in range(samples)]
    out = render_batch(ids, exprs, "shaded", size=max(size, 32), seeds=list(range(samples)))
    freq = out.masks.float().mean(0).numpy()
    mask = (freq >= 0.05).astype(np.float32)
    if mask.shape[0] != size:
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
    return mask
