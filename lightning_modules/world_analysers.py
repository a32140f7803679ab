"""Train a pair of world analysers (identity encoder + expression regressor) with Lightning.

    python -m lightning_modules.world_analysers --out outputs/analyzers [--role train|eval] [--seed N]
        [--budget-minutes N] [--install]

Every step renders a fresh batch (`datamodules.world_faces.WorldFaceStream`: identities from the
role's training range, random expressions, styles and scene seeds, half the images softened as a
decoder softens them), and both networks train on it:

- identity: CosFace (additive cosine margin) classification over the training identities;
- expression: smooth-L1 regression of the 10 Expression parameters scaled to [0, 1].

The identity encoder trains for `id_steps`, the regressor for `expr_steps` (they share each
rendered batch while both train). Validation (`val/id_eer`, `val/expr_r2`, `val/expr_mae`) runs
on held-out validation identities. After training the weights are saved as fp16 safetensors and
the saved weights are evaluated on held-out test identities and seeds
(`lightning_modules.world_analyser_report`).

Roles (`ROLES`): "train" is the training pair ("world-id"/"world-expr", `make analyzers`, seed 0,
`ANALYSER_TRAIN_IDENTITIES`); "eval" the evaluation pair ("world-id-eval"/"world-expr-eval",
`make eval-analyzers`, seed 1, `EVAL_ANALYSER_TRAIN_IDENTITIES`, other architectures), whose
report adds the agreement of the two pairs on the same held-out images.

Writes to --out: <stem>.{safetensors,json} for both analysers, report.json, report.md, config.json
(the resolved config, seed and step counts included; written before training and again after),
logs/ (TensorBoard); --install copies weights and report into emojidiff/face/weights/.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, R2Score
from torchmetrics.classification import BinaryEER

from datamodules.world_faces import WorldFaceDataModule
from emojidiff.face.base import EXPRESSION_ANALYZERS, IDENTITY_ENCODERS
from emojidiff.face.world_models import WEIGHTS_DIR, WorldExpressionRegressor, WorldIdentityEncoder
from emojidiff.splits import ANALYSER_TRAIN_IDENTITIES, EVAL_ANALYSER_TRAIN_IDENTITIES
from emojidiff.world import STYLES
from lightning_modules.world_analyser_report import evaluate, pair_scores, write_report

__all__ = ["ROLES", "AnalyserConfig", "CosFaceHead", "WorldAnalyserModule", "build_module", "fit", "main", "run"]


class CosFaceHead(nn.Module):
    """Additive cosine margin (CosFace): logits s * (cos(theta_j) - m [j = y]) over `num_classes`.

    Input: (B, D) embeddings (normalised here) and (B,) int64 labels; output (B, num_classes) logits.
    """

    def __init__(self, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos = F.linear(F.normalize(embeddings, dim=-1), F.normalize(self.weight, dim=-1))
        return self.scale * (cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype))


def warmup_cosine(steps: int, warmup: float, floor: float = 0.02) -> Callable[[int], float]:
    """LR factor of step k: linear warm-up over `warmup` of the steps, then cosine decay to
    `floor` of the peak at `steps` (and `floor` after it)."""
    warm = max(1, int(round(warmup * steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, steps - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


class WorldAnalyserModule(L.LightningModule):
    """Trains `identity_encoder` (CosFace through `cosface_head`) for `id_steps` and
    `expression_regressor` (smooth-L1 on [0, 1]-scaled parameters, transition `expr_beta`) for
    `expr_steps`, on one stream of batches {"images" (B, 3, S, S) [0, 1], "labels" (B,) class
    indices, "expressions" (B, 10) natural units}. A network past its step count is not run (its
    parameters get no gradient, so AdamW leaves them alone).

    Validation batches ("images", "identities", "expressions") hold whole identities: same-person
    and impostor pairs are scored within each batch (`val/id_eer`, torchmetrics BinaryEER), the
    regressor by `val/expr_r2` (mean R2 over the 10 parameters) and `val/expr_mae` (natural units).
    """

    def __init__(
        self,
        identity_encoder: WorldIdentityEncoder,
        expression_regressor: WorldExpressionRegressor,
        cosface_head: CosFaceHead,
        id_steps: int = 1000,
        expr_steps: int = 3600,
        id_lr: float = 3e-3,
        id_weight_decay: float = 5e-4,
        expr_lr: float = 3e-3,
        expr_weight_decay: float = 1e-4,
        expr_beta: float = 1.0,
        warmup: float = 0.05,
    ):
        super().__init__()
        if id_steps < 1 or expr_steps < 1:
            raise ValueError(f"id_steps and expr_steps must be >= 1, got {id_steps} and {expr_steps}")
        # Both networks train: unfrozen, and in train mode (Lightning keeps the modes it finds, and
        # an analyser is built in eval mode).
        identity_encoder.freeze = expression_regressor.freeze = False
        self.identity_encoder = identity_encoder.requires_grad_(True).train()
        self.expression_regressor = expression_regressor.requires_grad_(True).train()
        self.cosface_head = cosface_head
        self.save_hyperparameters(ignore=["identity_encoder", "expression_regressor", "cosface_head"])
        self.val_id_eer = BinaryEER()
        self.val_expr_r2 = R2Score()
        self.val_expr_mae = MeanAbsoluteError()

    @property
    def total_steps(self) -> int:
        return max(self.hparams.id_steps, self.hparams.expr_steps)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hp, step = self.hparams, self.global_step
        images, labels, exprs = batch["images"], batch["labels"], batch["expressions"]
        loss = images.new_zeros(())
        if step < hp.id_steps:
            logits = self.cosface_head(self.identity_encoder(images), labels)
            id_loss = F.cross_entropy(logits, labels)
            self.log("train/id_loss", id_loss, prog_bar=True)
            self.log("train/id_acc", (logits.argmax(1) == labels).float().mean())
            loss = loss + id_loss
        if step < hp.expr_steps:
            reg = self.expression_regressor
            pred, target = reg.describe_unit(images), reg.to_unit(exprs)
            expr_loss = F.smooth_l1_loss(pred, target, beta=hp.expr_beta)
            self.log("train/expr_loss", expr_loss, prog_bar=True)
            self.log("train/expr_mae01", (pred.detach() - target).abs().mean())
            loss = loss + expr_loss
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images, exprs = batch["images"], batch["expressions"]
        scores, same = pair_scores(self.identity_encoder(images), batch["identities"])
        self.val_id_eer.update(scores, same)
        reg = self.expression_regressor
        pred = reg(images)
        self.val_expr_r2.update(reg.to_unit(pred), reg.to_unit(exprs))
        self.val_expr_mae.update(pred, exprs)
        self.log("val/id_eer", self.val_id_eer, prog_bar=True)
        self.log("val/expr_r2", self.val_expr_r2, prog_bar=True)
        self.log("val/expr_mae", self.val_expr_mae)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the two networks and the CosFace weights (no decay on those), each network's
        group on its own warm-up + cosine schedule over its own step count, stepped every step."""
        hp = self.hparams
        optimizer = torch.optim.AdamW([
            {"params": self.identity_encoder.parameters(), "lr": hp.id_lr, "weight_decay": hp.id_weight_decay},
            {"params": self.cosface_head.parameters(), "lr": hp.id_lr, "weight_decay": 0.0},
            {"params": self.expression_regressor.parameters(), "lr": hp.expr_lr, "weight_decay": hp.expr_weight_decay},
        ])
        id_factor, expr_factor = warmup_cosine(hp.id_steps, hp.warmup), warmup_cosine(hp.expr_steps, hp.warmup)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [id_factor, id_factor, expr_factor])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# --------------------------------------------------------------------------------------------
