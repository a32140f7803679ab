"""IDI triplet shards streamed into training: a WebDataset pipeline in the shape of open_clip's `get_wds_dataset`.

Train stages, in order:

    shard list       every shard once per epoch, shuffled by (seed, epoch) alike on every rank;
                     or, with `resampled`, shards drawn with replacement, seeded by (seed, epoch, rank, worker)
    split_by_rank    rank r of W keeps shards r, r+W, ...  (not in resampled mode)
    split_by_worker  wds.split_by_worker over the rank's shards (not in resampled mode)
    tar samples      members grouped by key; unsafe extensions dropped unread; tar errors go to a counting handler
    shuffle          sample buffer of `shuffle_buffer`, seeded by (seed, epoch, rank, worker)
    prepare          decode (emojidiff.triplet.decode_member only), resize, CFG dropout; bad samples skipped, counted
    batched          `batch_size`, full batches only, collated by `collate_triplets`
    with_epoch       a fixed number of batches per worker, so DDP ranks never wait on each other

Validation and test stages: the shard list in order, split by rank and worker, no shuffle, no
dropout, every sample of the rank's shards once, the last batch partial.

A batch (see `collate_triplets`):

    tgt, ref, tmpl                  float32 (B, 3, S, S) in [-1, 1] (the VAE's input range), RGB
    tmpl_mask                       float32 (B, 1, S, S) in [0, 1]; ones where a sample has no tmpl_mask.png
    id_embed                        float32 (B, D): identity embedding of the reference
    drop_text, drop_id, drop_expr   bool (B,): drop that condition for classifier-free guidance
    prompt, key                     list[str] (prompt: json["prompt"], "" when absent)
    meta                            list[dict]: the decoded json
    stats                           dict[str, int]: the producing worker's cumulative READ_COUNTERS plus
                                    "rank", "worker" and "stream" (an id of that worker's counter set)

Nothing in a shard is unpickled: members other than png/jpg/json/npy/txt are dropped before their
bytes are read, and the members a triplet needs are decoded by `emojidiff.triplet.decode_member`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from datamodules.shards import (
    EpochResampledShards,
    EpochShardList,
    ShardSpec,
    SharedEpoch,
    count_samples,
    list_shards,
    open_shard,
    source_weights,
    split_by_rank,
)
from emojidiff.images import to_signed, to_tensor
from emojidiff.triplet import (
    DECODABLE_EXTENSIONS,
    IDENTITY,
    META,
    REFERENCE,
    REQUIRED_MEMBERS,
    TARGET,
    TEMPLATE,
    TEMPLATE_MASK,
    CorruptMemberError,
    UnsafeMemberError,
    decode_member,
)

log = logging.getLogger(__name__)

Stage = Literal["train", "val", "test"]

#: Per-worker counters, cumulative over the worker's life: samples yielded, samples skipped (a
#: member missing or corrupt), samples left out by `max_identity_similarity` (not failures),
#: members that did not decode, members dropped unread for their extension, and shard visits cut
#: short by a tar-level error (truncated tar, unreadable url).
READ_COUNTERS: tuple[str, ...] = (
    "samples",
    "skipped_samples",
    "filtered_samples",
    "corrupt_members",
    "unsafe_members",
    "shard_errors",
)
_IMAGES = (TARGET, REFERENCE, TEMPLATE)


def template_identity_similarity(meta: Mapping[str, Any]) -> float:
    """The IDI job's identity similarity of a triplet's template to its target (json
    scores.identity_similarity); KeyError / TypeError / ValueError when the json lacks it."""
    return float(meta["scores"]["identity_similarity"])


def passes_identity_cut(meta: Mapping[str, Any], max_identity_similarity: float) -> bool:
    """Whether a triplet's json passes `max_identity_similarity` (False when it lacks the score)."""
    try:
        return template_identity_similarity(meta) <= max_identity_similarity
    except (KeyError, TypeError, ValueError):
        return False


