"""Training the world's landmark detector ("world-lms"): `make landmarker`.

    python -m emojidiff.cli fit -c configs/analysers/landmarker.yaml

Every step renders a fresh batch of world portraits (`datamodules.world_faces.WorldFaceDataModule`:
the training pair's identities, random expressions, styles and scene seeds, half the images
softened as a decoder softens them) with the renderer's own 68 landmarks
(`emojidiff.world.landmarks`), and the detector regresses them (smooth-L1 on coordinates as
fractions of the image side). Validation on held-out identities: `val/lms_px`, the mean point
error in pixels of a 64 px portrait, and `val/lms_nme`, the same over the inter-ocular distance
(outer eye corners, the 300-W convention). When fit ends the fp16 weights `world_lms.safetensors`
/ `.json` and `train_record.json` (command, resolved config, steps, seed, time, the validation
errors by region) go to `export_dir`; `make landmarker` installs them into the package.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from emojidiff.cli import fit_record
from emojidiff.face.world_landmarks import WorldLandmarkDetector
from emojidiff.world.landmarks import REGIONS, inter_ocular
from lightning_modules.world_analyser_training import warmup_cosine

__all__ = ["WorldLandmarkModule"]


class WorldLandmarkModule(L.LightningModule):
    """Trains `detector` on batches {"images" (B, 3, S, S) [0, 1], "landmarks" (B, 68, 2) pixels}
    for the trainer's `max_steps` (AdamW, warm-up then cosine), smooth-L1 with transition `beta` on the
    landmarks as fractions of the image side. export_dir: where `on_fit_end` writes the weights
    (None: nothing)."""

    def __init__(
        self,
        detector: WorldLandmarkDetector,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        beta: float = 0.01,
        warmup: float = 0.05,
        export_dir: str | None = None,
        stem: str = "world_lms",
    ):
        super().__init__()
        detector.freeze = False
        self.detector = detector.requires_grad_(True).train()
        self.save_hyperparameters(ignore=["detector"])
        self.val_px = MeanMetric()
        self.val_nme = MeanMetric()
        self.val_regions = torch.nn.ModuleDict({name: MeanMetric() for name in REGIONS})
        self._start = 0.0

    def on_fit_start(self) -> None:
        self._start = time.perf_counter()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["images"]
        target = batch["landmarks"] / images.shape[-1]
        pred = self.detector.relative(images)
        loss = F.smooth_l1_loss(pred, target, beta=self.hparams.beta)
        self.log("train/lms_loss", loss, prog_bar=True)
        self.log("train/lms_px", (pred.detach() - target).norm(dim=-1).mean() * images.shape[-1])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images, target = batch["images"], batch["landmarks"]
        err = (self.detector(images) - target).norm(dim=-1)  # (B, 68) pixels
        self.val_px.update(err)
        self.val_nme.update(err.mean(1) / inter_ocular(target))
        for name, idx in REGIONS.items():
            self.val_regions[name].update(err[:, idx.start : idx.stop])
        self.log("val/lms_px", self.val_px, prog_bar=True)
        self.log("val/lms_nme", self.val_nme, prog_bar=True)
        for name, metric in self.val_regions.items():
            self.log(f"val/lms_px_{name}", metric)

    def configure_optimizers(self) -> dict[str, Any]:
        hp, steps = self.hparams, self.trainer.max_steps
        if steps is None or steps < 1:
            raise ValueError(f"trainer.max_steps must be set (the schedule's length), got {steps}")
        optimizer = torch.optim.AdamW(self.detector.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, hp.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_end(self) -> None:
        run = fit_record(self.trainer)
        seconds = time.perf_counter() - self._start
        self.eval()
        if self.hparams.export_dir is None or not self.trainer.is_global_zero:
            return
        out = Path(self.hparams.export_dir)
        self.detector.save(out / f"{self.hparams.stem}.safetensors")
        data = dict(getattr(self.trainer.datamodule, "hparams", {}))
        record = {
            **run,
            "seed": int(os.environ.get("PL_GLOBAL_SEED", data.get("seed", 0))),
            "threads": torch.get_num_threads(),
            "identities": list(data.get("identities", ())),
            "size": data.get("size"),
            "batch": data.get("batch_size"),
            "steps": self.trainer.max_steps,
            "global_step": self.global_step,
            "train_seconds": seconds,
            "final_metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items()},
        }
        (out / "train_record.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