# the recipe


@dataclass
class AnalyserConfig:
    """Everything a run depends on; written to config.json (with the resolved step counts).

    The defaults are the training pair's recipe (`make analyzers`); `ROLES["eval"]` overrides
    what the evaluation pair does differently."""

    role: str = "train"
    seed: int = 0
    threads: int = 2
    identity_encoder: str = "world-id"  # registry name: its class gives the default architecture
    expression_regressor: str = "world-expr"
    id_arch: dict[str, Any] = field(default_factory=dict)  # NetConfig overrides
    expr_arch: dict[str, Any] = field(default_factory=dict)
    identities: tuple[int, int] = ANALYSER_TRAIN_IDENTITIES  # identity classes (and regressor identities)
    size: int = 64
    styles: tuple[str, ...] = STYLES
    augment: bool = True  # light photometric noise, see `datamodules.world_faces.augment`
    # Fraction of training images softened as a generator softens them (Gaussian blur or lost
    # resolution), so the analysers read VAE decodes and one-step reconstructions as they read
    # clean renders. 0 turns it off (the analysers of the first release).
    degrade: float = 0.5
    batch: int = 64  # renders per step, shared by both networks
    id_steps: int = 1000
    expr_steps: int = 3600  # still improving here: 2400 steps gave mean R2 0.89, 3600 0.92
    warmup: float = 0.05  # fraction of each network's steps with linear warm-up, then cosine to 2%
    id_lr: float = 3e-3
    id_weight_decay: float = 5e-4
    cosface_scale: float = 30.0
    cosface_margin: float = 0.25
    expr_lr: float = 3e-3
    expr_weight_decay: float = 1e-4
    # Smooth-L1 transition in [0, 1] target units. At 1.0 every error is in the quadratic regime
    # (0.5 * MSE): R2 is an MSE figure, and the subtle gaze parameters learn far faster than
    # under L1 (gaze_y R2 0.12 -> 0.48 at 2000 steps in our runs).
    expr_beta: float = 1.0
    val_every: int = 500  # steps between validation passes
    # time budget: when set, both step counts are scaled to it (and recorded in config.json)
    budget_minutes: float | None = None
    # output names: <stem>.safetensors/.json in --out and, with --install, in emojidiff/face/weights/
    id_stem: str = "world_id"
    expr_stem: str = "world_expr"
    report_stem: str = "world_report"  # installed report name
    # the other pair, whose agreement with this one the report measures (None: no agreement block)
    compare_with: tuple[str, str] | None = None
    # held-out report sizes (see lightning_modules.world_analyser_report)
    eval_identities: int = 200
    eval_renders: int = 12  # per identity, split evenly over styles
    expr_eval_renders: int = 6  # per held-out identity
    val_identities: int = 100  # threshold calibration
    val_renders: int = 6


