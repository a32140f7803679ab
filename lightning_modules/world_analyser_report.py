"""The held-out report of a pair of world analysers, with torchmetrics; the job that writes and installs it.

    python -m lightning_modules.world_analyser_report -c configs/analysers/train_pair_report.yaml [--install true]

It reads the weights a fit wrote (`python -m emojidiff.cli fit -c configs/analysers/train_pair.yaml`,
`lightning_modules.world_analyser_training`: `weights_dir` holds both networks' <stem>.safetensors/.json
and `train_record.json`), evaluates them as packaged (fp16), writes the calibrated
`same_person_threshold` and the validation EER into the identity encoder's JSON, writes report.json
and report.md to `weights_dir`, and with `install` copies weights and report into
`emojidiff/face/weights/` (the report as `<report_stem>.md/.json`). A command rather than callbacks
of the fit: it evaluates the saved files every stage will load, runs again without retraining, and
`--install` is a plain option.

On held-out test identities (`TEST_IDENTITIES`) rendered with held-out seeds (`TEST_SEEDS`),
never seen in training:

- identity verification over all unordered pairs of a design (each identity rendered
  `eval_renders` times, styles cycled): EER, TAR@FAR=1e-3 (torchmetrics `BinaryROC`), overall, per
  style (both images in it) and cross-style; `same_person_threshold` is the EER threshold on
  separate validation identities (`VAL_IDENTITIES`, `VAL_SEEDS`), and the test FAR/FRR at it
  (`BinaryStatScores`) show it is not tuned on the test pairs;
- expression regression: `R2Score` and `MeanAbsoluteError` (natural units) per parameter, overall,
  per style and on renders whose irises are visible (gaze is unobservable otherwise);
- robustness: both again on degraded renders (`DEGRADATIONS`: what a decoder does to a face);
- agreement (when a reference pair is given, e.g. the training pair for the evaluation pair):
  Pearson correlation (`PearsonCorrCoef`) of the two encoders' cosine similarities on the same
  genuine and impostor pairs, and per parameter of the two regressors' predictions.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanAbsoluteError, PearsonCorrCoef, R2Score
from torchmetrics.classification import BinaryROC, BinaryStatScores

from datamodules.world_faces import HeldOutRenders
from emojidiff.degradations import down_up, gaussian_blur
from emojidiff.face.base import EXPRESSION_ANALYSERS, IDENTITY_ENCODERS
from emojidiff.face.world_models import WEIGHTS_DIR, WorldExpressionRegressor, WorldIdentityEncoder
from emojidiff.options import parse_options
from emojidiff.splits import TEST_IDENTITIES, TEST_SEEDS, VAL_IDENTITIES, VAL_SEEDS
from emojidiff.world import Expression

__all__ = [
    "DEGRADATIONS",
    "TRAIN_RECORD",
    "ReportOptions",
    "evaluate",
    "expression_scores",
    "infer",
    "main",
    "markdown",
    "report",
    "score_agreement",
    "verification",
    "write_report",
]

PROG = "python -m lightning_modules.world_analyser_report"
#: What the training module writes beside the weights: how they were trained (`report` reads it).
TRAIN_RECORD = "train_record.json"


@dataclass
class ReportOptions:
    """The held-out report of a trained pair of world analysers."""

    weights_dir: Path = Path("outputs/analysers")
    """the fit's model.init_args.export_dir: both networks' <stem>.safetensors/.json and train_record.json"""
    report_stem: str = "world_report"
    """name of the installed report (<report_stem>.md/.json in emojidiff/face/weights/)"""
    compare_with: tuple[str, str] | None = None
    """the other pair (identity encoder, expression regressor registry names) whose agreement with this
    one the report measures on the same images (None: no agreement block)"""
    eval_identities: int = 200
    """held-out test identities"""
    eval_renders: int = 12
    """renders per test identity of the identity design, split evenly over styles"""
    expr_eval_renders: int = 6
    """renders per test identity of the expression design"""
    val_identities: int = 100
    """validation identities of the threshold calibration"""
    val_renders: int = 6
    """renders per validation identity"""
    install: bool = False
    """copy weights and report into emojidiff/face/weights/ (the packaged copies every stage loads)"""


MIN_IRIS_PIXELS = 2  # renders with fewer visible iris pixels (both eyes) have unobservable gaze
FAR_TARGETS: tuple[float, ...] = (1e-3,)
#: The robustness block's degradations, (B, 3, H, W) [0, 1] -> same: what a generator's decoder does to a face.
DEGRADATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "clean": lambda x: x,
    "blur0.8": lambda x: gaussian_blur(x, 0.8).clamp(0, 1),
    "blur1.2": lambda x: gaussian_blur(x, 1.2).clamp(0, 1),
    "down2": lambda x: down_up(x, 2.0).clamp(0, 1),
}
ID_SEED_OFFSET = TEST_SEEDS[0]  # identity design's expression/scene seeds
EXPR_SEED_OFFSET = TEST_SEEDS[0] + (1 << 30)  # expression design's (other expressions)
CALIBRATION_SEED_OFFSET = VAL_SEEDS[0] + (1 << 31)  # threshold calibration's (apart from validation's)


@torch.no_grad()
def pair_scores(embeddings: Tensor, identities: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine scores of all unordered pairs (i < j) of (N, D) L2-normalised embeddings, mapped to
    [0, 1] as (cos + 1) / 2 (torchmetrics' ROC metrics read scores outside [0, 1] as logits), and
    (P,) int64 targets: 1 for same identity, 0 for impostor pairs."""
    iu, ju = torch.triu_indices(len(identities), len(identities), offset=1, device=embeddings.device)
    cos = (embeddings @ embeddings.T)[iu, ju]
    return ((cos + 1.0) / 2.0).clamp(0.0, 1.0), (identities[iu] == identities[ju]).long()


