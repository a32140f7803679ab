"""One evaluation record from several runs of `benchmarks.evaluation.evaluate` that scored different methods.

    python -m benchmarks.evaluation.merge docs/results results/world-seeds --out results/world

Each part is a folder with `report.json`, `scores.json` and `eval_config.yaml`: an evaluation's
`out_dir`, or the results page's assets folder (`docs/results/`), which keeps all three. A study
can then be scored in pieces (methods trained on other machines or days, the seed runs after the
rest) and `benchmarks.evaluation.results_page` reads the union as if one run had scored every method.

That is sound because nothing a method's record holds depends on the other methods of its run:
row scores, bootstrap CIs (a fixed bootstrap seed per cell) and the set metrics (FID/KID/world-FD
against the ground-truth renders of the same rows). So the parts must agree on what makes the
numbers comparable (the protocol file and its rows, the seed, the image size, the bootstrap count,
the evaluation analysers and the set metrics computed) and a method scored in two parts must have
the same spec (its later part is kept). The union's tables and trade-off plot are written again;
`grid.png` (which needs the generated images) is the last part's that has one, and `merged_from` in
`report.json` names every part and the methods it gave.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.evaluation.figures import study_tradeoff
from benchmarks.evaluation.tables import markdown_table, tables_header, write_tables
from emojidiff.options import parse_options

# The evaluation settings every part must share for its numbers to sit in one table.
SHARED_KEYS = (
    "protocol",
    "image_size",
    "seed",
    "bootstrap",
    "identity_encoder",
    "expression_analyser",
    "fid",
    "world_fd",
)


def read_part(folder: Path) -> dict[str, Any]:
    """A part's report, row scores and resolved config; a missing file is named."""
    part: dict[str, Any] = {"folder": folder}
    for name in ("report.json", "scores.json", "eval_config.yaml"):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; a part is an evaluation's out_dir (python -m benchmarks.evaluation.evaluate)"
            )
        text = path.read_text()
        part[name] = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
    return part


def _check_compatible(first: Mapping[str, Any], other: Mapping[str, Any]) -> None:
    for key in SHARED_KEYS:
        a, b = first["eval_config.yaml"].get(key), other["eval_config.yaml"].get(key)
        if a != b:
            raise ValueError(
                f"{other['folder'] / 'eval_config.yaml'}: {key} is {b!r}, but "
                f"{first['folder'] / 'eval_config.yaml'} has {a!r}; parts must share {', '.join(SHARED_KEYS)}"
            )
    if first["report.json"]["rows"] != other["report.json"]["rows"]:
        raise ValueError(
            f"{other['folder'] / 'report.json'}: rows {other['report.json']['rows']} != "
            f"{first['report.json']['rows']} in {first['folder'] / 'report.json'}"
        )


def _union_summary(sections: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"overall": {}, "by_style": {}, "failures": {}}
    for s in sections:
        out["overall"].update(s.get("overall", {}))
        out["failures"].update(s.get("failures", {}))
        for style, table in s.get("by_style", {}).items():
            out["by_style"].setdefault(style, {}).update(table)
    return out


