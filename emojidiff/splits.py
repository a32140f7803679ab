"""The world's splits: the one place that says which identities, expressions and scenes train and
which are held out.

Identities are integers (`Identity.sample(i)`); expressions and scenes are integer seeds
(`Expression.sample(s)`, the renderer's `seed`). Every range below is `[start, stop)`.

- train: identities below `TEST_IDENTITIES[0]`; expression/scene seeds outside the held-out
  window [`TEST_SEEDS[0]`, `VAL_SEEDS[1]`): the IDI sources and the analysers draw them from
  `TRAIN_SEEDS`, free-running streams (the backbone's) from [0, 2**62) through `to_training_seed`;
- test: `TEST_IDENTITIES` x `TEST_SEEDS`: reports, benchmarks, the evaluation protocol, demo inputs;
- val: `VAL_IDENTITIES` x `VAL_SEEDS`: thresholds, model selection, validation panels.

Nothing trains on test or val identities or seeds; `check_split` is the test every writer of
training data runs, and `to_training_seed` keeps free-running random seed draws out of the
held-out seed window.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Identities any training may use.
TRAIN_IDENTITIES: tuple[int, int] = (0, 1_000_000)
#: Identities the embedded backbone (`make base`) trains on.
BASE_TRAIN_IDENTITIES: tuple[int, int] = (0, 5000)
#: Identities the world analysers (world-id classes, world-expr) train on.
ANALYSER_TRAIN_IDENTITIES: tuple[int, int] = (0, 2000)
#: Identities the world *evaluation* analysers ("world-id-eval", "world-expr-eval") train on: apart
#: from every other training range, so the evaluation pair shares no training face with the training
#: pair, the backbone or the IDI sources.
EVAL_ANALYSER_TRAIN_IDENTITIES: tuple[int, int] = (500_000, 502_000)
#: Identities of the IDI job's world targets by default (the paper's ~10k source images).
IDI_SOURCE_IDENTITIES: tuple[int, int] = (10_000, 20_000)
#: Held-out test identities: reports, benchmarks, demo inputs. Never trained on.
TEST_IDENTITIES: tuple[int, int] = (1_000_000, 2_000_000)
#: Held-out validation identities: thresholds, model selection, validation panels.
VAL_IDENTITIES: tuple[int, int] = (2_000_000, 3_000_000)

#: Expression and scene seeds of training renders.
TRAIN_SEEDS: tuple[int, int] = (0, 1 << 31)
#: Expression and scene seeds of held-out test renders.
TEST_SEEDS: tuple[int, int] = (1 << 32, 1 << 33)
#: Expression and scene seeds of held-out validation renders.
VAL_SEEDS: tuple[int, int] = (1 << 33, 1 << 34)
#: First expression/scene seed of held-out test renders.
HELD_OUT_SEED_OFFSET: int = TEST_SEEDS[0]
_HELD_OUT_SEEDS: tuple[int, int] = (TEST_SEEDS[0], VAL_SEEDS[1])


@dataclass(frozen=True)
class Split:
    """A named split: its identity range and its expression/scene seed range."""

    name: str
    identities: tuple[int, int]
    seeds: tuple[int, int]

    def has_identity(self, identity: int) -> bool:
        return self.identities[0] <= identity < self.identities[1]

    def has_seed(self, seed: int) -> bool:
        return self.seeds[0] <= seed < self.seeds[1]


SPLITS: dict[str, Split] = {
    "train": Split("train", TRAIN_IDENTITIES, TRAIN_SEEDS),
    "val": Split("val", VAL_IDENTITIES, VAL_SEEDS),
    "test": Split("test", TEST_IDENTITIES, TEST_SEEDS),
}


def get_split(name: str) -> Split:
    """The split called `name` ("train", "val" or "test")."""
    try:
        return SPLITS[name]
    except KeyError:
        raise ValueError(f"unknown split {name!r}; splits: {', '.join(SPLITS)}") from None


def identity_range(split: tuple[int, int], count: int, offset: int = 0) -> tuple[int, int]:
    """The sub-range of `count` identities starting `offset` into `split`, checked to fit."""
    start, stop = split[0] + offset, split[0] + offset + count
    if offset < 0 or count <= 0 or stop > split[1]:
        raise ValueError(f"{count} identities from offset {offset} do not fit in the split {split}")
    return start, stop


def check_split(split: str | Split, identities: tuple[int, int]) -> tuple[int, int]:
    """`identities` unchanged if it lies inside the split's identity range, else ValueError."""
    s = get_split(split) if isinstance(split, str) else split
    lo, hi = identities
    if not (s.identities[0] <= lo < hi <= s.identities[1]):
        raise ValueError(f"identities {identities} are not inside the {s.name} split's {s.identities}")
    return lo, hi


def to_training_seed(raw: int) -> int:
    """A free-running seed draw (any non-negative int) moved out of the held-out seed window.

    Streams that draw seeds from [0, 2**62) pass them through this, so a training render can
    never reuse a test or validation expression or scene (a draw lands in the window with
    probability 2**-28; such a draw is shifted past it).
    """
    lo, hi = _HELD_OUT_SEEDS
    return raw + (hi - lo) if lo <= raw < hi else raw
