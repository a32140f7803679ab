"""The IDI generation job under `trainer.predict`: blocks of targets -> filtered triplets -> shards.

    BlockDataset (this rank's unfinished blocks, split over workers; a worker loads the targets)
      -> IDIGenerator.predict_step (alter, score, filter, retry, encode; analysers on the device)
      -> ShardWriter.write_on_batch_end (one shard per block and round, then the manifest line)

Lightning runs it on one process or many (DDP on GPUs or CPUs, multi-node, torchrun and SLURM
environments); each rank writes only its own shards. Block b belongs to rank b % world_size
(`use_distributed_sampler=False`: no padding, so no duplicates); a restart skips finished
blocks (see `data_gen.shards`), whatever its world size.

Sample indices: the cross-identity sample of target t, template j is t * templates_per_target + j;
the round-0 self pair of target t has index t. Keys follow `emojidiff.triplet.sample_key`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from data_gen.base import ALTERERS, SOURCES, Alterer, Source, Targets, Templates
from data_gen.filters import REASONS, FilterConfig, TripletFilter
from data_gen.shards import (
    append_manifest,
    clean_unfinished,
    done_blocks,
    next_shard_number,
    read_manifest,
    write_scores,
    write_shard,
)
from emojidiff.face import build_expression_analyser, build_face_aligner, build_identity_encoder
from emojidiff.triplet import encode_png, encode_triplet, sample_key, shard_name
from emojidiff.world import Expression, Identity

log = logging.getLogger(__name__)

_ALTER_SALT = 0xA17E2


@dataclass
class IDIConfig:
    """One IDI job: a source, alterers, filters, and where the shards go.

    out_dir: folder of the shards, manifests, scores, report and resolved config.
    split: split name in shard names and keys ("train", "test", ...).
    round: IDI round of the cross-identity triplets (>= 1; round 0 is self pairs).
    source: IDI source spec (`data_gen.base.SOURCES`: "world", "folder").
    alterers: alterer specs (`ALTERERS`: "world-swap", "world-resynth", "onnx-swapper",
        "adapter", "chain"); each candidate picks one at random (weights `alterer_weights`).
    templates_per_target: candidate templates made per target (each its own triplet).
    attempts: tries per template; a rejected candidate is re-made (new donor, maybe another
        alterer) up to this many times.
    self_pairs: also write round 0's self pairs of the same targets (shards `{split}-r0-...`).
    block_size: targets per block (one shard per block and round); rounded up to a multiple of
        the source's identity group so references never need an extra render.
    identity_encoder / expression_analyser / aligner: `emojidiff.face` specs the filters use
        (and the identity embedding `id.npy` of the reference).
    limit: use only the first `limit` targets of the source (None: all).
    accelerator / devices / num_nodes / strategy: the Lightning Trainer's.
    num_workers: DataLoader workers that load (render or read) targets.
    torch_threads: intra-op threads of the main process (None: torch's default).
    """

    out_dir: str = "data/idi"
    split: str = "train"
    round: int = 1
    source: dict[str, Any] = field(default_factory=lambda: {"name": "world", "init_args": {}})
    alterers: list[Any] = field(default_factory=lambda: ["world-swap"])
    alterer_weights: list[float] | None = None
    templates_per_target: int = 1
    attempts: int = 2
    self_pairs: bool = False
    block_size: int = 600
    filters: FilterConfig = field(default_factory=FilterConfig)
    identity_encoder: Any = "world-id"
    expression_analyser: Any = "world-expr"
    aligner: Any = None
    seed: int = 0
    limit: int | None = None
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 1
    torch_threads: int | None = None
    progress: bool = True


def build_source(spec: Any) -> Source:
    return SOURCES.build(spec)


def block_size_for(config: IDIConfig, source: Source) -> int:
    group = int(getattr(source, "group_size", 1))
    return max(group, math.ceil(config.block_size / group) * group)


def num_targets(config: IDIConfig, source: Source) -> int:
    return len(source) if config.limit is None else min(len(source), int(config.limit))


def block_indices(block: int, block_size: int, total: int) -> np.ndarray:
    return np.arange(block * block_size, min((block + 1) * block_size, total), dtype=np.int64)


class BlockDataset(IterableDataset):
    """Yields (block, Targets) for this rank's unfinished blocks, split over DataLoader workers."""

    def __init__(self, source: Source, blocks: Sequence[int], block_size: int, total: int):
        super().__init__()
        self.source, self.blocks, self.block_size, self.total = source, list(blocks), block_size, total

    def __iter__(self) -> Iterator[tuple[int, Targets]]:
        info = get_worker_info()
        mine = self.blocks if info is None else self.blocks[info.id :: info.num_workers]
        for b in mine:
            yield b, self.source.load(block_indices(b, self.block_size, self.total))


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)