def infer(
    models: Mapping[str, Callable[[Tensor], Tensor]], renders: HeldOutRenders, degradation: str = "clean"
) -> dict[str, Tensor]:
    """Every model on every render of `renders`, degraded by `degradation` first.

    Returns the design's "identities" (N,), "styles" (N,), "expressions" (N, 10) and
    "iris_pixels" (N,), and each model's outputs (N, K) float32 under its name."""
    degrade = DEGRADATIONS[degradation]
    parts: dict[str, list[Tensor]] = {}
    for batch in DataLoader(renders, batch_size=None):
        images = degrade(batch.pop("images"))
        for name, model in models.items():
            batch[name] = model(images).float()
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def verification(scores: Tensor, same: Tensor, far_targets: Sequence[float] = FAR_TARGETS) -> dict[str, Any]:
    """Verification figures from (P,) pair scores in [0, 1] ((cos + 1) / 2, `pair_scores`) and
    (P,) targets (1 same person). Thresholds are reported as cosine similarities.

    eer (where FAR and FRR cross on torchmetrics' `BinaryROC`), eer_threshold, pair counts, mean
    genuine and impostor cosine, and for each FAR target the best TAR with FAR <= target and its
    threshold."""
    roc = BinaryROC(thresholds=None)
    roc.update(scores, same)
    fpr, tpr, thresholds = roc.compute()
    i = int(torch.argmin((fpr - (1.0 - tpr)).abs()))
    cos = scores.double() * 2.0 - 1.0
    genuine = same.bool()
    out: dict[str, Any] = {
        "eer": float((fpr[i] + 1.0 - tpr[i]) / 2),
        "eer_threshold": float(thresholds[i]) * 2.0 - 1.0,
        "genuine_pairs": int(genuine.sum()),
        "impostor_pairs": int((~genuine).sum()),
        "genuine_mean": float(cos[genuine].mean()),
        "impostor_mean": float(cos[~genuine].mean()),
    }
    for target in far_targets:
        j = int(torch.nonzero(fpr <= target).max())  # tpr grows with fpr: the last index allowed
        out[f"tar@far={target:g}"] = float(tpr[j])
        out[f"threshold@far={target:g}"] = float(thresholds[j]) * 2.0 - 1.0
    return out


def at_threshold(scores: Tensor, same: Tensor, threshold: float) -> dict[str, float]:
    """FAR and FRR of accepting pairs whose cosine exceeds `threshold` (`BinaryStatScores`)."""
    stats = BinaryStatScores(threshold=(threshold + 1.0) / 2.0)
    tp, fp, tn, fn, _ = stats(scores, same).tolist()
    return {"threshold": threshold, "far": fp / max(1, fp + tn), "frr": fn / max(1, fn + tp)}


