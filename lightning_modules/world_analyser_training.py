"""Training a pair of world analysers (identity encoder + expression regressor): `make analysers`.

    python -m emojidiff.cli fit -c configs/analysers/train_pair.yaml                        # "world-id", "world-expr"
    python -m emojidiff.cli fit -c configs/analysers/train_pair.yaml -c configs/analysers/eval_pair.yaml   # "-eval"

Every step renders a fresh batch (`datamodules.world_faces.WorldFaceDataModule`: identities from the
pair's training range, random expressions, styles and scene seeds, half the images softened as a
decoder softens them), and both networks train on it:

- identity: CosFace (additive cosine margin) classification over the training identities;
- expression: smooth-L1 regression of the 10 Expression parameters scaled to [0, 1].

The identity encoder trains for `id_steps`, the regressor for `expr_steps` (they share each
rendered batch while both train; the trainer's `max_steps` is the longer of the two). Validation
(`val/id_eer`, `val/expr_r2`, `val/expr_mae`) runs on held-out validation identities. When fit ends
the weights are written as fp16 safetensors to `export_dir` (<stem>.safetensors/.json for both
networks) with `train_record.json` (command line, resolved config, data, steps, seed, threads, time,
final metrics, architectures). Then `python -m lightning_modules.world_analyser_report` evaluates the
saved weights on held-out identities, calibrates the verification threshold, writes the report and
installs the pair; `python -m lightning_modules.world_analyser_budget` scales the step counts to a
time budget first (a config overlay).

The two pairs (README, `emojidiff.face.world_models`): the training pair (`make analysers`, seed 0,
`ANALYSER_TRAIN_IDENTITIES`) and the evaluation pair (`make eval-analysers`, seed 1,
`EVAL_ANALYSER_TRAIN_IDENTITIES`, other architectures: `configs/analysers/eval_pair.yaml` holds what
it changes).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, R2Score
from torchmetrics.classification import BinaryEER

from emojidiff.cli import fit_record
from emojidiff.face.base import EXPRESSION_ANALYSERS, IDENTITY_ENCODERS
from emojidiff.face.world_models import WorldExpressionRegressor, WorldIdentityEncoder
from lightning_modules.world_analyser_report import TRAIN_RECORD, pair_scores

__all__ = ["CosFaceHead", "WorldAnalyserModule", "warmup_cosine"]


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
    `floor` of the peak at `steps` (and `floor` after it).

    Not diffusers' `get_cosine_schedule_with_warmup` (nor torch's CosineAnnealingLR): those decay
    every parameter group over one length to zero (an absolute eta_min), while the identity and
    expression networks here train for different step counts and each keeps 2% of its own peak
    (the packaged analysers were trained on this curve)."""
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

    The parts are built by the config: the two networks random (`weights: null`, `arch` overriding
    their class's architecture), `cosface_head` over as many classes as the data has training
    identities and as wide as the encoder's embedding. export_dir: where `on_fit_end` writes
    `<id_stem>` / `<expr_stem>` .safetensors/.json (fp16) and `train_record.json` (None: nothing).
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
        export_dir: str | None = None,
        id_stem: str = "world_id",
        expr_stem: str = "world_expr",
    ):
        super().__init__()
        if id_steps < 1 or expr_steps < 1:
            raise ValueError(f"id_steps and expr_steps must be >= 1, got {id_steps} and {expr_steps}")
        if cosface_head.weight.shape[1] != identity_encoder.embedding_dim:
            raise ValueError(
                f"cosface_head.init_args.dim is {cosface_head.weight.shape[1]}, the identity encoder's "
                f"embedding_dim {identity_encoder.embedding_dim}: they must match"
            )
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
        self._start = 0.0

    @property
    def total_steps(self) -> int:
        return max(self.hparams.id_steps, self.hparams.expr_steps)

    def on_fit_start(self) -> None:
        """The run's shape must be the module's: as many steps as the longer network trains, and a
        class per training identity of the data."""
        hp = self.hparams
        if self.trainer.max_steps != self.total_steps:
            raise ValueError(
                f"trainer.max_steps is {self.trainer.max_steps}: it must be the longer network's steps, "
                f"max(model.init_args.id_steps, expr_steps) = max({hp.id_steps}, {hp.expr_steps})"
            )
        classes = getattr(self.trainer.datamodule, "num_classes", None)
        if classes is not None and classes != self.cosface_head.weight.shape[0]:
            raise ValueError(
                f"cosface_head.init_args.num_classes is {self.cosface_head.weight.shape[0]}, but "
                f"data.init_args.identities holds {classes} training identities: they must match"
            )
        self._start = time.perf_counter()

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
        optimizer = torch.optim.AdamW(
            [
                {
                    "params": self.identity_encoder.parameters(),
                    "lr": hp.id_lr,
                    "weight_decay": hp.id_weight_decay,
                },
                {"params": self.cosface_head.parameters(), "lr": hp.id_lr, "weight_decay": 0.0},
                {
                    "params": self.expression_regressor.parameters(),
                    "lr": hp.expr_lr,
                    "weight_decay": hp.expr_weight_decay,
                },
            ]
        )
        id_factor, expr_factor = (
            warmup_cosine(hp.id_steps, hp.warmup),
            warmup_cosine(hp.expr_steps, hp.warmup),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [id_factor, id_factor, expr_factor])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_end(self) -> None:
        run = fit_record(self.trainer)
        train_seconds = time.perf_counter() - self._start
        self.eval()
        if self.hparams.export_dir is None or not self.trainer.is_global_zero:
            return
        hp, out = self.hparams, Path(self.hparams.export_dir)
        id_net, expr_net = self.identity_encoder, self.expression_regressor
        id_net.save(out / f"{hp.id_stem}.safetensors")
        expr_net.save(out / f"{hp.expr_stem}.safetensors")
        data = dict(getattr(self.trainer.datamodule, "hparams", {}))
        record = {
            **run,
            "role": id_net.role,  # which pair: "training" or "evaluation"
            "identity_encoder": IDENTITY_ENCODERS.name_of(type(id_net)),
            "expression_regressor": EXPRESSION_ANALYSERS.name_of(type(expr_net)),
            "id_stem": hp.id_stem,
            "expr_stem": hp.expr_stem,
            "seed": int(os.environ.get("PL_GLOBAL_SEED", data.get("seed", 0))),
            "threads": torch.get_num_threads(),
            "identities": list(data.get("identities", ())),
            "styles": list(data.get("styles", ())),
            "size": data.get("size"),
            "batch": data.get("batch_size"),
            "degrade": data.get("degrade"),
            "id_steps": hp.id_steps,
            "expr_steps": hp.expr_steps,
            "global_step": self.global_step,
            "train_seconds": train_seconds,
            "final_metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items()},
            "id_net": asdict(id_net.net.config),
            "expr_net": asdict(expr_net.net.config),
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
        (out / TRAIN_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
