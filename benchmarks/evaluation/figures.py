"""Figures of an evaluation run: the image grid and the identity-vs-expression trade-off plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from benchmarks.evaluation.tables import sweep_label
from emojidiff.plots import pyplot


def image_grid(
    path: Path,
    references: np.ndarray,
    templates: np.ndarray,
    columns: Mapping[str, Sequence[np.ndarray | None]],
    titles: Sequence[str],
    scale: int = 2,
) -> Path:
    """PNG grid: one row per pair; columns reference | template | each method (a grey tile where a
    method failed). references/templates: uint8 (R, S, S, 3); columns: {label: R images or None}."""
    plt = pyplot()

    names = ["reference", "template", *columns]
    r, s = len(references), references.shape[1]
    fig, axes = plt.subplots(
        r, len(names), figsize=(len(names) * s * scale / 72, r * s * scale / 72 + 0.4), dpi=72, squeeze=False
    )
    for i in range(r):
        tiles = [references[i], templates[i], *[col[i] for col in columns.values()]]
        for j, tile in enumerate(tiles):
            ax = axes[i, j]
            ax.imshow(np.full((s, s, 3), 128, np.uint8) if tile is None else tile, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(names[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(titles[i], fontsize=6)
    fig.tight_layout(pad=0.2)
    fig.savefig(path)
    plt.close(fig)
    return path


def tradeoff_plot(
    path: Path,
    points: Mapping[str, tuple[float, float, float, float]],
    curves: Mapping[str, Sequence[tuple[float, float, float]]] | None = None,
) -> Path:
    """Identity similarity (y, higher better) against expression error (x, lower better).

    points: {label: (expr_err, expr_ci_half, id_sim, id_ci_half)}; curves: {label: [(scale,
    expr_err, id_sim), ...]} from a scale sweep, drawn through the method's points.
    """
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    colours = plt.get_cmap("tab20").colors  # a study has more methods than the default cycle's 10 colours
    for i, (label, (ex, ex_ci, idv, id_ci)) in enumerate(points.items()):
        if np.isfinite(ex) and np.isfinite(idv):
            ax.errorbar(
                ex,
                idv,
                xerr=ex_ci,
                yerr=id_ci,
                fmt="o",
                capsize=3,
                label=label,
                color=colours[i % len(colours)],
            )
    for label, curve in (curves or {}).items():
        pts = sorted(curve)
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        ax.plot(xs, ys, "-", alpha=0.6, label=f"{label} (scale sweep)")
        for scale, x, y in pts:
            ax.annotate(f"{scale:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("expression error vs template (lower is better)")
    ax.set_ylabel("identity similarity vs reference (higher is better)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def study_tradeoff(
    path: Path,
    specs: Mapping[str, object],
    overall: Mapping[str, Mapping[str, object]],
    sweep_overall: Mapping[str, Mapping[str, object]],
    sweep: Mapping[str, Mapping[str, Sequence[float]]],
) -> Path:
    """The trade-off plot of an evaluation: each method of `overall` a point, each `sweep` (label ->
    {init arg: values}) a curve through its points (`sweep_overall`, labelled `label@arg=value`) and
    the method's own point at its configured value (1 where the spec does not set it)."""

    def point(cells: Mapping[str, object]) -> tuple[float, float, float, float]:
        ex, idv = cells.get("expression_error", {}), cells.get("identity_similarity", {})
        return (
            ex.get("mean", np.nan),
            (ex.get("high", np.nan) - ex.get("low", np.nan)) / 2,
            idv.get("mean", np.nan),
            (idv.get("high", np.nan) - idv.get("low", np.nan)) / 2,
        )

    points = {label: point(cells) for label, cells in overall.items()}
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for label, grid in sweep.items():
        if label not in points:
            continue
        for arg, values in grid.items():
            for value in values:
                p = point(sweep_overall.get(sweep_label(label, arg, value), {}))
                curves.setdefault(label, []).append((float(value), p[0], p[2]))
            spec = specs.get(label)
            init = spec.get("init_args", {}) if isinstance(spec, Mapping) else {}
            curves[label].append((float(init.get(arg) or 1.0), points[label][0], points[label][2]))
    return tradeoff_plot(path, points, curves)
