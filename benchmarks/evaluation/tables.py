"""Tables of an evaluation run: every metric of every method with a bootstrap 95% CI, overall and
per style, as Markdown, CSV and LaTeX.

Input: per-row scores `{label: {metric: {row_id: value}}}` (NaN where a row could not be scored),
the rows' styles, each method's failed rows, and set-level metrics (FID, KID, world-FD) that have
no per-row value.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.evaluation.metrics import bootstrap_ci

#: Per-row metrics, their table headers and which direction is better.
ROW_METRICS: dict[str, tuple[str, str]] = {
    "identity_similarity": ("ID sim.", "higher"),
    "expression_error": ("Expr. err.", "lower"),
    "expression_error_gt": ("Expr. err. (GT)", "lower"),
    "identity_leakage": ("ID leakage", "lower"),
    "detected": ("Detection", "higher"),
}
SET_METRICS: dict[str, tuple[str, str]] = {
    "fid": ("FID", "lower"),
    "kid": ("KID x100", "lower"),
    "world_fd_expr": ("world-FD expr", "lower"),
    "world_fd_id": ("world-FD id", "lower"),
}


def sweep_label(label: str, arg: str, value: float) -> str:
    """The label of a sweep point: the method's label, the varied init arg and its value."""
    return f"{label}@{arg}={float(value):g}"


def tables_header(
    protocol: str, rows: int, identity_encoder: Any, expression_analyser: Any, note: str = ""
) -> list[str]:
    """The head of an evaluation's table.md: protocol, row count, the evaluation analysers."""
    return [
        f"# Evaluation: {Path(protocol).name} ({rows} rows{note})",
        "",
        f"Analysers: identity `{json.dumps(identity_encoder)}`, expression `{json.dumps(expression_analyser)}`. "
        "Mean [95% bootstrap CI] over rows; FID/KID/world-FD against the ground-truth renders of the same rows.",
        "",
    ]


def summarise(
    scores: Mapping[str, Mapping[str, Mapping[int, float]]],
    styles: Mapping[int, str],
    failures: Mapping[str, Mapping[int, str]],
    set_metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
    n_boot: int = 1000,
) -> dict[str, Any]:
    """{"overall": {label: {metric: {mean, low, high, n}}}, "by_style": {style: {...}}, "failures": {...}}."""
    style_names = sorted(set(styles.values()))

    def cell(values: Mapping[int, float], keep: set[int] | None) -> dict[str, float]:
        v = np.array([x for r, x in values.items() if keep is None or r in keep], dtype=np.float64)
        mean, lo, hi = bootstrap_ci(v, n_boot)
        return {"mean": mean, "low": lo, "high": hi, "n": int(np.isfinite(v).sum())}

    out: dict[str, Any] = {"overall": {}, "by_style": {s: {} for s in style_names}, "failures": {}}
    for label, metrics in scores.items():
        out["overall"][label] = {m: cell(v, None) for m, v in metrics.items()}
        out["overall"][label].update(set_metrics.get(label, {}).get("all", {}))
        for s in style_names:
            keep = {r for r, st in styles.items() if st == s}
            out["by_style"][s][label] = {m: cell(v, keep) for m, v in metrics.items()}
            out["by_style"][s][label].update(set_metrics.get(label, {}).get(s, {}))
        out["failures"][label] = {
            "count": len(failures.get(label, {})),
            "rows": dict(list(failures.get(label, {}).items())[:20]),
        }
    return out


def _columns(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
    present = {m for row in table.values() for m in row}
    return [m for m in (*ROW_METRICS, *SET_METRICS) if m in present]


def _header(metric: str) -> str:
    name, better = {**ROW_METRICS, **SET_METRICS}[metric]
    return f"{name} {'↑' if better == 'higher' else '↓'}"


def _fmt(value: Any, metric: str) -> str:
    if isinstance(value, Mapping):
        if not math.isfinite(value.get("mean", math.nan)):
            return "n/a"
        if "low" in value and math.isfinite(value["low"]):
            return f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"
        return f"{value['mean']:.3f}"
    scale = 100.0 if metric == "kid" else 1.0
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value) * scale:.3f}"


def markdown_table(
    table: Mapping[str, Mapping[str, Any]],
    failures: Mapping[str, Any],
    rows_total: int,
    notes: Mapping[str, str] | None = None,
) -> str:
    cols = _columns(table)
    lines = [
        "| method | " + " | ".join(_header(c) for c in cols) + " | failed rows |",
        "| --- | " + " | ".join("---:" for _ in cols) + " | ---: |",
    ]
    for label, row in table.items():
        name = f"{label} ({notes[label]})" if notes and notes.get(label) else label
        lines.append(
            f"| {name} | "
            + " | ".join(_fmt(row.get(c), c) for c in cols)
            + f" | {failures.get(label, {}).get('count', 0)} / {rows_total} |"
        )
    return "\n".join(lines) + "\n"


def write_csv(path: Path, summary: Mapping[str, Any]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["style", "method", "metric", "mean", "ci_low", "ci_high", "n"])
        for style, table in [("all", summary["overall"]), *summary["by_style"].items()]:
            for label, row in table.items():
                for metric, v in row.items():
                    if isinstance(v, Mapping):
                        w.writerow(
                            [
                                style,
                                label,
                                metric,
                                v["mean"],
                                v.get("low", ""),
                                v.get("high", ""),
                                v.get("n", ""),
                            ]
                        )
                    else:
                        w.writerow([style, label, metric, v, "", "", ""])


def latex_table(table: Mapping[str, Mapping[str, Any]], caption: str) -> str:
    cols = _columns(table)
    head = " & ".join(
        ["Method", *[_header(c).replace("↑", r"$\uparrow$").replace("↓", r"$\downarrow$") for c in cols]]
    )
    body = []
    for label, row in table.items():
        cells = []
        for c in cols:
            v = row.get(c)
            if isinstance(v, Mapping) and math.isfinite(v.get("mean", math.nan)):
                ci = (v["high"] - v["low"]) / 2 if math.isfinite(v.get("low", math.nan)) else None
                cells.append(f"{v['mean']:.3f}" + (f" $\\pm$ {ci:.3f}" if ci is not None else ""))
            else:
                cells.append(_fmt(v, c))
        body.append(" & ".join([label.replace("_", r"\_"), *cells]) + r" \\")
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            r"\begin{tabular}{l" + "r" * len(cols) + "}",
            r"\toprule",
            head + r" \\",
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            rf"\caption{{{caption}}}",
            r"\end{table}",
            "",
        ]
    )


def write_tables(
    out_dir: Path,
    summary: Mapping[str, Any],
    rows_total: int,
    notes: Mapping[str, str],
    header: Sequence[str] = (),
) -> list[Path]:
    """table.md (overall + per style), table.csv, table.tex, table_{style}.md."""
    md = [
        *header,
        "## All styles",
        "",
        markdown_table(summary["overall"], summary["failures"], rows_total, notes),
    ]
    written = []
    for style, table in summary["by_style"].items():
        text = markdown_table(table, summary["failures"], rows_total, notes)
        md += [f"## Style: {style}", "", text]
        path = out_dir / f"table_{style}.md"
        path.write_text(f"# {style}\n\n{text}")
        written.append(path)
    (out_dir / "table.md").write_text("\n".join(md))
    write_csv(out_dir / "table.csv", summary)
    (out_dir / "table.tex").write_text(
        latex_table(summary["overall"], "EmojiDiff evaluation (mean, $\\pm$ half the 95\\% bootstrap CI).")
    )
    return [out_dir / "table.md", out_dir / "table.csv", out_dir / "table.tex", *written]
