"""The world's identity and seed splits: the one place that says which ids train and which are held out.

Identities are integers (`Identity.sample(i)`); each range below is `[start, stop)`. Training code
draws identities below `TEST_IDENTITIES[0]`; evaluation and measurement use the held-out ranges,
which nothing trains on. Expression and scene seeds of held-out renders start at
`HELD_OUT_SEED_OFFSET` (training draws its seeds below 2**31).
"""

from __future__ import annotations

#: Identities the embedded backbone (`make base`) trains on.
BASE_TRAIN_IDENTITIES: tuple[int, int] = (0, 5000)
#: Identities the world analysers (world-id classes, world-expr) train on.
ANALYSER_TRAIN_IDENTITIES: tuple[int, int] = (0, 2000)
#: Held-out test identities: reports, benchmarks, demo inputs. Never trained on.
TEST_IDENTITIES: tuple[int, int] = (1_000_000, 2_000_000)
#: Held-out validation identities: thresholds, model selection, validation panels.
VAL_IDENTITIES: tuple[int, int] = (2_000_000, 3_000_000)
#: First expression/scene seed of held-out renders (training seeds are drawn below 2**31).
HELD_OUT_SEED_OFFSET: int = 1 << 32


def identity_range(split: tuple[int, int], count: int, offset: int = 0) -> tuple[int, int]:
    """The sub-range of `count` identities starting `offset` into `split`, checked to fit."""
    start, stop = split[0] + offset, split[0] + offset + count
    if offset < 0 or count <= 0 or stop > split[1]:
        raise ValueError(f"{count} identities from offset {offset} do not fit in the split {split}")
    return start, stop