class CorruptShardError(RuntimeError):
    """More than `max_corrupt_fraction` of the reads failed; the message names the shard of the last failure."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop (H, W[, C]) to a square, then resize to (size, size[, C]): cv2 INTER_AREA when
    shrinking, INTER_CUBIC when enlarging. dtype is kept."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(square), (size, size), interpolation=interpolation)


def image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) RGB or (H, W) grey -> float32 (3, size, size) in [-1, 1]."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 3) or (H, W) image, got shape {image.shape}")
    return to_signed(to_tensor([square_resize(image, size)])[0])


def mask_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W[, C]) mask, 0 outside and 255 inside the face -> float32 (1, size, size) in [0, 1]."""
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.ndim != 2 or min(mask.shape) < 1:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    return torch.from_numpy(square_resize(np.ascontiguousarray(mask), size)).float().div(255.0).unsqueeze(0)


def cfg_dropout(key: str, seed: int, epoch: int, rates: Mapping[str, float]) -> dict[str, bool]:
    """Classifier-free-guidance dropout of one sample, deterministic in (seed, epoch, key).

    `rates` holds "text", "id", "expr" (each condition dropped independently) and "all" (all
    three dropped together), so P(drop text) = 1 - (1 - rates["text"]) * (1 - rates["all"]).
    Returns {"drop_text", "drop_id", "drop_expr"}.
    """
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, zlib.crc32(key.encode())])
    u_all, u_text, u_id, u_expr = rng.random(4)
    drop_all = bool(u_all < rates["all"])
    return {
        "drop_text": drop_all or bool(u_text < rates["text"]),
        "drop_id": drop_all or bool(u_id < rates["id"]),
        "drop_expr": drop_all or bool(u_expr < rates["expr"]),
    }


_TENSORS = ("tgt", "ref", "tmpl", "tmpl_mask", "id_embed")
_FLAGS = ("drop_text", "drop_id", "drop_expr")
_LISTS = ("prompt", "key", "meta")


