"""`make eval` = `python -m benchmarks.evaluation.evaluate -c configs/eval/world.yaml`: the paper's tables.

1. Generation (`trainer.predict`, each rank its rows): every method of `methods` (and every point
   of `sweep`) generates one image per protocol row into `results/<run>/generations/<label>/`,
   reusing what an earlier run with the same method and protocol wrote (`benchmarks.evaluation.generate`).
2. Scoring (`trainer.test`, torchmetrics synced across ranks): identity similarity to the
   reference, identity leakage (similarity to the template's person), expression error against
   the template (evaluation analyser) and, on the world, against the template's ground-truth
   parameters, detection rate; FID and KID (TF-FID InceptionV3) and the world-FD against the
   ground-truth renders of the same rows (world).
3. Report into `out_dir`: table.md/.csv/.tex (mean and bootstrap 95% CI per metric, failed rows
   per method), table_{style}.md, grid.png (rows: pairs; columns: reference, template, each
   method), tradeoff.png (identity similarity against expression error; sweeps as curves),
   scores.json (every row's value), timings and the resolved config with its seed.

Scores use the *evaluation* analysers (`identity_encoder`, `expression_analyser`), never the
networks training optimises.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse import ArgumentParser
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.evaluation.all_methods import METHODS
from benchmarks.evaluation.fid_features import CachedFeatures, TFInceptionFeatures
from benchmarks.evaluation.figures import image_grid, study_tradeoff
from benchmarks.evaluation.generate import (
    RowChunks,
    _no_collate,
    chunk_for,
    generate_method,
    read_failures,
    read_generation,
)
from benchmarks.evaluation.methods import load_inputs
from benchmarks.evaluation.metrics import MethodRowMetrics, WorldFD, make_fid, make_kid
from benchmarks.evaluation.protocol import ProtocolRow, read_protocol
from benchmarks.evaluation.tables import markdown_table, summarise, sweep_label, tables_header, write_tables
from emojidiff.errors import MissingInputsError
from emojidiff.face import build_expression_analyser, build_identity_encoder
from emojidiff.images import to_tensor
from emojidiff.models.bundle import MODEL_FILE
from emojidiff.options import options_parser, parse_options
from emojidiff.packaged import resolve_backbone, resolve_model

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """An evaluation run.

    protocol: protocol CSV (`benchmarks.evaluation.protocol`). out_dir: where tables, figures and the
    generation cache go. methods: {label: method spec} (`benchmarks.evaluation.methods.METHODS`).
    sweep: {label: {init arg: [values]}}: extra generations of a method with one argument varied
        (e.g. expr_scale), drawn as its trade-off curve.
    identity_encoder / expression_analyser: the evaluation analysers (`emojidiff.face` specs).
    aligner: face aligner for the detection rate (None: every output counts as found: world).
    fid / world_fd: compute the set distances against the ground-truth renders (world rows).
    grid_rows: pairs shown in grid.png. bootstrap: resamples of each CI.
    only: score only these labels of `methods` (and their sweeps): the study in parts, joined
        again by `benchmarks.evaluation.merge`.
    """

    protocol: str = "configs/eval/protocol_world_small.csv"
    out_dir: str = "results/world"
    image_size: int = 64
    seed: int = 0
    methods: dict[str, Any] = field(default_factory=lambda: {"ground-truth": "ground-truth"})
    sweep: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    identity_encoder: Any = "world-id-eval"
    expression_analyser: Any = "world-expr-eval"
    aligner: Any = None
    fid: bool = True
    world_fd: bool = True
    kid_subset: int = 50
    grid_rows: int = 8
    bootstrap: int = 1000
    chunk: int = 32
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    only: list[str] | None = None


def sweep_labels(config: EvalConfig) -> dict[str, tuple[str, str, float]]:
    """{sweep label: (method label, argument, value)}."""
    out = {}
    for label, args in config.sweep.items():
        for arg, values in args.items():
            for v in values:
                out[sweep_label(label, arg, v)] = (label, arg, float(v))
    return out


def method_specs(config: EvalConfig) -> dict[str, Any]:
    """Every label to generate: the methods, then the sweep points (a method's spec with one init arg changed)."""
    specs: dict[str, Any] = dict(config.methods)
    for name, (label, arg, value) in sweep_labels(config).items():
        if label not in config.methods:
            raise ValueError(f"sweep: {label!r} is not a method label ({', '.join(config.methods)})")
        base = config.methods[label]
        base = {"name": base, "init_args": {}} if isinstance(base, str) else base
        specs[name] = {"name": base["name"], "init_args": {**(base.get("init_args") or {}), arg: value}}
    return specs


class ScoringModule(L.LightningModule):
    """test_step: a chunk of rows -> every method's outputs scored; metrics synced across ranks."""

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Protocol rows stay on the host: a step moves the tensors it builds from them."""
        return batch

    def __init__(
        self,
        labels: list[str],
        folders: Mapping[str, Path],
        config: EvalConfig,
        world: bool,
        set_labels: list[str] | None = None,
        style_counts: Mapping[str, int] | None = None,
    ):
        """set_labels: the labels that also get the set distances (FID, KID, world-FD; default all;
        sweep points get per-row metrics only). style_counts: {style: rows}; each style also gets
        its own FID and KID (the KID subset capped at the style's rows)."""
        super().__init__()
        set_labels = labels if set_labels is None else set_labels
        self.style_counts = dict(style_counts or {})
        self.labels, self.folders, self.config, self.world = labels, dict(folders), config, world
        enc = build_identity_encoder(config.identity_encoder)
        ana = build_expression_analyser(config.expression_analyser)
        self.encoder, self.analyser = enc, ana  # shared by every method's metrics

        self.row_metrics = nn.ModuleDict(
            {
                _key(label): MethodRowMetrics(
                    enc, ana, config.aligner, ground_truth=world, per_parameter=True
                )
                for label in labels
            }
        )
        self.set_metrics = nn.ModuleDict()
        if world and config.fid:
            inception = CachedFeatures(TFInceptionFeatures())  # one network, each image through it once
            for label in set_labels:
                self.set_metrics[_key(label) + "__fid"] = make_fid(feature=inception)
                self.set_metrics[_key(label) + "__kid"] = make_kid(
                    subset_size=config.kid_subset, subsets=50, feature=inception
                )
                for style, n in self.style_counts.items():  # the cache makes these free: no image runs twice
                    self.set_metrics[f"{_key(label)}__fid__{style}"] = make_fid(feature=inception)
                    self.set_metrics[f"{_key(label)}__kid__{style}"] = make_kid(
                        subset_size=max(2, min(config.kid_subset, n)), subsets=50, feature=inception
                    )
        if world and config.world_fd:
            specs = {"world-id": config.identity_encoder, "world-expr": config.expression_analyser}
            for label in set_labels:
                self.set_metrics[_key(label) + "__wfd"] = WorldFD(specs)
        self.seconds = 0.0

    def test_step(self, rows: list[ProtocolRow], batch_idx: int) -> None:
        t0 = time.perf_counter()
        inputs = load_inputs(rows, self.config.image_size)
        ref, tmpl = (
            to_tensor(inputs.references).to(self.device),
            to_tensor(inputs.templates).to(self.device),
        )
        gt = None if inputs.ground_truth is None else to_tensor(inputs.ground_truth).to(self.device)
        for label in self.labels:
            images = [read_generation(self.folders[label], r.row_id) for r in rows]
            keep = [i for i, im in enumerate(images) if im is not None]
            if not keep:
                continue
            ids = torch.tensor([rows[i].row_id for i in keep])
            out = to_tensor([images[i] for i in keep]).to(self.device)
            params = None
            if inputs.template_params is not None:
                params = torch.from_numpy(inputs.template_params[keep]).to(self.device)
            self.row_metrics[_key(label)].update_all(ids, out, ref[keep], tmpl[keep], params)
            if gt is None:
                continue
            for suffix in ("__fid", "__kid", "__wfd"):
                name = _key(label) + suffix
                if name in self.set_metrics:
                    self.set_metrics[name].update(out, real=False)
                    self.set_metrics[name].update(gt[keep], real=True)
            row_styles = [rows[i].style for i in keep]
            for style in set(row_styles):
                pick = [j for j, s in enumerate(row_styles) if s == style]
                for suffix in ("__fid", "__kid"):
                    name = f"{_key(label)}{suffix}__{style}"
                    if name in self.set_metrics:
                        self.set_metrics[name].update(out[pick], real=False)
                        self.set_metrics[name].update(gt[keep][pick], real=True)
        self.seconds += time.perf_counter() - t0

    def _seeded(self, fn):
        """fn() with torch's RNG seeded by the run's seed (KID draws random subsets in compute)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return fn()

    def results(
        self,
    ) -> tuple[
        dict[str, dict[str, dict[int, float]]],
        dict[str, dict[str, dict[str, float]]],
        dict[str, dict[int, str]],
    ]:
        """(per-row scores {label: {metric: {row: value}}}, set metrics {label: {"all" or a style: {...}}},
        metric failures {label: {row: reason}}). Collective under DDP: call on every rank."""
        scores, sets, failures = {}, {}, {}
        for label in self.labels:
            scores[label], failures[label] = {}, {}
            for metric, obj in self.row_metrics[_key(label)].items():
                rows = obj.per_row()
                scores[label][metric] = {
                    int(r): float(v) for r, v in zip(rows.row_ids, rows.values, strict=True)
                }
                if metric != "detected":
                    failures[label].update(
                        {r: f"{metric}: {why}" for r, why in rows.failed() if r not in failures[label]}
                    )
            sets[label] = {"all": {}}
            key = _key(label)
            if key + "__fid" in self.set_metrics:
                sets[label]["all"]["fid"] = _safe(
                    lambda k=key: float(self.set_metrics[k + "__fid"].compute())
                )
                sets[label]["all"]["kid"] = _safe(
                    lambda k=key: self._seeded(lambda: float(self.set_metrics[k + "__kid"].compute()[0]))
                )
            for style in self.style_counts:
                if f"{key}__fid__{style}" in self.set_metrics:
                    sets[label][style] = {
                        "fid": _safe(lambda k=f"{key}__fid__{style}": float(self.set_metrics[k].compute())),
                        "kid": _safe(
                            lambda k=f"{key}__kid__{style}": self._seeded(
                                lambda: float(self.set_metrics[k].compute()[0])
                            )
                        ),
                    }
            if key + "__wfd" in self.set_metrics:
                wfd = _safe(
                    lambda k=key: {n: float(v) for n, v in self.set_metrics[k + "__wfd"].compute().items()}
                )
                if isinstance(wfd, dict):
                    sets[label]["all"]["world_fd_id"] = wfd.get("world-id", float("nan"))
                    sets[label]["all"]["world_fd_expr"] = wfd.get("world-expr", float("nan"))
        return scores, sets, failures


def _safe(fn) -> Any:
    try:
        return fn()
    except (RuntimeError, ValueError) as err:  # too few images for a set distance
        log.warning("set metric not computed: %s", err)
        return float("nan")


def _key(label: str) -> str:
    """A label as a ModuleDict key (no dots)."""
    return label.replace(".", "_")


def _trainer_kwargs(config: EvalConfig) -> dict[str, Any]:
    return {
        "accelerator": config.accelerator,
        "devices": config.devices,
        "num_nodes": config.num_nodes,
        "strategy": config.strategy,
        "enable_progress_bar": True,
    }


def score(
    config: EvalConfig, rows: list[ProtocolRow], labels: list[str], out: Path
) -> tuple[Any, ScoringModule, L.Trainer]:
    folders = {label: out / "generations" / label for label in labels}
    world = all(r.kind == "world" for r in rows)
    style_counts: dict[str, int] = {}
    for r in rows:
        style_counts[r.style] = style_counts.get(r.style, 0) + 1
    module = ScoringModule(
        labels, folders, config, world, set_labels=list(config.methods), style_counts=style_counts
    )
    trainer = L.Trainer(
        **_trainer_kwargs(config), logger=False, enable_checkpointing=False, enable_model_summary=False
    )
    chunks = RowChunks(rows, chunk_for(len(rows), config.chunk, trainer.world_size), trainer.world_size)
    trainer.test(module, dataloaders=DataLoader(chunks, batch_size=1, collate_fn=_no_collate), verbose=False)
    return module.results(), module, trainer


_TRAINED_MODEL = re.compile(r"(?:^|/)outputs/train/([^/]+)/model/?$")


def _maker(path: str) -> str:
    """The command that writes a missing model folder."""
    run = _TRAINED_MODEL.search(path)
    if run:
        return f"`make train TRAIN_RUNS={run.group(1)}`"
    # a run outside outputs/train (the SD1.5/SDXL runs): the Makefile's train-plan names each run's folder
    return 'the make train run whose folder holds it (make train-plan TRAIN_RUNS="sd15 sd15_ica sdxl sdxl_ica" lists them)'


def missing_inputs(config: EvalConfig) -> list[str]:
    """One line per input of `config` that is not on disk: the protocol CSV, every method's model
    folder, backbone folder, reenactment model and weight folders, and the evaluation analysers'
    weight folders (packaged `emojidiff:` names resolved)."""
    lines = []
    if not Path(config.protocol).is_file():
        lines.append(f"protocol = {config.protocol!r}: no such file (configs/eval/ holds the protocol CSVs)")
    for label, spec in config.methods.items():  # a sweep point shares its method's inputs
        args = {} if isinstance(spec, str) else (spec.get("init_args") or {})
        key = f"methods.{label}.init_args"
        model, backbone, reenactor = args.get("model"), args.get("backbone"), args.get("reenactor")
        if model and not (resolve_model(model) / MODEL_FILE).is_file():
            lines.append(
                f"{key}.model = {str(model)!r}: no trained model there; make it with {_maker(str(model))}"
            )
        if backbone and not (resolve_backbone(backbone) / "model_index.json").is_file():
            lines.append(
                f"{key}.backbone = {str(backbone)!r}: no diffusers backbone folder (model_index.json) there"
            )
        if reenactor and not Path(reenactor).is_file():
            lines.append(
                f"{key}.reenactor = {str(reenactor)!r}: no such ONNX file (see benchmarks/evaluation/baselines/reenactment.py)"
            )
        lines += _missing_folders(args, key)
    for name in ("identity_encoder", "expression_analyser", "aligner"):  # the evaluation analysers' weights
        spec = getattr(config, name)
        if isinstance(spec, dict):
            lines += _missing_folders(spec.get("init_args") or {}, f"{name}.init_args")
    return lines


def _missing_folders(args: dict[str, Any], key: str) -> list[str]:
    """Local weight folders of a baseline (`*_folder` / `*_dir` arguments, also inside a nested
    encoder spec's init_args) that do not exist."""
    lines = []
    for name, value in args.items():
        if isinstance(value, dict):
            lines += _missing_folders(value.get("init_args") or {}, f"{key}.{name}.init_args")
        elif isinstance(value, str) and name.endswith(("_folder", "_dir")) and not Path(value).is_dir():
            lines.append(f"{key}.{name} = {value!r}: no such folder (the weights are read from local files)")
    return lines


def run(config: EvalConfig, dump: str = "") -> dict[str, Any] | None:
    """Generate (cached), score, and write the report; returns the summary on global rank 0.
    MissingInputsError, before any work, when any method's inputs are not on disk."""
    if config.only is not None:
        unknown = [label for label in config.only if label not in config.methods]
        if unknown:
            raise ValueError(f"only: {unknown} not in methods ({', '.join(config.methods)})")
        config = replace(
            config,
            methods={k: v for k, v in config.methods.items() if k in config.only},
            sweep={k: v for k, v in config.sweep.items() if k in config.only},
            only=None,
        )
    missing = missing_inputs(config)
    if missing:
        missing.append(
            "(train them first, or score the untrained adapters: make eval EVAL_CONFIG=configs/eval/untrained.yaml)"
        )
        raise MissingInputsError("benchmarks.evaluation.evaluate", missing)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dump:
        tmp = out / f".tmp-eval_config-{os.getpid()}.yaml"
        tmp.write_text(dump)
        os.replace(tmp, out / "eval_config.yaml")
    L.seed_everything(config.seed, verbose=False)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    rows = read_protocol(config.protocol)
    specs = method_specs(config)
    timings: dict[str, Any] = {"generation": {}}
    for label, spec in specs.items():
        method = METHODS.build(spec)
        timings["generation"][label] = generate_method(
            label, method, rows, out, config.image_size, _trainer_kwargs(config), config.chunk
        )
        del method
    t0 = time.perf_counter()
    (scores, sets, metric_failures), module, trainer = score(config, rows, list(specs), out)
    timings["scoring_s"] = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return None
    return write_report(config, rows, specs, scores, sets, metric_failures, timings, out)


def write_report(
    config: EvalConfig,
    rows: list[ProtocolRow],
    specs: Mapping[str, Any],
    scores,
    sets,
    metric_failures,
    timings: dict[str, Any],
    out: Path,
) -> dict[str, Any]:
    styles = {r.row_id: r.style for r in rows}
    failures = {
        label: {**read_failures(out / "generations" / label), **metric_failures.get(label, {})}
        for label in specs
    }
    main_labels = list(config.methods)
    notes = {
        label: "untrained"
        for label, spec in specs.items()
        if isinstance(spec, Mapping)
        and spec.get("name") in ("emojidiff", "identity-only", "two-stage")
        and not (spec.get("init_args") or {}).get("model")
    }
    summary = summarise(
        {k: scores[k] for k in main_labels},
        styles,
        {k: failures[k] for k in main_labels},
        {k: sets.get(k, {}) for k in main_labels},
        config.bootstrap,
    )
    sweep_summary = summarise(
        {k: scores[k] for k in specs if k not in main_labels}, styles, failures, sets, config.bootstrap
    )
    header = tables_header(config.protocol, len(rows), config.identity_encoder, config.expression_analyser)
    written = write_tables(out, summary, len(rows), notes, header)
    if sweep_summary["overall"]:
        with open(out / "table.md", "a") as f:
            f.write(
                "\n## Scale sweep\n\n"
                + markdown_table(sweep_summary["overall"], sweep_summary["failures"], len(rows))
            )
    _figures(config, rows, specs, summary, sweep_summary, out)
    report = {
        "summary": summary,
        "sweep": sweep_summary,
        "timings": timings,
        "rows": len(rows),
        "methods": {k: specs[k] for k in specs},
        "seed": config.seed,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
    (out / "scores.json").write_text(
        json.dumps({"scores": scores, "failures": failures}, sort_keys=True, default=float)
    )
    print(
        f"evaluation of {len(rows)} rows x {len(specs)} methods -> {out / 'table.md'} ({', '.join(p.name for p in written)})"
    )
    return report


def _figures(
    config: EvalConfig, rows: list[ProtocolRow], specs: Mapping[str, Any], summary, sweep_summary, out: Path
) -> None:
    # a seeded spread over the rows, so the grid mixes identities, templates and styles
    chosen = np.random.default_rng(config.seed).choice(
        len(rows), min(config.grid_rows, len(rows)), replace=False
    )
    pick = [rows[i] for i in sorted(chosen)]
    inputs = load_inputs(pick, config.image_size)
    columns = {
        label: [read_generation(out / "generations" / label, r.row_id) for r in pick]
        for label in config.methods
    }
    image_grid(
        out / "grid.png",
        inputs.references,
        inputs.templates,
        columns,
        [f"row {r.row_id} ({r.style})" for r in pick],
    )
    study_tradeoff(out / "tradeoff.png", specs, summary["overall"], sweep_summary["overall"], config.sweep)


def make_parser() -> ArgumentParser:
    return options_parser(EvalConfig)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, record = parse_options(EvalConfig, argv)
    try:
        return run(config, record)
    except MissingInputsError as err:
        print(f"{err.job}: missing inputs, nothing was run:", *err.lines, sep="\n", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
