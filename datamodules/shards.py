"""Shard lists of the triplet pipeline: which tar urls a spec names, how they are opened and
counted, and the epoch-seeded shard sources that split them over ranks and workers.

Specs: a local path, a brace pattern, a glob, a directory, a url WebDataset opens (`pipe:`,
http, ...) or an fsspec url (s3://, memory://), or a list of them (`list_shards`).
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import fsspec
import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

ShardSpec = str | Sequence[str]
_GLOB_MAGIC = frozenset("*?[")
_LOCAL_SCHEMES = frozenset({"", "file"})


# ----------------------------------------------------------------------------------------------
# Shard lists


def list_shards(spec: ShardSpec) -> list[str]:
    """Shard urls of `spec`, in order.

    `spec` is a string or a list of strings, each one of: a local path, a brace pattern
    ("data/train-r1-{000..001}-{000000..000003}.tar", expanded by `wds.shardlists.expand_urls`,
    which also splits on "::"), a glob, a directory (its "*.tar" files, sorted), a url WebDataset
    opens ("pipe:...", "http://...", ...) kept as given, or an fsspec url ("s3://...",
    "memory://...") whose globs and directories are listed through fsspec. Raises
    FileNotFoundError naming the pattern when a local or fsspec part of it matches nothing.
    """
    if not isinstance(spec, str):
        specs = list(spec)
        if not specs:
            raise ValueError("empty list of shard specs")
        return [url for item in specs for url in list_shards(item)]
    if not spec.strip():
        raise ValueError("empty shard spec")
    urls: list[str] = []
    missing: list[str] = []
    for candidate in wds.shardlists.expand_urls(spec):
        found = _resolve_candidate(candidate)
        urls.extend(found)
        if not found:
            missing.append(candidate)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise FileNotFoundError(f"shard spec {spec!r}: {shown} matched no shard")
    return urls


def _resolve_candidate(candidate: str) -> list[str]:
    """One brace-expanded candidate -> the shard urls it names ([] when it names nothing)."""
    parsed = urlparse(candidate)
    if parsed.scheme in _LOCAL_SCHEMES or len(parsed.scheme) == 1:
        path = url2pathname(parsed.path) if parsed.scheme == "file" else candidate
        if os.path.isdir(path):
            found = glob.glob(os.path.join(glob.escape(path), "*.tar"))
        elif _GLOB_MAGIC & set(path):
            found = glob.glob(path)
        else:
            found = [path] if os.path.isfile(path) else []
        return sorted(os.path.normpath(f) for f in found)
    if parsed.scheme in wds.gopen_schemes:
        return [candidate]
    return _resolve_fsspec(candidate)


def _resolve_fsspec(url: str) -> list[str]:

    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):
        found = fs.glob(path.rstrip("/") + "/*.tar")
    elif _GLOB_MAGIC & set(path):
        found = fs.glob(path)
    else:
        found = [path] if fs.exists(path) else []
    return [fs.unstrip_protocol(p) for p in sorted(found)]


def open_shard(url: str) -> Any:
    """A binary stream of the shard at `url`: `wds.gopen` for paths and the schemes it knows
    (pipe:, http(s), gs, ...), fsspec for the rest (s3://, memory://, ...)."""
    scheme = urlparse(url).scheme
    if scheme in _LOCAL_SCHEMES or len(scheme) == 1 or scheme in wds.gopen_schemes:
        return wds.gopen(url, "rb")

    return fsspec.open(url, "rb").open()


def count_samples(urls: Iterable[str], keep: Callable[[dict], bool] | None = None) -> int:
    """Number of sample keys in the shards, read from tar headers alone (local files seek past the
    data; other urls are streamed). A truncated shard counts the keys before the cut.

    keep: count only the samples whose json member (parsed; never anything else) passes it; a
        sample without a readable json object is not counted. Reads the json members' bytes.
    """
    return sum(_count_keys(url, keep) for url in urls)


def _count_keys(url: str, keep: Callable[[dict], bool] | None = None) -> int:
    keys: set[str] = set()
    stream = open_shard(url)
    try:
        seekable = urlparse(url).scheme in _LOCAL_SCHEMES
        with tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tar:
            for info in tar:
                prefix, ext = base_plus_ext(info.name)
                if not info.isreg() or prefix is None or os.path.basename(prefix).startswith("__"):
                    continue
                if keep is None:
                    keys.add(prefix)
                elif ext == "json":
                    try:
                        meta = json.loads(tar.extractfile(info).read())
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(meta, dict) and keep(meta):
                        keys.add(prefix)
    except (tarfile.TarError, OSError, EOFError) as err:
        log.warning("counting samples of %s stopped early: %s", url, err)
    finally:
        stream.close()
    return len(keys)


# ----------------------------------------------------------------------------------------------
# Pipeline stages


class SharedEpoch:
    """The current epoch in shared memory, so DataLoader workers (persistent or not) read what the
    main process set (open_clip's SharedEpoch)."""

    def __init__(self, epoch: int = 0):
        self._value = multiprocessing.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self._value.value = int(epoch)

    def get(self) -> int:
        return int(self._value.value)


class EpochShardList(wds.SimpleShardList):
    """wds.SimpleShardList whose shuffle seed is (seed, current epoch); identical on every rank, so
    a rank split of its order partitions the shards. `shuffle=False` keeps the given order."""

    def __init__(self, urls: list[str], epoch: SharedEpoch, seed: int = 0, shuffle: bool = True):
        super().__init__(urls)
        self.base_seed, self.epoch, self.shuffle = seed, epoch, shuffle

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.seed = wds.utils.make_seed(self.base_seed, self.epoch.get()) if self.shuffle else None
        yield from super().__iter__()


class EpochResampledShards(wds.ResampledShards):
    """wds.ResampledShards, deterministic in (seed, current epoch, rank, worker): each rank and worker
    draws its own endless shard sequence, so no rank or worker split is needed.

    `weights` (one per url, > 0; open_clip's upsampling factors): each draw picks url i with
    probability weights[i] / sum(weights); None draws uniformly (webdataset's own draw, unchanged).
    """

    def __init__(
        self,
        urls: list[str],
        epoch: SharedEpoch,
        seed: int,
        rank: int,
        weights: Sequence[float] | None = None,
    ):
        super().__init__(
            urls, seed=seed, worker_seed=functools.partial(_rank_worker_seed, rank), deterministic=True
        )
        self.shared_epoch = epoch
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(self.urls) or not all(w > 0 and math.isfinite(w) for w in weights):
                raise ValueError(
                    f"{len(weights)} shard weights for {len(self.urls)} shards; each must be finite and > 0"
                )
        self.weights = weights

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch = self.shared_epoch.get() - 1
        if self.weights is None:
            yield from super().__iter__()
            return
        self.epoch += 1
        self.rng = random.Random(wds.utils.make_seed(self.worker_seed(), self.epoch, self.seed))
        cumulative = list(itertools.accumulate(self.weights))
        for _ in range(self.nshards):
            yield dict(url=self.rng.choices(self.urls, cum_weights=cumulative)[0])


def source_weights(spec: ShardSpec, weights: Sequence[float]) -> tuple[list[str], list[float]]:
    """(urls, per-url weights) of a list `spec` whose i-th entry gets the share weights[i] / sum(weights)
    of the shard draws, spread evenly over that entry's shards (open_clip's per-source upsampling)."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if isinstance(spec, str) or len(entries) != len(weights):
        raise ValueError(
            f"train_shard_weights has {len(weights)} entries but train_shards has {len(entries)}; "
            "give train_shards as a list with one weight per entry"
        )
    urls: list[str] = []
    per_url: list[float] = []
    for item, w in zip(entries, weights, strict=True):
        found = list_shards(item)
        urls += found
        per_url += [float(w) / len(found)] * len(found)
    return urls, per_url


def _rank_worker_seed(rank: int) -> int:
    info = get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


def split_by_rank(src: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """wds.split_by_node with the rank given: resolved once in the main process (torch.distributed,
    else the Trainer), since DataLoader workers do not see the process group."""
    yield from itertools.islice(src, rank, None, world_size)