#: What each role changes from the defaults (the "train" role is the defaults).
ROLES: dict[str, dict[str, Any]] = {
    "train": {},
    "eval": {
        "seed": 1,
        "identity_encoder": "world-id-eval",
        "expression_regressor": "world-expr-eval",
        "identities": EVAL_ANALYSER_TRAIN_IDENTITIES,
        "id_stem": "world_id_eval",
        "expr_stem": "world_expr_eval",
        "report_stem": "world_eval_report",
        "compare_with": ("world-id", "world-expr"),
    },
}


def build_module(cfg: AnalyserConfig) -> WorldAnalyserModule:
    """Fresh (random) networks of the config's registry classes and architectures, in the module."""
    id_net = IDENTITY_ENCODERS.get(cfg.identity_encoder)(weights=None, arch=cfg.id_arch)
    expr_net = EXPRESSION_ANALYZERS.get(cfg.expression_regressor)(weights=None, arch=cfg.expr_arch)
    if not isinstance(id_net, WorldIdentityEncoder) or not isinstance(expr_net, WorldExpressionRegressor):
        raise ValueError(f"{cfg.identity_encoder!r} / {cfg.expression_regressor!r} are not world analysers")
    head = CosFaceHead(id_net.embedding_dim, cfg.identities[1] - cfg.identities[0], cfg.cosface_scale,
                       cfg.cosface_margin)
    return WorldAnalyserModule(id_net, expr_net, head, id_steps=cfg.id_steps, expr_steps=cfg.expr_steps,
                               id_lr=cfg.id_lr, id_weight_decay=cfg.id_weight_decay, expr_lr=cfg.expr_lr,
                               expr_weight_decay=cfg.expr_weight_decay, expr_beta=cfg.expr_beta, warmup=cfg.warmup)