def identity_report(
    embeddings: Tensor,
    identities: Tensor,
    styles: Tensor,
    style_names: Sequence[str],
    threshold: float | None = None,
) -> dict[str, Any]:
    """Verification on all unordered pairs of (N, D) embeddings: overall, per style (both images
    in it), cross-style (images in different styles), and with `threshold` FAR/FRR at it."""
    scores, same = pair_scores(embeddings, identities)
    iu, ju = torch.triu_indices(len(identities), len(identities), offset=1)
    report: dict[str, Any] = {"overall": verification(scores, same), "per_style": {}}
    for k, name in enumerate(style_names):
        m = (styles[iu] == k) & (styles[ju] == k)
        report["per_style"][name] = verification(scores[m], same[m])
    cross = styles[iu] != styles[ju]
    if bool(cross.any()):
        report["cross_style"] = verification(scores[cross], same[cross])
    if threshold is not None:
        report["at_threshold"] = at_threshold(scores, same, threshold)
    return report


def expression_scores(pred: Tensor, target: Tensor) -> dict[str, Any]:
    """R2 and MAE (natural units) per Expression parameter of (N, 10) predictions against the
    truth, and their means (`R2Score`, `MeanAbsoluteError`)."""
    names = Expression.names()
    r2 = R2Score(multioutput="raw_values")(pred, target)
    mae = MeanAbsoluteError(num_outputs=len(names))(pred, target)
    return {
        "renders": int(pred.shape[0]),
        "mean_r2": float(r2.mean()),
        "mean_mae": float(mae.mean()),
        "r2": dict(zip(names, r2.tolist(), strict=True)),
        "mae": dict(zip(names, mae.tolist(), strict=True)),
    }


def expression_report(
    pred: Tensor, target: Tensor, styles: Tensor, iris_pixels: Tensor, style_names: Sequence[str]
) -> dict[str, Any]:
    """`expression_scores` overall, per style and on the renders with visible irises."""
    report = {
        "overall": expression_scores(pred, target),
        "per_style": {
            name: expression_scores(pred[styles == k], target[styles == k])
            for k, name in enumerate(style_names)
        },
    }
    visible = iris_pixels >= MIN_IRIS_PIXELS
    report["iris_visible"] = {
        **expression_scores(pred[visible], target[visible]),
        "min_iris_pixels": MIN_IRIS_PIXELS,
    }
    return report


def score_agreement(scores_a: Tensor, scores_b: Tensor, same: Tensor) -> dict[str, float]:
    """Pearson correlation of two encoders' scores on the same (P,) pairs: genuine, impostor, all."""
    genuine = same.bool()

    def r(mask: Tensor) -> float:
        return float(PearsonCorrCoef()(scores_a[mask].double(), scores_b[mask].double()))

    return {"genuine": r(genuine), "impostor": r(~genuine), "all": r(torch.ones_like(genuine))}


def expression_agreement(pred_a: Tensor, pred_b: Tensor) -> dict[str, Any]:
    """Per-parameter Pearson correlation of two regressors' (N, 10) predictions on the same images."""
    names = Expression.names()
    r = PearsonCorrCoef(num_outputs=len(names))(pred_a.double(), pred_b.double())
    return {"mean": float(r.mean()), "per_parameter": dict(zip(names, r.tolist(), strict=True))}