def collate_triplets(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Prepared samples -> a batch: tensors stacked to (B, ...), drop flags to bool (B,), the rest as lists.

    Raises ValueError naming the keys when identity embeddings differ in length.
    """
    dims = {s["key"]: int(s["id_embed"].shape[0]) for s in samples}
    if len(set(dims.values())) > 1:
        raise ValueError(
            f"identity embeddings of one batch differ in length (set id_dim to skip the odd ones): {dims}"
        )
    batch: dict[str, Any] = {name: torch.stack([s[name] for s in samples]) for name in _TENSORS}
    batch.update({name: torch.tensor([s[name] for s in samples], dtype=torch.bool) for name in _FLAGS})
    batch.update({name: [s[name] for s in samples] for name in _LISTS})
    return batch


class TripletReader:
    """The per-worker half of the pipeline: tar reading with a counting error handler, sample shuffle,
    decoding, dropout, collation, and the counters (READ_COUNTERS) each worker keeps for itself.

    Each DataLoader worker holds its own copy; `stats()` is attached to every batch it makes.
    """

    def __init__(
        self,
        epoch: SharedEpoch,
        image_size: int,
        seed: int = 0,
        rank: int = 0,
        shuffle_buffer: int = 0,
        dropout: Mapping[str, float] | None = None,
        id_dim: int | None = None,
        max_corrupt_fraction: float | None = 0.01,
        min_samples_for_fraction: int = 100,
        max_identity_similarity: float | None = None,
    ):
        self.epoch, self.image_size, self.seed, self.rank = epoch, image_size, seed, rank
        self.max_identity_similarity = max_identity_similarity
        self.shuffle_buffer = shuffle_buffer
        self.dropout = dict(dropout) if dropout else None
        self.id_dim = id_dim
        self.max_corrupt_fraction, self.min_samples_for_fraction = (
            max_corrupt_fraction,
            min_samples_for_fraction,
        )
        self.counts = dict.fromkeys(READ_COUNTERS, 0)
        self._stream_id: int | None = None
        self._url: str | None = None
        self._visit = self._failed_visit = 0
        self._last_failure = ("", "")

    # -- counters -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """This worker's cumulative READ_COUNTERS plus "rank", "worker" and "stream" (a random id drawn
        in the worker, so a fresh worker of a non-persistent loader is told apart from the last one)."""
        if self._stream_id is None:
            self._stream_id = int.from_bytes(os.urandom(7), "little")
        return {**self.counts, "rank": self.rank, "worker": _worker_id(), "stream": self._stream_id}

    def _failed(self, url: str, reason: str) -> None:
        self._last_failure = (url, reason)
        self._check_fraction()

    def _check_fraction(self) -> None:
        c = self.counts
        failures = c["skipped_samples"] + c["shard_errors"]
        reads = c["samples"] + failures
        limit = self.max_corrupt_fraction
        if limit is None or reads < self.min_samples_for_fraction or failures <= limit * reads:
            return
        url, reason = self._last_failure
        raise CorruptShardError(
            f"{failures} of {reads} triplet reads failed ({failures / reads:.1%} > max_corrupt_fraction "
            f"{limit:.1%}): {c['skipped_samples']} samples skipped, {c['shard_errors']} shard errors; "
            f"last failure in shard {url}: {reason}",
            url=url,
        )

    # -- tar level ------------------------------------------------------------------------------

    def track_shards(self, src: Iterable[dict[str, str]]) -> Iterator[dict[str, str]]:
        """Pass shard dicts through, remembering which shard the tar stages are reading."""
        for shard in src:
            self._url, self._visit = shard["url"], self._visit + 1
            yield shard

    def open_shards(self, src: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """wds.tariterators.url_opener through `open_shard` (adds fsspec urls); errors go to the handler."""
        for shard in src:
            try:
                yield {**shard, "stream": open_shard(shard["url"])}
            except Exception as exn:
                exn.args = exn.args + (shard["url"],)
                self.on_tar_error(exn)

    def on_tar_error(self, exn: Exception) -> bool:
        """The webdataset `handler`: count one shard error per shard visit, log it, go on to the next
        shard (or raise CorruptShardError past max_corrupt_fraction)."""
        url = self._url or next((a for a in reversed(exn.args) if isinstance(a, str)), "?")
        reason = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        if self._failed_visit != self._visit:
            self._failed_visit = self._visit
            self.counts["shard_errors"] += 1
            log.warning("shard %s: %s; going on with the next shard", url, reason)
        self._failed(url, reason)
        return True

    def keep_member(self, name: str) -> bool:
        """`select_files` of tar_file_expander: members with an extension decode_member refuses are
        dropped before their bytes are read, and counted."""
        base = os.path.basename(name)
        if "." in base and base.rsplit(".", 1)[1].lower() in DECODABLE_EXTENSIONS:
            return True
        self.counts["unsafe_members"] += 1
        return False

    def tar_samples(self, src: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """Shard dicts -> raw samples {"__key__", "__url__", member suffix: bytes} (wds.tarfile_to_samples
        with our opener, member filter and handler)."""
        streams = self.open_shards(self.track_shards(src))
        files = tar_file_expander(streams, handler=self.on_tar_error, select_files=self.keep_member)
        return group_by_keys(files, handler=self.on_tar_error)

    # -- samples --------------------------------------------------------------------------------

    def shuffle(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """wds.shuffle with a buffer of `shuffle_buffer`, seeded by (seed, epoch, rank, worker)."""
        if self.shuffle_buffer <= 1:
            return iter(src)
        seed = wds.utils.make_seed(self.seed, self.epoch.get(), self.rank, _worker_id())
        return wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=random.Random(seed))(iter(src))

    def prepare(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Raw samples -> prepared samples (see `prepare_sample`); bad ones are skipped and counted."""
        epoch = self.epoch.get()
        for sample in src:
            prepared = self.prepare_sample(sample, epoch)
            if prepared is not None:
                self.counts["samples"] += 1
                self._check_fraction()
                yield prepared

    def prepare_sample(self, sample: Mapping[str, Any], epoch: int) -> dict[str, Any] | None:
        """One raw sample -> {"tgt", "ref", "tmpl": (3, S, S) in [-1, 1], "tmpl_mask": (1, S, S) in [0, 1],
        "id_embed": (D,) float32, "prompt", "key", "meta", drop flags}, or None when a required member
        is missing or any member is corrupt (counted)."""
        key, url = sample["__key__"], sample.get("__url__", "?")
        missing = [name for name in REQUIRED_MEMBERS if name not in sample]
        if missing:
            return self._skip(url, f"sample {key!r} lacks {', '.join(missing)}")
        names = (*REQUIRED_MEMBERS, TEMPLATE_MASK) if TEMPLATE_MASK in sample else REQUIRED_MEMBERS
        decoded, errors = {}, []
        if self.max_identity_similarity is not None:
            try:
                decoded[META] = self._member(META, sample[META])
                similarity = template_identity_similarity(decoded[META])
            except (CorruptMemberError, UnsafeMemberError, ValueError, KeyError, TypeError) as err:
                self.counts["corrupt_members"] += 1
                return self._skip(
                    url, f"{key}.{META}: no scores.identity_similarity for max_identity_similarity ({err!r})"
                )
            if similarity > self.max_identity_similarity:
                self.counts["filtered_samples"] += 1
                return None
        for name in (n for n in names if n not in decoded):
            try:
                decoded[name] = self._member(name, sample[name])
            except (CorruptMemberError, UnsafeMemberError, ValueError, cv2.error) as err:
                errors.append(f"{key}.{name}: {err}")
        if errors:
            self.counts["corrupt_members"] += len(errors)
            return self._skip(url, "; ".join(errors))
        meta = decoded[META]
        drops = (
            cfg_dropout(key, self.seed, epoch, self.dropout) if self.dropout else dict.fromkeys(_FLAGS, False)
        )
        size = self.image_size
        return {
            "tgt": decoded[TARGET],
            "ref": decoded[REFERENCE],
            "tmpl": decoded[TEMPLATE],
            "tmpl_mask": decoded.get(TEMPLATE_MASK, torch.ones(1, size, size)),
            "id_embed": decoded[IDENTITY],
            "prompt": meta.get("prompt", ""),
            "key": key,
            "meta": meta,
            **drops,
        }

    def _skip(self, url: str, reason: str) -> None:
        """Count a skipped sample and return None (the `prepare_sample` result)."""
        self.counts["skipped_samples"] += 1
        self._failed(url, reason)
        return None

    def _member(self, name: str, data: bytes) -> Any:
        """Decode one member through decode_member and bring it to its batch form."""
        value = decode_member(name, data)
        if name in _IMAGES:
            return image_tensor(value, self.image_size)
        if name == TEMPLATE_MASK:
            return mask_tensor(value, self.image_size)
        if name == META:
            if not isinstance(value, dict) or not isinstance(value.get("prompt", ""), str):
                raise CorruptMemberError(f"member {name!r} must be a json object with a string prompt")
            return value
        array = np.asarray(value)
        if array.dtype.kind not in "fiu" or array.size == 0 or not np.all(np.isfinite(array)):
            raise CorruptMemberError(
                f"member {name!r} must be a finite numeric array, got {array.dtype} {array.shape}"
            )
        if self.id_dim is not None and array.size != self.id_dim:
            raise CorruptMemberError(f"member {name!r} holds {array.size} values, id_dim is {self.id_dim}")
        return torch.from_numpy(array.astype(np.float32).reshape(-1))

    def collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """`collate_triplets` plus this worker's `stats()` under "stats"."""
        return {**collate_triplets(samples), "stats": self.stats()}


