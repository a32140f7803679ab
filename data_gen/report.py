"""The round report of an IDI job: counts, reasons, score distributions, throughput, and in the
world each filter's precision and recall against ground truth.

Written by rank 0 after every rank finished, from the manifests and the per-block score files
(so a resumed job reports all its blocks): `report-{split}-r{round}.md`, `.json` and histogram
PNGs `report-{split}-r{round}-{score}.png`.

Precision and recall of a filter are over candidates with ground truth: precision = share of the
candidates it passes that truly are good on its criterion, recall = share of the truly good
candidates it passes; `base_rate` is the share truly good, the precision of passing everything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_gen.filters import REASONS
from data_gen.shards import done_blocks, read_manifest, read_scores
from emojidiff.plots import pyplot

SCORES = ("identity_similarity", "expression_distance", "gt_identity_distance", "gt_expression_error")


def _pct(x: np.ndarray) -> dict[str, float] | None:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return None
    q = np.percentile(x, [5, 25, 50, 75, 95])
    return {
        "mean": float(x.mean()),
        "p5": float(q[0]),
        "p25": float(q[1]),
        "p50": float(q[2]),
        "p75": float(q[3]),
        "p95": float(q[4]),
        "n": int(len(x)),
    }


def precision_recall(passed: np.ndarray, good: np.ndarray) -> dict[str, float | int | None]:
    """Precision, recall and base rate of a pass/fail decision against ground truth (bool arrays)."""
    tp = int((passed & good).sum())
    n_pass, n_good = int(passed.sum()), int(good.sum())
    return {
        "precision": tp / n_pass if n_pass else None,
        "recall": tp / n_good if n_good else None,
        "base_rate": n_good / len(good) if len(good) else None,
        "n": int(len(good)),
        "passed": n_pass,
    }


def filter_quality(scores: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> dict[str, Any]:
    """World only: precision/recall of the expression filter, the identity filter and the whole
    accept decision, judged by the ground-truth tolerances in `config` (FilterConfig fields)."""
    out: dict[str, Any] = {}
    gte, gti = scores.get("score_gt_expression_error"), scores.get("score_gt_identity_distance")
    good_e = None if gte is None else np.isfinite(gte) & (gte <= config["gt_expression_tolerance"])
    good_i = None if gti is None else np.isfinite(gti) & (gti >= config["gt_min_identity_distance"])
    if good_e is not None:
        known = np.isfinite(gte)
        out["expression"] = precision_recall(scores["pass_expression"][known], good_e[known])
    if good_i is not None:
        known = np.isfinite(gti)
        out["identity"] = precision_recall(scores["pass_identity"][known], good_i[known])
    if good_e is not None and good_i is not None:
        known = np.isfinite(gte) & np.isfinite(gti)
        out["accept"] = precision_recall((scores["reason"] == -1)[known], (good_e & good_i)[known])
    return out


#: Score quantiles the threshold sweep of the world report tries, besides the threshold used.
SWEEP_QUANTILES: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9)


def threshold_sweep(
    scores: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """World only: precision/recall of the expression and identity filters had their thresholds
    been elsewhere (at quantiles of the score, and at the one used), judged by ground truth, so a
    report shows whether a stricter filter would buy precision."""
    out: dict[str, list[dict[str, Any]]] = {}
    specs = (
        (
            "expression",
            "score_expression_distance",
            "score_gt_expression_error",
            "max_expression_distance",
            lambda gt: gt <= config["gt_expression_tolerance"],
        ),
        (
            "identity",
            "score_identity_similarity",
            "score_gt_identity_distance",
            "identity_threshold_used",
            lambda gt: gt >= config["gt_min_identity_distance"],
        ),
    )
    for name, score_key, gt_key, used_key, is_good in specs:
        if score_key not in scores or gt_key not in scores:
            continue
        score, gt = scores[score_key].astype(np.float64), scores[gt_key].astype(np.float64)
        known = np.isfinite(score) & np.isfinite(gt)
        if not known.any():
            continue
        score, good = score[known], is_good(gt[known])
        thresholds = sorted({float(config[used_key]), *np.quantile(score, SWEEP_QUANTILES).round(4).tolist()})
        out[name] = [
            {"threshold": t, "used": t == float(config[used_key]), **precision_recall(score <= t, good)}
            for t in thresholds
        ]
    return out


def _subset(scores: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in scores.items()}


def summarise(
    scores: Mapping[str, np.ndarray], alterer_names: Sequence[str], config: Mapping[str, Any]
) -> dict[str, Any]:
    """Counts by reason and alterer, score percentiles and filter quality, overall and per alterer."""

    def one(s: Mapping[str, np.ndarray]) -> dict[str, Any]:
        reason = s["reason"]
        return {
            "candidates": int(len(reason)),
            "accepted": int((reason == -1).sum()),
            "rejected": {r: int((reason == i).sum()) for i, r in enumerate(REASONS)},
            "scores": {k: _pct(s[f"score_{k}"].astype(np.float64)) for k in SCORES if f"score_{k}" in s},
            "filter_quality": filter_quality(s, config),
            "threshold_sweep": threshold_sweep(s, config),
        }

    out = {"all": one(scores), "by_alterer": {}}
    for i, name in enumerate(alterer_names):
        mask = scores["alterer"] == i
        if mask.any():
            out["by_alterer"][name] = one(_subset(scores, mask))
    return out


def _histograms(
    out_dir: Path,
    stem: str,
    scores: Mapping[str, np.ndarray],
    alterer_names: Sequence[str],
    thresholds: Mapping[str, float],
) -> list[str]:
    plt = pyplot()

    files = []
    for key in SCORES:
        col = scores.get(f"score_{key}")
        if col is None or not np.isfinite(col).any():
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
        finite = col[np.isfinite(col)]
        bins = np.linspace(float(finite.min()), float(finite.max()) + 1e-6, 41)
        for i, name in enumerate(alterer_names):
            sel = (scores["alterer"] == i) & np.isfinite(col)
            if sel.any():
                ax.hist(col[sel], bins=bins, alpha=0.55, label=f"{name} (n={int(sel.sum())})")
        if key in thresholds:
            ax.axvline(thresholds[key], color="k", ls="--", lw=1, label=f"threshold {thresholds[key]:.3g}")
        ax.set_xlabel(key)
        ax.set_ylabel("candidates")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{stem}-{key}.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        files.append(name)
    return files


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _markdown(report: Mapping[str, Any]) -> str:
    s, t = report["summary"], report["throughput"]
    lines = [
        f"# IDI round report: {report['split']}-r{report['round']}",
        "",
        f"- targets: {report['targets']}; candidates: {s['all']['candidates']}; accepted triplets: {s['all']['accepted']} "
        f"({s['all']['accepted'] / max(1, s['all']['candidates']):.1%} of candidates)",
        f"- skipped sources (unreadable, no face): {report['skipped_targets']['count']}"
        + "".join(f"\n  - `{name}`: {reason}" for _, name, reason in report["skipped_targets"]["first"][:10]),
        f"- shards: {report['shards']['count']} ({report['shards']['bytes'] / 2**20:.1f} MiB) holding "
        + ", ".join(f"round {r}: {n} samples" for r, n in sorted(report["samples"].items())),
        f"- this run: {t['run_targets']} targets in {t['run_seconds']:.1f} s on {t['world_size']} process(es): "
        f"{t['run_samples_per_s']:.1f} triplets/s (round {report['round']}), {t['run_targets_per_s']:.1f} targets/s",
        f"- thresholds: {json.dumps(report['filters'], sort_keys=True)}",
        "",
        "## Candidates by alterer",
        "",
        "| alterer | candidates | accepted | " + " | ".join(f"rejected: {r}" for r in REASONS) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in REASONS) + " |",
    ]
    for name, a in [("all", s["all"]), *s["by_alterer"].items()]:
        lines.append(
            f"| {name} | {a['candidates']} | {a['accepted']} | "
            + " | ".join(str(a["rejected"][r]) for r in REASONS)
            + " |"
        )
    lines += [
        "",
        "## Scores (median [p5, p95])",
        "",
        "| alterer | " + " | ".join(SCORES) + " |",
        "| --- | " + " | ".join("---:" for _ in SCORES) + " |",
    ]
    for name, a in [("all", s["all"]), *s["by_alterer"].items()]:
        cells = []
        for k in SCORES:
            p = a["scores"].get(k)
            cells.append("n/a" if p is None else f"{p['p50']:.3f} [{p['p5']:.3f}, {p['p95']:.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(a["filter_quality"] for a in [s["all"], *s["by_alterer"].values()]):
        lines += [
            "",
            "## Filters against ground truth (world)",
            "",
            "Good on expression: gt_expression_error <= gt_expression_tolerance; good on identity (not A): "
            "gt_identity_distance >= gt_min_identity_distance; accept: both. Base rate = share truly good.",
            "",
            "| alterer | filter | precision | recall | base rate | passed / n |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for name, a in [("all", s["all"]), *s["by_alterer"].items()]:
            for f, q in a["filter_quality"].items():
                lines.append(
                    f"| {name} | {f} | {_fmt(q['precision'])} | {_fmt(q['recall'])} | {_fmt(q['base_rate'])} | "
                    f"{q['passed']} / {q['n']} |"
                )
    sweeps = [(name, a["threshold_sweep"]) for name, a in s["by_alterer"].items() if a.get("threshold_sweep")]
    if sweeps:
        lines += [
            "",
            "## Other thresholds (world)",
            "",
            "Precision and recall each filter would have had at other thresholds (score quantiles; * = the one used).",
            "",
            "| alterer | filter | threshold | precision | recall | passed / n |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for name, sweep in sweeps:
            for f, rows in sweep.items():
                for q in rows:
                    lines.append(
                        f"| {name} | {f} | {q['threshold']:.4g}{' *' if q['used'] else ''} | {_fmt(q['precision'])} | "
                        f"{_fmt(q['recall'])} | {q['passed']} / {q['n']} |"
                    )
    if report.get("figures"):
        lines += ["", "## Histograms", ""] + [f"![{f}]({f})" for f in report["figures"]]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path,
    split: str,
    round_: int,
    alterer_names: Sequence[str],
    filters: Mapping[str, Any],
    run: Mapping[str, Any],
) -> dict[str, Any]:
    """Build and write the round report; returns it. `run`: this run's wall seconds, world size
    and the targets it processed (for throughput); `filters`: the FilterConfig used (and the
    identity threshold actually applied)."""
    out_dir = Path(out_dir)
    records = read_manifest(out_dir, split, round_)
    blocks = done_blocks(records)
    scores = read_scores(out_dir, split, round_, blocks) if blocks else {}
    scores.setdefault("reason", np.zeros(0, np.int64))
    scores.setdefault("alterer", np.zeros(0, np.int64))
    samples: dict[str, int] = {}
    shard_bytes, shard_count = 0, 0
    for r in records:
        for rnd, n in r["samples"].items():
            samples[rnd] = samples.get(rnd, 0) + int(n)
        for name in r["shards"].values():
            shard_count += 1
            shard_bytes += (out_dir / name).stat().st_size
    run_written = int(run.get("run_samples", 0))
    seconds = float(run.get("seconds", 0.0)) or 1e-9
    skipped = [s for r in records for s in r.get("skipped", [])]
    report = {
        "split": split,
        "round": round_,
        "targets": int(sum(r["targets"] for r in records)),
        "blocks": len(blocks),
        "skipped_targets": {"count": len(skipped), "first": skipped[:50]},
        "samples": samples,
        "shards": {"count": shard_count, "bytes": shard_bytes},
        "filters": dict(filters),
        "alterers": list(alterer_names),
        "summary": summarise(scores, alterer_names, filters),
        "throughput": {
            "run_seconds": float(run.get("seconds", 0.0)),
            "run_targets": int(run.get("run_targets", 0)),
            "run_samples": run_written,
            "run_samples_per_s": run_written / seconds,
            "run_targets_per_s": int(run.get("run_targets", 0)) / seconds,
            "world_size": int(run.get("world_size", 1)),
            "block_seconds_total": float(sum(r["seconds"] for r in records)),
        },
    }
    thresholds = {
        "identity_similarity": float(filters["identity_threshold_used"]),
        "expression_distance": float(filters["max_expression_distance"]),
        "gt_identity_distance": float(filters["gt_min_identity_distance"]),
        "gt_expression_error": float(filters["gt_expression_tolerance"]),
    }
    stem = f"report-{split}-r{round_}"
    report["figures"] = _histograms(out_dir, stem, scores, alterer_names, thresholds) if blocks else []
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out_dir / f"{stem}.md").write_text(_markdown(report))
    return report
