"""Shard output of the IDI job: atomic shard files, the manifest of finished blocks, resume.

The job's unit of work is a *block* of target indices. A finished block becomes, per round it
writes (the cross-identity round and, optionally, round 0's self pairs), one shard
`{split}-r{round}-{rank:03d}-{n:06d}.tar` written under a temporary name and renamed when
complete, then one line in the rank's manifest `manifest-{split}-r{round}-{rank:03d}.jsonl`
naming the block, its shards and counts. Only a block in a manifest is done: on restart every rank
skips done blocks, deletes its temporary files and any complete shard no manifest names (written
by a job killed between the rename and the manifest line), and redoes the rest, so a killed job
resumes with no duplicate and no missing sample (keys depend only on the target index).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from emojidiff.triplet import parse_shard_name, shard_name

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
SCORES_DIR = "scores"


def manifest_name(split: str, round_: int, rank: int) -> str:
    return f"manifest-{split}-r{round_}-{rank:03d}.jsonl"


def _manifest_re(split: str, round_: int) -> re.Pattern[str]:
    return re.compile(rf"^manifest-{re.escape(split)}-r{round_}-(\d{{3}})\.jsonl$")


def read_manifest(out_dir: str | Path, split: str, round_: int) -> list[dict[str, Any]]:
    """Every finished-block record of a split and round, over all ranks' manifests.

    A torn last line (a job killed while appending) is ignored: its block is not done.
    """
    out_dir = Path(out_dir)
    pattern = _manifest_re(split, round_)
    records = []
    for path in sorted(out_dir.glob(f"manifest-{split}-r{round_}-*.jsonl")):
        if not pattern.match(path.name):
            continue
        for n, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is torn (a killed job); its block will be redone", path, n + 1)
    return records


def done_blocks(records: Iterable[Mapping[str, Any]]) -> set[int]:
    return {int(r["block"]) for r in records}


def _owned(name: str, rank: int, world_size: int) -> bool:
    """Shards of `rank`, and on rank 0 those of ranks a smaller restart no longer has."""
    r = parse_shard_name(name)["rank"]
    return r == rank or (rank == 0 and r >= world_size)


def named_shards(out_dir: str | Path) -> set[str]:
    """Every shard any manifest in `out_dir` names (all jobs, splits and rounds)."""
    pattern = re.compile(r"^manifest-(?P<split>[a-z0-9_]+)-r(?P<round>\d+)-\d{3}\.jsonl$")
    jobs = {
        (m["split"], int(m["round"]))
        for p in Path(out_dir).glob("manifest-*.jsonl")
        if (m := pattern.match(p.name))
    }
    return {
        s
        for split, rnd in jobs
        for r in read_manifest(out_dir, split, rnd)
        for s in r.get("shards", {}).values()
    }


def clean_unfinished(out_dir: str | Path, split: str, round_: int, rank: int, world_size: int) -> list[str]:
    """Delete this rank's temporary shards of a split and round, and its complete shards that no
    manifest names; returns their names."""
    out_dir = Path(out_dir)
    named = named_shards(out_dir)
    removed = []
    prefix = f"{split}-r{round_}-"
    for path in out_dir.iterdir():
        name = path.name
        base = name[len(TMP_PREFIX) :] if name.startswith(TMP_PREFIX) else name
        if not base.startswith(prefix) or not base.endswith(".tar"):
            continue
        try:
            if not _owned(base, rank, world_size):
                continue
        except ValueError:
            continue
        if name.startswith(TMP_PREFIX) or name not in named:
            path.unlink(missing_ok=True)
            removed.append(name)
    if removed:
        log.info(
            "rank %d: removed %d unfinished shard file(s) of %s-r%d: %s",
            rank,
            len(removed),
            split,
            round_,
            ", ".join(sorted(removed)[:5]),
        )
    return removed


def next_shard_number(out_dir: str | Path, split: str, round_: int, rank: int) -> int:
    """1 + the highest shard number `rank` has on disk for a split and round (0 when none)."""
    numbers = [-1]
    for path in Path(out_dir).glob(f"{split}-r{round_}-{rank:03d}-*.tar"):
        try:
            numbers.append(parse_shard_name(path.name)["n"])
        except ValueError:
            continue
    return max(numbers) + 1


def write_shard(out_dir: str | Path, name: str, samples: Iterable[Mapping[str, Any]]) -> int:
    """Write encoded samples (dicts of `__key__` and bytes members) to `out_dir/name` atomically.

    The tar is written as `.tmp-<name>`, flushed to disk and renamed; returns its size in bytes.
    Member mtimes are 0 so the same samples give the same bytes.
    """
    out_dir = Path(out_dir)
    tmp, final = out_dir / f"{TMP_PREFIX}{name}", out_dir / name
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False, mtime=0.0)
        for sample in samples:
            writer.write(dict(sample))
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, final)
    return final.stat().st_size


def append_manifest(
    out_dir: str | Path, split: str, round_: int, rank: int, record: Mapping[str, Any]
) -> None:
    """Append one finished-block line to the rank's manifest (flushed and fsynced)."""
    path = Path(out_dir) / manifest_name(split, round_, rank)
    with open(path, "a") as f:
        f.write(json.dumps(dict(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def scores_path(out_dir: str | Path, split: str, round_: int, block: int) -> Path:
    return Path(out_dir) / SCORES_DIR / f"{split}-r{round_}-block{block:06d}.npz"


def write_scores(
    out_dir: str | Path, split: str, round_: int, block: int, arrays: Mapping[str, np.ndarray]
) -> None:
    """Every candidate's scores of a block, for the round report (rewritten when a block is redone)."""
    path = scores_path(out_dir, split, round_, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)


def read_scores(out_dir: str | Path, split: str, round_: int, blocks: Iterable[int]) -> dict[str, np.ndarray]:
    """Concatenated candidate scores of the given (finished) blocks."""
    parts: dict[str, list[np.ndarray]] = {}
    for b in sorted(blocks):
        with np.load(scores_path(out_dir, split, round_, b), allow_pickle=False) as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


__all__ = [
    "append_manifest",
    "clean_unfinished",
    "done_blocks",
    "manifest_name",
    "next_shard_number",
    "read_manifest",
    "read_scores",
    "scores_path",
    "shard_name",
    "write_scores",
    "write_shard",
]