def evaluate(
    id_model: WorldIdentityEncoder,
    expr_model: WorldExpressionRegressor,
    cfg: ReportOptions,
    meta: dict[str, Any],
    reference: tuple[WorldIdentityEncoder, WorldExpressionRegressor] | None = None,
    degradations: Sequence[str] = tuple(DEGRADATIONS),
) -> dict[str, Any]:
    """The full report of a trained pair (see the module docstring). `cfg`: the design sizes
    (eval_identities, eval_renders, expr_eval_renders, val_identities, val_renders); `meta`: the
    training record, whose "styles" and "size" (the training data's) the designs use. Sets
    `id_model.same_person_threshold` to the calibrated threshold (4 decimals)."""
    styles, size = list(meta["styles"]), int(meta["size"])
    calib = HeldOutRenders(
        cfg.val_identities, cfg.val_renders, VAL_IDENTITIES[0], CALIBRATION_SEED_OFFSET, styles, size
    )
    out = infer({"id": id_model}, calib)
    val = identity_report(out["id"], out["identities"], out["styles"], styles)
    threshold = round(val["overall"]["eer_threshold"], 4)
    id_model.same_person_threshold = threshold

    id_design = HeldOutRenders(
        cfg.eval_identities, cfg.eval_renders, TEST_IDENTITIES[0], ID_SEED_OFFSET, styles, size
    )
    expr_design = HeldOutRenders(
        cfg.eval_identities, cfg.expr_eval_renders, TEST_IDENTITIES[0], EXPR_SEED_OFFSET, styles, size
    )
    design_meta = {"identities": cfg.eval_identities, "first_identity": TEST_IDENTITIES[0]}
    id_models: dict[str, Callable[[Tensor], Tensor]] = {"id": id_model}
    expr_models: dict[str, Callable[[Tensor], Tensor]] = {"expr": expr_model}
    if reference is not None:
        id_models["ref"], expr_models["ref"] = reference
    ids = infer(id_models, id_design)
    exprs = infer(expr_models, expr_design)
    id_report = {
        **design_meta,
        "renders_per_identity": cfg.eval_renders,
        **identity_report(ids["id"], ids["identities"], ids["styles"], styles, threshold),
    }
    ex_report = {
        **design_meta,
        "renders_per_identity": cfg.expr_eval_renders,
        **expression_report(
            exprs["expr"], exprs["expressions"], exprs["styles"], exprs["iris_pixels"], styles
        ),
    }

    def row(ex: dict[str, Any], idr: dict[str, Any]) -> dict[str, float]:
        return {
            "expr_mae": ex["mean_mae"],
            "expr_r2": ex["mean_r2"],
            "id_eer": idr["eer"],
            "id_genuine_mean": idr["genuine_mean"],
        }

    robustness = {}
    for name in degradations:
        if name == "clean":
            robustness[name] = row(ex_report["overall"], id_report["overall"])
            continue
        d_ids = infer({"id": id_model}, id_design, name)
        d_exprs = infer({"expr": expr_model}, expr_design, name)
        robustness[name] = row(
            expression_scores(d_exprs["expr"], d_exprs["expressions"]),
            verification(*pair_scores(d_ids["id"], d_ids["identities"])),
        )
    report: dict[str, Any] = {
        "meta": {**meta, "val_identities": cfg.val_identities},
        "identity": id_report,
        "identity_validation": val,
        "expression": ex_report,
        "robustness": robustness,
    }
    if reference is not None:
        scores, same = pair_scores(ids["id"], ids["identities"])
        ref_scores, _ = pair_scores(ids["ref"], ids["identities"])
        report["agreement"] = {
            "reference": {
                "identity_encoder": meta.get("compare_with", ["?", "?"])[0],
                "expression_regressor": meta.get("compare_with", ["?", "?"])[1],
                "id_eer": verification(ref_scores, same)["eer"],
                "expr_mean_r2": expression_scores(exprs["ref"], exprs["expressions"])["mean_r2"],
                "expr_mean_mae": expression_scores(exprs["ref"], exprs["expressions"])["mean_mae"],
            },
            "identity_scores": score_agreement(scores, ref_scores, same),
            "expression": expression_agreement(exprs["expr"], exprs["ref"]),
        }
    return report