# ----------------------------------------------------------------------------------------------
# Stats in the main process


class TripletStats:
    """Counters seen in batches, summed over workers: the latest cumulative counts of each worker
    (by its "stream" id), per stage."""

    def __init__(self) -> None:
        self._latest: dict[tuple[str, int], dict[str, int]] = {}

    def update(self, stage: str, stats: Mapping[str, int]) -> None:
        self._latest[(stage, int(stats["stream"]))] = {name: int(stats[name]) for name in READ_COUNTERS}

    def totals(self, stage: str | None = None) -> dict[str, int]:
        """READ_COUNTERS summed over the workers of `stage` (all stages when None)."""
        total = dict.fromkeys(READ_COUNTERS, 0)
        for (seen_stage, _), counts in self._latest.items():
            if stage is None or seen_stage == stage:
                for name in READ_COUNTERS:
                    total[name] += counts[name]
        return total


class TripletLoader(wds.WebLoader):
    """wds.WebLoader(dataset, batch_size=None) that sets the shared epoch before each pass and records
    each batch's "stats" into a TripletStats. `len()` is the batches per pass where that is fixed (train)."""

    def __init__(
        self,
        dataset: wds.DataPipeline,
        *,
        stage: str,
        epoch: SharedEpoch,
        stats: TripletStats,
        epoch_of_pass: Callable[[int], int] | None = None,
        num_batches: int | None = None,
        num_workers: int = 0,
        persistent_workers: bool = True,
        pin_memory: bool = False,
    ):
        super().__init__(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            persistent_workers=persistent_workers and num_workers > 0,
            pin_memory=pin_memory,
        )
        self.stage, self.epoch, self.stats = stage, epoch, stats
        self.epoch_of_pass = epoch_of_pass
        self.num_batches = num_batches
        self.passes = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch.set(self.epoch_of_pass(self.passes) if self.epoch_of_pass else self.passes)
        self.passes += 1
        for batch in super().__iter__():
            self.stats.update(self.stage, batch["stats"])
            yield batch

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"the {self.stage} loader streams shards and has no fixed length")
        return self.num_batches


