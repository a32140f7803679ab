"""Paired comparisons of evaluated methods: mean per-row difference with a bootstrap 95% CI.

    python -m benchmarks.evaluation.compare results/trained/scores.json \
        --pairs '[stage1:stage1-identity-only, ica:stage1]' [--out results/trained/comparisons.md]

Each pair `a:b` is scored on the protocol rows both methods produced (a failed row of either is
left out and counted): for every per-row metric of `scores.json` (written by `benchmarks.evaluation.evaluate`)
the mean of a - b and the 2.5/97.5 percentiles of that mean over `--bootstrap` resamples of the
rows (the same resampled rows for a and b, so the row-to-row spread that both share cancels; a
difference whose CI excludes 0 is a difference the protocol resolves).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.evaluation.metrics import bootstrap_ci
from emojidiff.options import parse_options


def paired_difference(
    a: Mapping[str, float], b: Mapping[str, float], bootstrap: int = 1000, seed: int = 0
) -> dict[str, float]:
    """{"mean", "low", "high", "rows"} of a - b over the row ids present (and finite) in both."""
    rows = sorted(k for k in a.keys() & b.keys() if np.isfinite(a[k]) and np.isfinite(b[k]))
    if not rows:
        raise ValueError("the two methods share no scored row")
    diff = np.array([a[k] - b[k] for k in rows], dtype=np.float64)
    ci = bootstrap_ci(diff, bootstrap, seed=seed)
    return {"mean": ci.mean, "low": ci.low, "high": ci.high, "rows": len(rows)}


def compare(
    scores: Mapping[str, Mapping[str, Mapping[str, float]]],
    pairs: Sequence[tuple[str, str]],
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """{"a - b": {metric: paired_difference}} for every pair, over the metrics both methods have."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for a, b in pairs:
        for name in (a, b):
            if name not in scores:
                raise KeyError(f"method {name!r} is not in the scores (have: {', '.join(scores)})")
        metrics = [m for m in scores[a] if m in scores[b]]
        out[f"{a} - {b}"] = {
            m: paired_difference(scores[a][m], scores[b][m], bootstrap, seed) for m in metrics
        }
    return out


def markdown(result: Mapping[str, Mapping[str, Mapping[str, float]]], source: str) -> str:
    metrics = sorted({m for r in result.values() for m in r})
    lines = [
        f"# Paired differences ({source})",
        "",
        "Mean of the per-row difference [95% bootstrap CI over rows]; rows scored by both methods.",
        "",
        "| pair | " + " | ".join(metrics) + " |",
        "| --- |" + " ---: |" * len(metrics),
    ]
    for pair, cells in result.items():
        row = [
            f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] (n={c['rows']})"
            if (c := cells.get(m))
            else "-"
            for m in metrics
        ]
        lines.append(f"| {pair} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class CompareConfig:
    """Paired differences of method labels on one evaluation's row scores.

    Args:
        scores: scores.json written by benchmarks.evaluation.evaluate.
        pairs: a:b pairs of method labels (difference a - b).
        bootstrap: resamples of each CI.
        seed: the bootstrap's seed.
        out: markdown file (default: comparisons.md beside the scores; its .json beside it).
    """

    scores: Path
    pairs: list[str]
    bootstrap: int = 1000
    seed: int = 0
    out: Path | None = None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, _ = parse_options(CompareConfig, argv, positional=["scores"])
    pairs = []
    for item in args.pairs:
        a, sep, b = item.partition(":")
        if not sep or not a or not b:
            raise SystemExit(f"benchmarks.evaluation.compare: --pairs takes a:b, got {item!r}")
        pairs.append((a, b))
    scores = json.loads(args.scores.read_text())["scores"]
    result = compare(scores, pairs, args.bootstrap, args.seed)
    out = args.out or args.scores.with_name("comparisons.md")
    out.write_text(markdown(result, str(args.scores)))
    out.with_suffix(".json").write_text(
        json.dumps(
            {"pairs": args.pairs, "seed": args.seed, "bootstrap": args.bootstrap, "differences": result},
            indent=2,
        )
        + "\n"
    )
    print(out.read_text())
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