def _drop(part: dict[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """The part without the methods `labels` (and their sweep points), as if it had not scored them."""
    if not labels:
        return part
    gone = set(labels)

    def keep(label: str) -> bool:
        return label not in gone and label.split("@", 1)[0] not in gone

    report, scores, config = part["report.json"], part["scores.json"], part["eval_config.yaml"]
    part["report.json"] = {
        **report,
        "methods": {k: v for k, v in report["methods"].items() if keep(k)},
        "summary": _filter_summary(report["summary"], keep),
        "sweep": _filter_summary(report.get("sweep", {}), keep),
        "timings": {
            **report.get("timings", {}),
            "generation": {
                k: v for k, v in report.get("timings", {}).get("generation", {}).items() if keep(k)
            },
        },
    }
    part["scores.json"] = {key: {k: v for k, v in table.items() if keep(k)} for key, table in scores.items()}
    part["eval_config.yaml"] = {
        **config,
        "methods": {k: v for k, v in (config.get("methods") or {}).items() if keep(k)},
        "sweep": {k: v for k, v in (config.get("sweep") or {}).items() if keep(k)} or None,
    }
    return part


def _filter_summary(section: Mapping[str, Any], keep) -> dict[str, Any]:
    return {
        "overall": {k: v for k, v in section.get("overall", {}).items() if keep(k)},
        "by_style": {
            s: {k: v for k, v in t.items() if keep(k)} for s, t in section.get("by_style", {}).items()
        },
        "failures": {k: v for k, v in section.get("failures", {}).items() if keep(k)},
    }


def merge(folders: Sequence[Path], out: Path, drop: Sequence[str] = ()) -> dict[str, Any]:
    """Write the union of the parts into `out` (report.json, scores.json, eval_config.yaml, tables,
    tradeoff.png, grid.png); returns the merged report. `drop`: methods left out of every part (a
    method a study no longer has, e.g. a renamed run scored again under its new label)."""
    if len(folders) < 2:
        raise ValueError("merge_eval: give at least two parts")
    parts = [_drop(read_part(Path(f)), drop) for f in folders]
    first = parts[0]
    for p in parts[1:]:
        _check_compatible(first, p)
    specs: dict[str, Any] = {}
    main: dict[str, Any] = {}
    sweep: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for p in parts:
        config, report = p["eval_config.yaml"], p["report.json"]
        for label, spec in report["methods"].items():
            if label in specs and specs[label] != spec:
                raise ValueError(
                    f"{p['folder'] / 'report.json'}: method {label!r} is {spec!r}, but "
                    f"{origin[label]} scored it as {specs[label]!r}; give it another label"
                )
            specs[label] = spec
            origin[label] = str(p["folder"] / "report.json")
        main.update(config.get("methods") or {})
        sweep.update(config.get("sweep") or {})
    scores: dict[str, Any] = {}
    failures: dict[str, Any] = {}
    for p in parts:
        scores.update(p["scores.json"]["scores"])
        failures.update(p["scores.json"].get("failures", {}))
    summary = _union_summary([p["report.json"]["summary"] for p in parts])
    sweep_summary = _union_summary([p["report.json"].get("sweep", {}) for p in parts])
    generation: dict[str, Any] = {}
    for p in parts:
        generation.update(p["report.json"].get("timings", {}).get("generation", {}))
    report = {
        "summary": summary,
        "sweep": sweep_summary,
        "rows": first["report.json"]["rows"],
        "methods": specs,
        "seed": first["report.json"].get("seed"),
        "timings": {
            "generation": generation,
            "scoring_s": sum(float(p["report.json"].get("timings", {}).get("scoring_s", 0.0)) for p in parts),
        },
        "merged_from": [
            {"part": str(p["folder"]), "methods": list(p["report.json"]["methods"])} for p in parts
        ],
    }

    out.mkdir(parents=True, exist_ok=True)
    config = {**first["eval_config.yaml"], "out_dir": str(out), "methods": main, "sweep": sweep or None}
    (out / "eval_config.yaml").write_text(
        "# merged by python -m benchmarks.evaluation.merge "
        + " ".join(str(f) for f in folders)
        + f" --out {out}"
        + "".join(f" --drop+={d}" for d in drop)
        + "\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    header = tables_header(
        config["protocol"],
        report["rows"],
        config["identity_encoder"],
        config["expression_analyser"],
        f"; merged from {len(parts)} runs",
    )
    main_summary = {
        "overall": {k: v for k, v in summary["overall"].items() if k in main},
        "by_style": {s: {k: v for k, v in t.items() if k in main} for s, t in summary["by_style"].items()},
        "failures": {k: v for k, v in summary["failures"].items() if k in main},
    }
    write_tables(out, main_summary, report["rows"], {}, header)
    if sweep_summary["overall"]:
        with open(out / "table.md", "a") as f:
            f.write(
                "\n## Scale sweep\n\n"
                + markdown_table(sweep_summary["overall"], sweep_summary["failures"], report["rows"])
            )
    study_tradeoff(out / "tradeoff.png", specs, main_summary["overall"], sweep_summary["overall"], sweep)
    # the latest part's grid: like its scores, it replaces what earlier parts showed
    grid = next(
        (p["folder"] / "grid.png" for p in reversed(parts) if (p["folder"] / "grid.png").is_file()), None
    )
    if grid is not None and grid.resolve() != (out / "grid.png").resolve():
        shutil.copy2(grid, out / "grid.png")
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
    (out / "scores.json").write_text(
        json.dumps({"scores": scores, "failures": failures}, sort_keys=True, default=float)
    )
    return report


@dataclass
class MergeConfig:
    """Evaluation folders to join into one record.

    Args:
        parts: evaluation folders (report.json, scores.json, eval_config.yaml).
        out: folder for the merged record.
        drop: methods to leave out of every part (superseded rows, e.g. a renamed run scored again).
    """

    parts: list[Path]
    out: Path
    drop: list[str] = field(default_factory=list)


def main(argv: list[str] | None = None) -> Path:
    args, _ = parse_options(MergeConfig, argv, positional=["parts"])
    report = merge(args.parts, args.out, args.drop)
    print(f"merged {len(report['merged_from'])} evaluations ({len(report['methods'])} methods) -> {args.out}")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