# --------------------------------------------------------------------------------------------
# writing


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (the installed world_report.md / world_eval_report.md)."""
    idr, exr, meta = report["identity"], report["expression"], report["meta"]
    id_name, expr_name = (
        meta.get("identity_encoder", "world-id"),
        meta.get("expression_regressor", "world-expr"),
    )
    pair = meta.get("role", "training")
    lines = [
        f"# World analysers, {pair} pair ({id_name}, {expr_name}): held-out report",
        "",
        f"Trained in {meta['train_seconds']:.0f} s ({meta['id_steps']} identity and {meta['expr_steps']} "
        f"expression steps on batches of {meta['batch']} fresh renders of identities "
        f"[{meta['identities'][0]}, {meta['identities'][1]}), shared while both train), seed {meta['seed']}, "
        f"{meta['threads']} torch thread{'s' if meta['threads'] != 1 else ''}: `{meta['command']}`. Evaluated with the fp16 weights as packaged, "
        "on held-out test identities and seeds.",
        "",
        f"## Identity verification ({id_name}, {idr['identities']} held-out identities x "
        f"{idr['renders_per_identity']} renders, unseen expressions)",
        "",
        "| pairs | genuine | impostor | EER | TAR@FAR=1e-3 | EER threshold |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(name: str, r: dict[str, Any]) -> str:
        return (
            f"| {name} | {r['genuine_pairs']} | {r['impostor_pairs']} | {100 * r['eer']:.2f}% | "
            f"{100 * r['tar@far=0.001']:.2f}% | {r['eer_threshold']:.3f} |"
        )

    lines.append(row("all", idr["overall"]))
    for name, r in idr["per_style"].items():
        lines.append(row(f"both {name}", r))
    if "cross_style" in idr:
        lines.append(row("cross-style", idr["cross_style"]))
    t = idr.get("at_threshold")
    if t:
        lines += [
            "",
            f"Packaged `same_person_threshold` = {t['threshold']:.3f} (EER threshold on "
            f"{meta['val_identities']} separate validation identities): on the test pairs FAR "
            f"{100 * t['far']:.3f}%, FRR {100 * t['frr']:.2f}%.",
        ]
    names = list(exr["overall"]["r2"])
    lines += [
        "",
        f"## Expression regression ({expr_name}, {exr['identities']} held-out identities x "
        f"{exr['renders_per_identity']} renders)",
        "",
        "| parameter | R2 | MAE | "
        + " | ".join(f"R2 {s}" for s in exr["per_style"])
        + " | R2 iris visible |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in exr["per_style"]) + " | ---: |",
    ]
    vis = exr["iris_visible"]
    for n in names:
        per = " | ".join(f"{r['r2'][n]:.3f}" for r in exr["per_style"].values())
        lines.append(
            f"| {n} | {exr['overall']['r2'][n]:.3f} | {exr['overall']['mae'][n]:.3f} | {per} | "
            f"{vis['r2'][n]:.3f} |"
        )
    per = " | ".join(f"**{r['mean_r2']:.3f}**" for r in exr["per_style"].values())
    lines.append(
        f"| **mean** | **{exr['overall']['mean_r2']:.3f}** | {exr['overall']['mean_mae']:.3f} | {per} | "
        f"**{vis['mean_r2']:.3f}** |"
    )
    lines += [
        "",
        f'MAE is in each parameter\'s natural units. "iris visible": the {vis["renders"]} of '
        f"{exr['overall']['renders']} renders with at least {vis['min_iris_pixels']} iris pixels; gaze is "
        "not observable in the others (eyes near-closed, or irises too small at 64 px).",
        "",
        "## Robustness: degraded renders (what a decoder does to a face)",
        "",
        f"Training softened {100 * meta.get('degrade', 0):.0f}% of the images (Gaussian blur or lost resolution). "
        "Same held-out designs as above, every image degraded: blur0.8/1.2 = Gaussian blur of that sigma in px, "
        "down2 = half the resolution and back.",
        "",
        "| images | expression MAE | expression mean R2 | identity EER | genuine cosine |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["robustness"].items():
        lines.append(
            f"| {name} | {r['expr_mae']:.3f} | {r['expr_r2']:.3f} | {100 * r['id_eer']:.2f}% | "
            f"{r['id_genuine_mean']:.3f} |"
        )
    lines.append("")
    agr = report.get("agreement")
    if agr:
        ref, sc, ex = agr["reference"], agr["identity_scores"], agr["expression"]
        lines += [
            f"## Agreement with the other pair ({ref['identity_encoder']}, {ref['expression_regressor']}) "
            "on the same held-out images",
            "",
            f"On these images the other pair scores identity EER {100 * ref['id_eer']:.2f}% and expression mean R2 "
            f"{ref['expr_mean_r2']:.3f} (MAE {ref['expr_mean_mae']:.3f}). Pearson correlation of the two identity "
            f"encoders' cosine similarities on the same pairs: genuine {sc['genuine']:.3f}, impostor "
            f"{sc['impostor']:.3f}, all {sc['all']:.3f}. Per-parameter correlation of the two regressors' "
            "predictions:",
            "",
            "| " + " | ".join(ex["per_parameter"]) + " | mean |",
            "| " + " | ".join("---:" for _ in ex["per_parameter"]) + " | ---: |",
            "| "
            + " | ".join(f"{v:.3f}" for v in ex["per_parameter"].values())
            + f" | **{ex['mean']:.3f}** |",
            "",
        ]
    return "\n".join(lines)


def print_summary(report: dict[str, Any], console: Console | None = None) -> None:
    """A short table of the headline figures."""
    idr, exr = report["identity"], report["expression"]
    table = Table(
        title=f"world analysers ({report['meta'].get('role', 'training')} pair) on held-out identities"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("EER (all pairs)", f"{100 * idr['overall']['eer']:.2f}%")
    table.add_row("TAR@FAR=1e-3", f"{100 * idr['overall']['tar@far=0.001']:.2f}%")
    for name, r in idr["per_style"].items():
        table.add_row(f"EER {name}", f"{100 * r['eer']:.2f}%")
    if "cross_style" in idr:
        table.add_row("EER cross-style", f"{100 * idr['cross_style']['eer']:.2f}%")
    table.add_row("expression mean R2", f"{exr['overall']['mean_r2']:.3f}")
    table.add_row("expression mean MAE", f"{exr['overall']['mean_mae']:.3f}")
    for name, r in report["robustness"].items():
        table.add_row(f"{name}: MAE / EER", f"{r['expr_mae']:.3f} / {100 * r['id_eer']:.2f}%")
    if "agreement" in report:
        a = report["agreement"]
        table.add_row(
            "score correlation genuine / impostor",
            f"{a['identity_scores']['genuine']:.3f} / {a['identity_scores']['impostor']:.3f}",
        )
        table.add_row("expression correlation (mean)", f"{a['expression']['mean']:.3f}")
    table.add_row("train seconds", f"{report['meta']['train_seconds']:.0f}")
    (console or Console()).print(table)


def write_report(report: dict[str, Any], out: Path) -> None:
    """report.json and report.md in `out`, and the summary table on the console."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print_summary(report)