def build_datamodule(cfg: AnalyserConfig) -> WorldFaceDataModule:
    return WorldFaceDataModule(identities=cfg.identities, batch_size=cfg.batch, size=cfg.size, styles=cfg.styles,
                               steps=max(cfg.id_steps, cfg.expr_steps), augment=cfg.augment, degrade=cfg.degrade,
                               seed=cfg.seed)


class _StepClock(L.Callback):
    """Wall-clock time at the end of every training batch (data rendering included between two)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.times.append(time.perf_counter())


def fit(cfg: AnalyserConfig, out: Path | None = None, progress: bool = True, validate: bool = True,
        callbacks: list[L.Callback] | None = None) -> tuple[WorldAnalyserModule, L.Trainer]:
    """Seed, build and train; returns the module (networks in eval mode) and its trainer.
    `out`: TensorBoard logs in out/logs (None: no logger)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, data = build_module(cfg), build_datamodule(cfg)
    steps = module.total_steps
    callbacks = list(callbacks or [])
    if progress and not sys.stdout.isatty():  # a log file gets a line every 50 steps, not a live display
        callbacks.append(TQDMProgressBar(refresh_rate=50))
    trainer = L.Trainer(
        max_steps=steps, accelerator="auto", devices=1, logger=TensorBoardLogger(out / "logs") if out else False,
        enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=progress,
        val_check_interval=min(cfg.val_every, steps) if validate else None,
        limit_val_batches=None if validate else 0, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        log_every_n_steps=min(25, steps), callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)
    module.eval()
    return module, trainer


def calibrate(cfg: AnalyserConfig, probe: int = 6) -> AnalyserConfig:
    """`cfg` with `id_steps` and `expr_steps` scaled (keeping their ratio) so that training fits
    `budget_minutes`: a throwaway run times `probe` steps of both networks, then `probe` of the
    one that trains longer (the first step of each phase is left out as warm-up; median step times)."""
    longer = "expr_steps" if cfg.expr_steps >= cfg.id_steps else "id_steps"
    shorter = "id_steps" if longer == "expr_steps" else "expr_steps"
    clock = _StepClock()
    trial = replace(cfg, seed=cfg.seed + 99, **{shorter: probe, longer: 2 * probe})
    fit(trial, progress=False, validate=False, callbacks=[clock])
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]  # gap k: batch k+1 rendered and trained
    both = statistics.median(gaps[: probe - 1])  # medians: a busy machine's stalls do not set the budget
    alone = statistics.median(gaps[probe:])
    shared = min(cfg.id_steps, cfg.expr_steps)
    extra = max(cfg.id_steps, cfg.expr_steps) - shared
    factor = cfg.budget_minutes * 60.0 * 0.97 / (shared * both + extra * alone)
    print(f"calibrated: {both:.3f} s/step for both networks, {alone:.3f} for the {longer[:-6]} network alone "
          f"-> factor {factor:.3f} for {cfg.budget_minutes} min")
    return replace(cfg, id_steps=max(10, int(cfg.id_steps * factor)), expr_steps=max(10, int(cfg.expr_steps * factor)))


def _write_config(cfg: AnalyserConfig, out: Path, extra: dict[str, Any] | None = None) -> None:
    (out / "config.json").write_text(json.dumps({**asdict(cfg), **(extra or {})}, indent=2) + "\n")