def _identity_collate(item: Any) -> Any:
    return item


class IDIGenerator(L.LightningModule):
    """predict_step: one block of targets -> encoded triplet samples per round, plus every score."""

    def __init__(self, config: IDIConfig, source: Source, alterers: Sequence[Alterer], filt: TripletFilter):
        super().__init__()
        self.config, self.source, self.alterer_list = config, source, list(alterers)
        self.filter = filt
        self.identity_encoder, self.expression_analyser = (
            filt.encoder,
            filt.analyser,
        )  # registered: moved to device
        w = np.asarray(config.alterer_weights or [1.0] * len(self.alterer_list), dtype=np.float64)
        if len(w) != len(self.alterer_list) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"alterer_weights {config.alterer_weights} do not fit {len(self.alterer_list)} alterers"
            )
        self.weights = w / w.sum()
        self.block_size = block_size_for(config, source)
        for a in self.alterer_list:
            a.setup(source)
        self.self_pair = ALTERERS.build("self") if config.self_pairs else None

    def _sync_filter_device(self) -> None:
        self.filter.device = self.device

    def _alter(
        self, targets: Targets, rows: np.ndarray, choice: np.ndarray, rng: np.random.Generator
    ) -> Templates:
        """Candidates for `rows` of `targets`, each by alterer `choice[row]`, merged in row order."""
        n, s = len(rows), targets.images.shape[1]
        images, masks = np.zeros((n, s, s, 3), np.uint8), np.zeros((n, s, s), np.float32)
        ok, meta = np.zeros(n, bool), [dict() for _ in range(n)]
        id_p = (
            np.full((n, Identity.dim()), np.nan, np.float32) if targets.identity_params is not None else None
        )
        ex_p = (
            np.full((n, Expression.dim()), np.nan, np.float32)
            if targets.expression_params is not None
            else None
        )
        for k, alterer in enumerate(self.alterer_list):
            pos = np.flatnonzero(choice[rows] == k)
            if len(pos) == 0:
                continue
            sub = targets.subset(rows[pos])
            try:
                t = alterer.alter(sub, rng)
            except ValueError as err:  # e.g. every remaining row shows one person: no donor
                for p in pos:
                    meta[p] = {"alterer": alterer.name, "alter_error": str(err)}
                continue
            images[pos], masks[pos], ok[pos] = t.images, t.masks, t.ok
            for p, m in zip(pos, t.meta, strict=True):
                meta[p] = {"alterer": alterer.name, **m}
            if id_p is not None and t.identity_params is not None:
                id_p[pos] = t.identity_params
            if ex_p is not None and t.expression_params is not None:
                ex_p[pos] = t.expression_params
        return Templates(images, masks, ok, meta, id_p, ex_p)

    def predict_step(self, batch: tuple[int, Targets], batch_idx: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._sync_filter_device()
        block, targets = batch
        cfg, world = self.config, self.source.world
        skipped = [[int(i), str(name), str(reason)] for i, name, reason in targets.skipped]
        if len(targets) == 0:
            return {
                "block": int(block),
                "samples": {},
                "records": {},
                "targets": 0,
                "candidates": 0,
                "skipped": skipped,
                "seconds": time.perf_counter() - t0,
            }
        names = [f"reference of target {int(i)}" for i in targets.indices]
        ref_emb = self.filter.embed(targets.references, names)
        tgt_desc = self.filter.describe(targets.images, [f"target {int(i)}" for i in targets.indices])
        k = cfg.templates_per_target
        rows = np.repeat(np.arange(len(targets)), k)  # candidate row -> target row
        exp = targets.subset(rows)
        n = len(rows)
        final: dict[str, Any] = {
            "accepted": np.zeros(n, bool),
            "templates": [None] * n,
            "scores": [None] * n,
            "attempt": np.zeros(n, np.int64),
        }
        records: list[dict[str, np.ndarray]] = []
        pending = np.arange(n)
        for attempt in range(cfg.attempts):
            if len(pending) == 0:
                break
            rng = np.random.default_rng([cfg.seed, cfg.round, int(block), attempt, _ALTER_SALT])
            choice = rng.choice(len(self.alterer_list), size=n, p=self.weights)
            templates = self._alter(exp, pending, choice, rng)
            sub = exp.subset(pending)
            scores = self.filter.score(sub, templates, ref_emb[rows[pending]], tgt_desc[rows[pending]], world)
            reasons = self.filter.decide(scores)
            passed = self.filter.passes(scores)
            records.append(
                self._records(sub, templates, scores, passed, reasons, choice[pending], attempt, pending, k)
            )
            for j, (p, r) in enumerate(zip(pending, reasons, strict=True)):
                final["templates"][p] = (templates, j)
                final["scores"][p] = {key: _item(v[j]) for key, v in scores.items()}
                final["attempt"][p] = attempt
                final["accepted"][p] = r is None
            pending = pending[[r is not None for r in reasons]]
        out = {
            "block": int(block),
            "samples": {},
            "records": _concat(records),
            "targets": len(targets),
            "candidates": n,
            "skipped": skipped,
            "seconds": 0.0,
        }
        # A target and its reference are shared by all its triplets: encode them once.
        tgt_png = [encode_png(im) for im in targets.images]
        ref_png = [encode_png(im) for im in targets.references]
        out["samples"][cfg.round] = [
            self._encode(
                exp,
                p,
                final,
                ref_emb[rows[p]],
                cfg.round,
                int(exp.indices[p]) * k + int(p % k),
                tgt_png[rows[p]],
                ref_png[rows[p]],
            )
            for p in np.flatnonzero(final["accepted"])
        ]
        if self.self_pair is not None:
            selfs = self.self_pair.alter(targets, np.random.default_rng(0))
            out["samples"][0] = [
                self._encode_self(targets, selfs, i, ref_emb[i], tgt_png[i], ref_png[i])
                for i in range(len(targets))
            ]
        out["seconds"] = time.perf_counter() - t0
        return out

    def _records(
        self,
        sub: Targets,
        templates: Templates,
        scores: Mapping[str, np.ndarray],
        passed: Mapping[str, np.ndarray],
        reasons: list[str | None],
        choice: np.ndarray,
        attempt: int,
        pending: np.ndarray,
        k: int,
    ) -> dict[str, np.ndarray]:
        rec = {f"score_{key}": np.asarray(v, dtype=np.float32) for key, v in scores.items()}
        rec.update({f"pass_{key}": np.asarray(v, dtype=bool) for key, v in passed.items()})
        rec["reason"] = np.array([-1 if r is None else REASONS.index(r) for r in reasons], dtype=np.int64)
        rec["alterer"] = choice.astype(np.int64)
        rec["attempt"] = np.full(len(pending), attempt, dtype=np.int64)
        rec["index"] = sub.indices * k + (pending % k)
        return rec

    def _encode(
        self,
        exp: Targets,
        p: int,
        final: Mapping[str, Any],
        ref_emb: np.ndarray,
        round_: int,
        index: int,
        tgt_png: bytes,
        ref_png: bytes,
    ) -> dict[str, Any]:
        templates, j = final["templates"][p]
        key = sample_key(self.config.split, round_, index)
        meta = self._meta(exp, p, key, round_, index)
        meta.update(
            {
                "alterer": templates.meta[j].get("alterer"),
                "attempt": int(final["attempt"][p]),
                "template": templates.meta[j],
                "scores": final["scores"][p],
            }
        )
        if templates.identity_params is not None and templates.expression_params is not None:
            meta.setdefault("ground_truth", {})["template"] = {
                "identity_params": _list(templates.identity_params[j]),
                "expression": _list(templates.expression_params[j]),
            }
        return encode_triplet(
            key, tgt_png, ref_png, templates.images[j], meta, ref_emb, template_mask=templates.masks[j] > 0.5
        )

    def _encode_self(
        self, targets: Targets, selfs: Templates, i: int, ref_emb: np.ndarray, tgt_png: bytes, ref_png: bytes
    ) -> dict[str, Any]:
        index = int(targets.indices[i])
        key = sample_key(self.config.split, 0, index)
        meta = self._meta(targets, i, key, 0, index)
        meta.update({"alterer": "self", "attempt": 0, "template": selfs.meta[i], "scores": {}})
        if targets.identity_params is not None:
            meta.setdefault("ground_truth", {})["template"] = dict(meta["ground_truth"]["target"])
        return encode_triplet(
            key, tgt_png, ref_png, selfs.images[i], meta, ref_emb, template_mask=selfs.masks[i] > 0.5
        )

    def _meta(self, targets: Targets, i: int, key: str, round_: int, index: int) -> dict[str, Any]:
        src = dict(targets.meta[i])
        meta: dict[str, Any] = {
            "key": key,
            "split": self.config.split,
            "round": round_,
            "index": index,
            "target_index": int(targets.indices[i]),
            "person": targets.persons[i],
            "prompt": targets.prompts[i],
            "seed": self.config.seed,
            "style": src.get("style"),
            "source": src,
        }
        if targets.identity_params is not None and targets.expression_params is not None:
            ref_expr = targets.reference_expression_params
            meta["ground_truth"] = {
                "target": {
                    "identity_params": _list(targets.identity_params[i]),
                    "expression": _list(targets.expression_params[i]),
                },
                "reference": {
                    "identity_params": _list(targets.identity_params[i]),
                    "expression": None if ref_expr is None else _list(ref_expr[i]),
                },
            }
        return meta


def _item(v: Any) -> Any:
    v = np.asarray(v).item()
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v


def _list(v: np.ndarray) -> list[float] | None:
    """JSON list of a parameter vector; None when unknown (NaN: an alterer without ground truth)."""
    v = np.asarray(v, dtype=np.float64)
    return None if not np.isfinite(v).all() else [round(float(x), 6) for x in v]


def _concat(records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = {k for r in records for k in r}
    out = {}
    for k in sorted(keys):
        parts = [r[k] for r in records if k in r]
        if len(parts) == len(records):
            out[k] = np.concatenate(parts)
    return out


class ShardWriter(BasePredictionWriter):
    """Writes each finished block's shards (one per round), its scores and its manifest line.

    Runs on every rank with that rank's blocks; shows a progress bar of targets and samples/s.
    """

    def __init__(self, config: IDIConfig, rounds: Sequence[int], total_targets: int):
        super().__init__(write_interval="batch")
        self.config, self.rounds, self.total_targets = config, list(rounds), total_targets
        self.next_n: dict[int, int] = {}
        self.written = {r: 0 for r in rounds}
        self.bytes = 0
        self.started = time.perf_counter()
        self.bar = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        cfg = self.config
        for r in self.rounds:
            clean_unfinished(cfg.out_dir, cfg.split, r, trainer.global_rank, trainer.world_size)
            self.next_n[r] = next_shard_number(cfg.out_dir, cfg.split, r, trainer.global_rank)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()
        if self.config.progress and trainer.is_global_zero:
            self.bar = tqdm(
                total=self.total_targets,
                desc=f"IDI {self.config.split}-r{self.config.round} rank 0",
                unit="target",
                dynamic_ncols=True,
            )

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        cfg, rank = self.config, trainer.global_rank
        block = prediction["block"]
        shards, counts = {}, {}
        for r in self.rounds:
            samples = prediction["samples"].get(r, [])
            name = shard_name(cfg.split, r, rank, self.next_n[r])
            self.next_n[r] += 1
            self.bytes += write_shard(cfg.out_dir, name, samples)
            shards[str(r)], counts[str(r)] = name, len(samples)
            self.written[r] += len(samples)
        write_scores(cfg.out_dir, cfg.split, cfg.round, block, prediction["records"])
        append_manifest(
            cfg.out_dir,
            cfg.split,
            cfg.round,
            rank,
            {
                "block": block,
                "rank": rank,
                "shards": shards,
                "samples": counts,
                "targets": prediction["targets"],
                "candidates": prediction["candidates"],
                "skipped": prediction["skipped"],
                "seconds": round(prediction["seconds"], 4),
                "time": time.time(),
            },
        )
        if self.bar is not None:
            self.bar.update(prediction["targets"])
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix(samples_per_s=f"{self.written[cfg.round] / elapsed:.1f}")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()


def plan_blocks(config: IDIConfig, source: Source, rank: int, world_size: int) -> tuple[list[int], int, int]:
    """(this rank's unfinished blocks, block size, total targets)."""
    total = num_targets(config, source)
    size = block_size_for(config, source)
    n_blocks = math.ceil(total / size)
    done = done_blocks(read_manifest(config.out_dir, config.split, config.round))
    return [b for b in range(n_blocks) if b % world_size == rank and b not in done], size, total


class BlockDataModule(L.LightningDataModule):
    """The predict loader of this rank's unfinished blocks (rank and world size from the Trainer)."""

    def __init__(self, config: IDIConfig, source: Source):
        super().__init__()
        self.config, self.source = config, source

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        blocks, size, total = plan_blocks(self.config, self.source, rank, world)
        log.info("rank %d/%d: %d unfinished block(s) of %d targets", rank, world, len(blocks), size)
        workers = self.config.num_workers
        return DataLoader(
            BlockDataset(self.source, blocks, size, total),
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity_collate,
            worker_init_fn=_single_thread_worker if workers else None,
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
        )


def build_job(config: IDIConfig) -> tuple[IDIGenerator, BlockDataModule, ShardWriter, Source]:
    """The LightningModule, DataModule and writer of a job (nothing run yet)."""

    if config.round < 1:
        raise ValueError("round must be >= 1 (round 0, the self pairs, is written with self_pairs: true)")
    if config.templates_per_target < 1 or config.attempts < 1:
        raise ValueError("templates_per_target and attempts must be >= 1")
    source = build_source(config.source)
    alterers = [ALTERERS.build(s) for s in config.alterers]
    if not alterers:
        raise ValueError("alterers: give at least one alterer spec")
    aligner = None if config.aligner is None else build_face_aligner(config.aligner)
    filt = TripletFilter(
        build_identity_encoder(config.identity_encoder),
        build_expression_analyser(config.expression_analyser),
        config.filters,
        aligner=aligner,
    )
    module = IDIGenerator(config, source, alterers, filt)
    rounds = [config.round] + ([0] if config.self_pairs else [])
    writer = ShardWriter(config, rounds, total_targets=num_targets(config, source))
    return module, BlockDataModule(config, source), writer, source


def run(config: IDIConfig) -> tuple[L.Trainer, IDIGenerator]:
    """Run the job (resuming a killed one in the same out_dir); returns the Trainer and the module."""

    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    if config.torch_threads:
        torch.set_num_threads(int(config.torch_threads))
    L.seed_everything(config.seed, workers=True, verbose=False)
    # A block is one batch of targets, not a tensor batch: Lightning cannot (and need not) infer its indices.
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices", category=UserWarning)
    module, datamodule, writer, _ = build_job(config)
    trainer = L.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    trainer.strategy.barrier("idi-written")
    return trainer, module


def describe_job(config: IDIConfig, module: IDIGenerator) -> dict[str, Any]:
    return {
        "source": module.source.describe(),
        "alterers": [a.describe() for a in module.alterer_list],
        "filters": module.filter.describe_config(),
        "block_size": module.block_size,
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
