"""Helpers for tests/datamodules/test_triplets.py that must be importable by name in a spawned process.

The test puts this folder on sys.path (spawned children inherit it) and imports this module there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from datamodules.triplets import TripletDataModule


def read_rank(rank: int, world_size: int, init_file: str, shards: list[str], out_dir: str) -> None:
    """One gloo rank: read a training epoch of `shards` with the rank the DataModule finds in
    torch.distributed, and write what it saw to out_dir/rank{rank}.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dm = TripletDataModule(
            train_shards=shards, batch_size=4, num_workers=0, image_size=8, shuffle_buffer=8, seed=0
        )
        batches = list(dm.train_dataloader())
        counts: list[int | None] = [None] * world_size
        dist.all_gather_object(counts, len(batches))
        report = {
            "distributed": list(dm.distributed()),
            "keys": [k for b in batches for k in b["key"]],
            "batches_per_rank": counts,
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()