# ----------------------------------------------------------------------------------------------
# DataModule and callback


class TripletDataModule(L.LightningDataModule):
    """Streams IDI triplet shards (emojidiff.triplet) for training, validation and testing.

    Batches are dicts (see the module docstring): tgt/ref/tmpl float32 (B, 3, S, S) in [-1, 1],
    tmpl_mask (B, 1, S, S) in [0, 1], id_embed (B, D), drop_text/drop_id/drop_expr bool (B,),
    prompt/key/meta lists, stats. Rank and world size come from torch.distributed when it is
    initialised, else from the attached Trainer, else (0, 1); `make_loader` also takes them.

    Args:
        train_shards: shard spec of the training set (see `list_shards`): path, brace pattern,
            glob, directory, url or a list of them.
        val_shards: shard spec of the validation set; None for no validation loader.
        test_shards: shard spec of the test set; None for no test loader.
        batch_size: samples per batch on each rank.
        num_workers: DataLoader workers per rank (0: read in the main process).
        image_size: side S of the square tensors, the backbone's pixel resolution.
        resampled: draw training shards with replacement (open_clip's --dataset-resampled);
            needs `samples_per_epoch`.
        train_shard_weights: with `resampled` and a list `train_shards`, one weight per entry: the
            entry's share of the shard draws (spread evenly over its shards; open_clip's upsampling
            factors), e.g. [1, 1] draws a small new round as often as a large old one. None: every
            shard equally often.
        samples_per_epoch: training samples per epoch over all ranks. Each worker yields
            ceil(samples_per_epoch / (batch_size * world_size * max(1, num_workers))) batches when
            resampled, floor(...) otherwise. None (not resampled only): count the sample keys of
            the training shards once from their tar headers; set it for large remote datasets.
        shuffle_buffer: samples in each worker's shuffle buffer (training; 0 or 1: no sample shuffle).
        seed: seeds the shard order, the sample shuffle and the dropout; same seed, same batches.
        drop_text: rate at which the text condition alone is dropped (training).
        drop_id: rate at which the identity condition alone is dropped (training).
        drop_expr: rate at which the expression condition alone is dropped (training).
        drop_all: rate at which all three are dropped together (training); the rates combine
            independently, see `cfg_dropout`.
        id_dim: length of the identity embedding; samples with another length are skipped as
            corrupt. None: take what the shards hold (a batch mixing lengths is an error).
        max_corrupt_fraction: fail (CorruptShardError, naming the shard) once more than this
            fraction of a worker's reads failed (skipped samples plus shard errors over samples
            read plus failures); None never fails.
        min_samples_for_fraction: reads a worker makes before max_corrupt_fraction applies.
        max_identity_similarity: training triplets whose template is more like the target person
            than this (the IDI job's json `scores.identity_similarity`, its identity encoder's cosine
            of template and target) are left out and counted as `filtered_samples`; None keeps all.
            A stricter cut than the IDI filter's same-person threshold: world-swap templates keep
            the target's face outline and part of its inner face, so most that pass are still the
            target person by ground truth (docs/idi/report-train-r1.md, identity precision 0.30).
            A sample without the score is skipped as corrupt. Without `samples_per_epoch` the epoch
            counts the triplets that pass (reading every json member once).
        persistent_workers: keep DataLoader workers alive between epochs.
        pin_memory: DataLoader pin_memory.
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        test_shards: ShardSpec | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        image_size: int = 64,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        train_shard_weights: list[float] | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        drop_text: float = 0.05,
        drop_id: float = 0.05,
        drop_expr: float = 0.05,
        drop_all: float = 0.05,
        id_dim: int | None = None,
        max_corrupt_fraction: float | None = 0.01,
        min_samples_for_fraction: int = 100,
        max_identity_similarity: float | None = None,
        persistent_workers: bool = True,
        pin_memory: bool = False,
    ):
        super().__init__()
        if resampled and samples_per_epoch is None:
            raise ValueError(
                "samples_per_epoch is required when resampled=True (the epoch length of a resampled stream)"
            )
        if train_shard_weights is not None and not resampled:
            raise ValueError(
                "train_shard_weights needs resampled=True (weights set how often shards are drawn)"
            )
        for name, rate in (
            ("drop_text", drop_text),
            ("drop_id", drop_id),
            ("drop_expr", drop_expr),
            ("drop_all", drop_all),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {rate}")
        if batch_size < 1 or image_size < 1 or num_workers < 0:
            raise ValueError(
                f"batch_size and image_size must be >= 1 and num_workers >= 0, got {batch_size}, {image_size}, {num_workers}"
            )
        self.save_hyperparameters()
        self._stats = TripletStats()
        self._shards: dict[str, list[str]] = {}
        self._train_weights: list[float] | None = None
        self._train_samples: int | None = samples_per_epoch

    def stats(self, stage: str | None = None) -> dict[str, int]:
        """READ_COUNTERS summed over this rank's workers (of `stage`, or all), from the batches seen so far."""
        return self._stats.totals(stage)

    def shards(self, stage: Stage) -> list[str]:
        """The shard urls of `stage`, listed once."""
        if stage not in self._shards:
            spec = self.hparams[f"{stage}_shards"]
            if spec is None:
                raise ValueError(f"no {stage}_shards configured")
            if stage == "train" and self.hparams.train_shard_weights is not None:
                self._shards[stage], self._train_weights = source_weights(
                    spec, self.hparams.train_shard_weights
                )
            else:
                self._shards[stage] = list_shards(spec)
        return self._shards[stage]

    def distributed(self) -> tuple[int, int]:
        """(rank, world_size): torch.distributed when initialised, else the Trainer's, else (0, 1)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def batches_per_worker(self, world_size: int) -> int:
        """Training batches each worker yields per epoch (open_clip's recipe): ceil when resampled, floor otherwise."""
        hp = self.hparams
        if self._train_samples is None:
            cut = hp.max_identity_similarity
            keep = (
                None if cut is None else functools.partial(passes_identity_cut, max_identity_similarity=cut)
            )
            self._train_samples = count_samples(self.shards("train"), keep=keep)
        workers = max(1, hp.num_workers)
        n = self._train_samples / (hp.batch_size * world_size * workers)
        batches = math.ceil(n) if hp.resampled else math.floor(n)
        if batches < 1:
            raise ValueError(
                f"{self._train_samples} training samples per epoch give no full batch per worker "
                f"(batch_size {hp.batch_size} x world_size {world_size} x workers {workers})"
            )
        return batches

    def make_dataset(
        self, stage: Stage, rank: int | None = None, world_size: int | None = None
    ) -> wds.DataPipeline:
        """The wds.DataPipeline of `stage` for one rank (default: `distributed()`)."""
        return self._build(stage, SharedEpoch(), *self._rank(rank, world_size))

    def make_loader(
        self, stage: Stage, rank: int | None = None, world_size: int | None = None
    ) -> TripletLoader:
        """The TripletLoader of `stage` for one rank (default: `distributed()`)."""
        hp = self.hparams
        rank, world_size = self._rank(rank, world_size)
        epoch = SharedEpoch()
        train = stage == "train"
        return TripletLoader(
            self._build(stage, epoch, rank, world_size),
            stage=stage,
            epoch=epoch,
            stats=self._stats,
            epoch_of_pass=self._epoch_of_pass if train else None,
            num_batches=self.batches_per_worker(world_size) * max(1, hp.num_workers) if train else None,
            num_workers=hp.num_workers,
            persistent_workers=hp.persistent_workers,
            pin_memory=hp.pin_memory,
        )

    def train_dataloader(self) -> TripletLoader:
        return self.make_loader("train")

    def val_dataloader(self) -> TripletLoader | list:
        return self.make_loader("val") if self.hparams.val_shards is not None else []

    def test_dataloader(self) -> TripletLoader | list:
        return self.make_loader("test") if self.hparams.test_shards is not None else []

    def _rank(self, rank: int | None, world_size: int | None) -> tuple[int, int]:
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if rank is None:
            return self.distributed()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        return rank, world_size

    def _epoch_of_pass(self, passes: int) -> int:
        return self.trainer.current_epoch if self.trainer is not None else passes

    def _build(self, stage: Stage, epoch: SharedEpoch, rank: int, world_size: int) -> wds.DataPipeline:
        hp = self.hparams
        urls = self.shards(stage)
        train = stage == "train"
        reader = TripletReader(
            epoch,
            hp.image_size,
            seed=hp.seed,
            rank=rank,
            shuffle_buffer=hp.shuffle_buffer if train else 0,
            dropout={"text": hp.drop_text, "id": hp.drop_id, "expr": hp.drop_expr, "all": hp.drop_all}
            if train
            else None,
            id_dim=hp.id_dim,
            max_corrupt_fraction=hp.max_corrupt_fraction,
            min_samples_for_fraction=hp.min_samples_for_fraction,
            max_identity_similarity=hp.max_identity_similarity if train else None,
        )
        if train and not hp.resampled and len(urls) < world_size * max(1, hp.num_workers):
            raise ValueError(
                f"{len(urls)} training shards cannot feed world_size {world_size} x {max(1, hp.num_workers)} workers "
                "without resampling; write more shards, use fewer workers or set resampled=True"
            )
        if train and hp.resampled:
            shard_stages: list[Any] = [EpochResampledShards(urls, epoch, hp.seed, rank, self._train_weights)]
        else:
            shard_stages = [
                EpochShardList(urls, epoch, seed=hp.seed, shuffle=train),
                functools.partial(split_by_rank, rank=rank, world_size=world_size),
                wds.split_by_worker,
            ]
        pipeline = wds.DataPipeline(
            *shard_stages,
            reader.tar_samples,
            reader.shuffle,
            reader.prepare,
            wds.batched(hp.batch_size, collation_fn=reader.collate, partial=not train),
        )
        return pipeline.with_epoch(self.batches_per_worker(world_size)) if train else pipeline


class TripletStatsLogger(L.Callback):
    """Logs the triplet read counters (READ_COUNTERS) as `{prefix}{name}` on every training batch, from
    the batch's "stats": totals over this rank's workers, summed over ranks when `sync_dist`."""

    def __init__(self, prefix: str = "data/", sync_dist: bool = False):
        self.prefix, self.sync_dist = prefix, sync_dist
        self._stats = TripletStats()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stats = batch.get("stats") if isinstance(batch, Mapping) else None
        if not stats:
            return
        self._stats.update("train", stats)
        for name, value in self._stats.totals("train").items():
            pl_module.log(
                self.prefix + name,
                float(value),
                on_step=True,
                on_epoch=False,
                sync_dist=self.sync_dist,
                reduce_fx="sum",
                batch_size=1,
            )


NO_CONDITION_DROP = {"drop_text": 0.0, "drop_id": 0.0, "drop_expr": 0.0, "drop_all": 0.0}


def stored_batches(
    train_shards: str | Sequence[str], batch_size: int, image_size: int = 64
) -> Iterator[dict[str, Any]]:
    """Training batches as the shards store them (resized to `image_size`): shard order, no shuffle, no
    condition dropped (what diagnostics score, benchmarks time and tests feed a step)."""
    dm = TripletDataModule(
        train_shards=train_shards,
        batch_size=batch_size,
        num_workers=0,
        image_size=image_size,
        shuffle_buffer=0,
        **NO_CONDITION_DROP,
    )
    return iter(dm.train_dataloader())
