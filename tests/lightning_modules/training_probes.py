"""Callbacks the end-to-end training tests add to a config's `trainer.callbacks` (importable by
name in the `emojidiff fit` child processes: the tests put this folder on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
from lightning.pytorch.strategies import FSDPStrategy


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


class AdapterWeightsProbe(L.Callback):
    """Writes `<folder>/rank<r>.safetensors` when training ends: the full trainable weights this rank
    holds (adapter, UNet LoRA, trainable expression encoder; under FSDP gathered from the shards)
    and, as `rank<r>.start.safetensors`, the same when training started."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, suffix: str) -> None:
        from contextlib import nullcontext

        from safetensors.torch import save_file
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = trainer.strategy.model
        gather = (
            FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)
            if isinstance(wrapped, FullyShardedDataParallel)
            else nullcontext()
        )
        with gather:
            state = {
                k: v.detach().float().clone().contiguous()
                for k, v in pl_module.trainable_modules().state_dict().items()
            }
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(self.folder / f"rank{trainer.global_rank}{suffix}.safetensors"))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, ".start")
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = trainer.strategy.model
        if isinstance(wrapped, FullyShardedDataParallel):  # how FSDP cut the module: one row per unit
            units = []
            for unit in FullyShardedDataParallel.fsdp_modules(wrapped):
                handle = unit._handle
                units.append(
                    {
                        "module": type(unit.module).__name__,
                        "strategy": unit.sharding_strategy.name,
                        "local": 0 if handle is None else handle.flat_param.numel(),
                        "full": 0 if handle is None else handle.flat_param._unpadded_unsharded_size.numel(),
                    }
                )
            (self.folder / f"rank{trainer.global_rank}.units.json").write_text(json.dumps(units))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "")


def _full_state_dict_in_place(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        module=module,
        state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


class CpuFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU processes over gloo, for the tests of the cluster config's
    wrapping and sharding. Three differences, each for the CPU alone: Lightning refuses the
    FSDPStrategy class itself on a CPU accelerator; torch's FSDP runs on the CPU only when told
    `device_id=cpu` (Lightning passes None there); and torch's FSDP crashes (SIGSEGV) gathering a full
    state dict with `offload_to_cpu=True` (which Lightning always sets) when the shards already live
    on the CPU, so checkpoints are gathered in place."""

    def lightning_module_state_dict(self) -> dict:
        with _patched_state_dict_context():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        with _patched_state_dict_context():
            return super().optimizer_state(optimizer)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


@contextmanager
def _patched_state_dict_context():
    original = lightning_fsdp._get_full_state_dict_context
    lightning_fsdp._get_full_state_dict_context = _full_state_dict_in_place
    try:
        yield
    finally:
        lightning_fsdp._get_full_state_dict_context = original
