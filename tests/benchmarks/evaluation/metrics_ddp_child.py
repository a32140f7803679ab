"""Helper for tests/benchmarks/evaluation/test_metrics.py that must be importable by name in a spawned process.

The test puts this folder on sys.path (spawned children inherit it) and imports this module there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


def world_batch(n: int, identity_offset: int = 0) -> torch.Tensor:
    """n world portraits (identities identity_offset.., expressions 0..n-1): float (n, 3, 64, 64) in [0, 1]."""
    from emojidiff.world import Expression, Identity, render_batch

    out = render_batch(
        [Identity.sample(identity_offset + i) for i in range(n)],
        [Expression.sample(i) for i in range(n)],
        "shaded",
        size=64,
        seeds=list(range(n)),
    )
    return out.images.permute(0, 3, 1, 2).float() / 255.0


def score(rows: list[int], fd_rows: list[int], n: int) -> dict:
    """Update the metrics with `rows` (row metrics) and `fd_rows` (WorldFD), compute, and gather per-row results."""
    from benchmarks.evaluation.metrics import DetectionRate, ExpressionError, IdentitySimilarity, WorldFD

    outputs, references = world_batch(n), world_batch(n, identity_offset=100)
    idx = torch.tensor(rows)
    metrics = {
        "id_sim": IdentitySimilarity("world-id"),
        "expr_err": ExpressionError("world-expr"),
        "detection": DetectionRate(),
    }
    metrics["id_sim"].update(idx, outputs[idx], references[idx])
    metrics["expr_err"].update(idx, outputs[idx], references[idx])
    metrics["detection"].update(idx, outputs[idx])
    world_fd = WorldFD()
    world_fd.update(outputs[fd_rows], real=False)
    world_fd.update(references[fd_rows], real=True)
    result = {
        name: {"value": float(m.compute()), "rows": m.per_row().to_dict()} for name, m in metrics.items()
    }
    result["world_fd"] = {k: float(v) for k, v in world_fd.compute().items()}
    return result


def run_rank(rank: int, world_size: int, init_file: str, n: int, out_dir: str) -> None:
    """One gloo rank: every other row (rank 1 also repeats row 0, as a padding DistributedSampler
    does), then write the synced results to out_dir/rank{rank}.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        own = list(range(rank, n, world_size))
        rows = own + [0] if rank == 1 else own
        result = score(rows, own, n)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