# --------------------------------------------------------------------------------------------
# the job


def report(options: ReportOptions, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate the pair in `options.weights_dir`, write its report there (and the calibrated threshold
    into the identity encoder's JSON); with `options.install`, install weights and report."""
    folder = options.weights_dir
    record_path = folder / TRAIN_RECORD
    if not record_path.is_file():
        raise FileNotFoundError(
            f"weights_dir {folder}: no {TRAIN_RECORD} there (expected the export_dir of a "
            "fit of configs/analysers/*_pair.yaml)"
        )
    trained = json.loads(record_path.read_text())
    id_path = folder / f"{trained['id_stem']}.safetensors"
    expr_path = folder / f"{trained['expr_stem']}.safetensors"
    id_model = IDENTITY_ENCODERS.get(trained["identity_encoder"])(weights=id_path)
    expr_model = EXPRESSION_ANALYSERS.get(trained["expression_regressor"])(weights=expr_path)
    meta = {k: v for k, v in trained.items() if k not in ("config", "id_net", "expr_net", "log_dir")}
    meta.update(
        compare_with=options.compare_with,
        id_params=sum(p.numel() for p in id_model.parameters()),
        expr_params=sum(p.numel() for p in expr_model.parameters()),
        report_command=shlex.join([*PROG.split(), *argv]),
        report_options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
    )
    reference = None
    if options.compare_with is not None:
        reference = (
            IDENTITY_ENCODERS.build(options.compare_with[0]),
            EXPRESSION_ANALYSERS.build(options.compare_with[1]),
        )
    start = time.perf_counter()
    result = evaluate(id_model, expr_model, options, meta, reference=reference)
    result["meta"]["eval_seconds"] = time.perf_counter() - start
    # the calibrated verification threshold goes into the weights' JSON
    id_model.save(id_path, extra={"validation_eer": result["identity_validation"]["overall"]["eer"]})
    write_report(result, folder)
    if options.install:
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        for stem in (trained["id_stem"], trained["expr_stem"]):
            for suffix in (".safetensors", ".json"):
                shutil.copy2(folder / f"{stem}{suffix}", WEIGHTS_DIR / f"{stem}{suffix}")
        shutil.copy2(folder / "report.md", WEIGHTS_DIR / f"{options.report_stem}.md")
        shutil.copy2(folder / "report.json", WEIGHTS_DIR / f"{options.report_stem}.json")
        print(f"installed weights and report into {WEIGHTS_DIR}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, _ = parse_options(ReportOptions, argv, prog=PROG, description=__doc__)
    return report(options, argv)


if __name__ == "__main__":
    main()
