"""Callbacks the end-to-end training tests add to a config's `trainer.callbacks` (importable by
name in the `emojidiff fit` child processes: the tests put this folder on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L


class SigkillAtStep(L.Callback):
    """SIGKILL this process at the start of global step `step`: no exception handler, no
    checkpoint on the way out, as when a node dies."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class TrainProbe(L.Callback):
    """Writes `<folder>/rank<r>.json` when training ends: this rank's world size, the global step,
    epoch and `t_max` (ICA; null otherwise) the module had when training started, and the keys of
    every training batch it saw."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.record: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        t_max = getattr(pl_module, "t_max", None)
        self.record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "start_step": trainer.global_step,
            "start_epoch": trainer.current_epoch,
            "start_t_max": t_max,
            "keys": [],
        }

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record["keys"].append(list(batch["key"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