def run(cfg: AnalyserConfig, out: Path, install: bool = False) -> dict[str, Any]:
    """Train both networks, save them to `out` (fp16), evaluate the saved weights, write the reports;
    with `install`, copy weights and report into emojidiff/face/weights/."""
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.budget_minutes:
        cfg = calibrate(cfg)
    _write_config(cfg, out)
    start = time.perf_counter()
    module, trainer = fit(cfg, out)
    train_seconds = time.perf_counter() - start
    id_net, expr_net = module.identity_encoder, module.expression_regressor
    _write_config(cfg, out, {"id_net": asdict(id_net.net.config), "expr_net": asdict(expr_net.net.config)})
    id_path = id_net.save(out / f"{cfg.id_stem}.safetensors")
    expr_path = expr_net.save(out / f"{cfg.expr_stem}.safetensors")
    id_cls, expr_cls = type(id_net), type(expr_net)
    id_model, expr_model = id_cls(id_path), expr_cls(expr_path)

    meta = {
        "role": cfg.role, "identity_encoder": cfg.identity_encoder, "expression_regressor": cfg.expression_regressor,
        "seed": cfg.seed, "threads": cfg.threads, "identities": list(cfg.identities), "id_steps": cfg.id_steps,
        "expr_steps": cfg.expr_steps, "batch": cfg.batch, "degrade": cfg.degrade,
        "budget_minutes": cfg.budget_minutes, "train_seconds": train_seconds, "compare_with": cfg.compare_with,
        "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "id_params": sum(p.numel() for p in id_model.parameters()),
        "expr_params": sum(p.numel() for p in expr_model.parameters()),
        "torch": torch.__version__, "machine": platform.machine(),
    }
    reference = None
    if cfg.compare_with is not None:
        reference = (IDENTITY_ENCODERS.build(cfg.compare_with[0]), EXPRESSION_ANALYZERS.build(cfg.compare_with[1]))
    start = time.perf_counter()
    report = evaluate(id_model, expr_model, cfg, meta, reference=reference)
    report["meta"]["eval_seconds"] = time.perf_counter() - start
    # the calibrated verification threshold goes into the weights' JSON
    id_model.save(out / f"{cfg.id_stem}.safetensors",
                  extra={"validation_eer": report["identity_validation"]["overall"]["eer"]})
    write_report(report, out)
    if install:
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        for stem in (cfg.id_stem, cfg.expr_stem):
            for suffix in (".safetensors", ".json"):
                shutil.copy2(out / f"{stem}{suffix}", WEIGHTS_DIR / f"{stem}{suffix}")
        shutil.copy2(out / "report.md", WEIGHTS_DIR / f"{cfg.report_stem}.md")
        shutil.copy2(out / "report.json", WEIGHTS_DIR / f"{cfg.report_stem}.json")
        print(f"installed weights and report into {WEIGHTS_DIR}")
    return report


def config_from_args(argv: list[str] | None = None) -> tuple[AnalyserConfig, Path, bool]:
    """Parse the command line: the role's preset, then explicit options over it."""
    parser = argparse.ArgumentParser(prog="python -m lightning_modules.world_analysers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--role", choices=sorted(ROLES), default="train",
                        help="train: the training pair (world-id/world-expr); eval: the evaluation pair")
    parser.add_argument("--seed", type=int, default=None, help="default: the role's (train 0, eval 1)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="scale the step counts to this training time (default: fixed step counts)")
    parser.add_argument("--id-steps", type=int, default=None)
    parser.add_argument("--expr-steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--degrade", type=float, default=None,
                        help="fraction of training images blurred or down-sampled (0: off)")
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--eval-identities", type=int, default=None, help="held-out test identities of the report")
    parser.add_argument("--install", action="store_true", help="copy weights and report into emojidiff/face/weights/")
    args = parser.parse_args(argv)
    cfg = AnalyserConfig(role=args.role, **ROLES[args.role])
    overrides = {k: v for k, v in vars(args).items() if k not in ("out", "role", "install") and v is not None}
    return replace(cfg, **overrides), args.out, args.install


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg, out, install = config_from_args(argv)
    return run(cfg, out, install=install)


if __name__ == "__main__":
    main()
