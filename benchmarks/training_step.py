"""Training-step benchmark: the stage-1 step through Lightning against a bare PyTorch loop doing the
same work, and the ICA step's cost against the stage-1 step.

    python -m benchmarks.training_step [--steps 30] [--warmup 5] [--batch 16] [--threads 2]

Tiny (default): the packaged tiny backbone with a fresh adapter on world triplets rendered once
and held in memory (no data loading in either timing). One step = the module's `compute_losses`
+ backward + AdamW step + EMA update:

- bare: a Python loop calling exactly that, timed per step;
- lightning: `Trainer.fit` on the same module and batches (logger, checkpointing, progress bar
  off, as a headless cluster job runs), timed per step from `on_train_batch_start` to
  `on_train_batch_end` plus the loop's own gaps (wall time of the fit divided by its steps,
  after warm-up).

Overhead = lightning / bare - 1 (target <= 5%); the ICA step's cost is reported as a multiple of
the stage-1 step (it adds the expression-off UNet pass, a VAE decode with gradients and the face
networks' backward). Writes a rich table and outputs/bench/training_step.json. (The SD1.5-shaped
UNet step on a GPU: `benchmarks.adapter_step --sd15-shaped`.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from lightning_modules.adapter_training import AdapterTrainingModule
from lightning_modules.decoupled import DecoupledModule
from lightning_modules.ica import ICAModule


def world_batch(batch_size: int, size: int = 64) -> dict[str, Any]:
    """One batch of world triplets in the datamodule's format (tgt/ref/tmpl in [-1, 1], world-id embeddings)."""
    from emojidiff.models.bundle import build_identity_encoder
    from emojidiff.splits import TRAIN_IDENTITIES, TRAIN_SEEDS
    from emojidiff.world import Expression, Identity, render_batch

    ids = [Identity.sample(TRAIN_IDENTITIES[0] + i) for i in range(batch_size)]
    others = [Identity.sample(TRAIN_IDENTITIES[0] + 1000 + i) for i in range(batch_size)]
    ex = [Expression.sample(TRAIN_SEEDS[0] + i) for i in range(batch_size)]
    seeds = list(range(batch_size))

    def t(images):
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1

    tgt = render_batch(ids, ex, "shaded", size, seeds)
    ref = render_batch(ids, [Expression.preset("neutral")] * batch_size, "shaded", size, seeds)
    tmpl = render_batch(others, ex, "shaded", size, seeds)
    with torch.no_grad():
        emb = build_identity_encoder("world-id")((t(ref.images) + 1) / 2)
    false = torch.zeros(batch_size, dtype=torch.bool)
    return {"tgt": t(tgt.images), "ref": t(ref.images), "tmpl": t(tmpl.images), "tmpl_mask": tmpl.masks[:, None].float(),
            "id_embed": emb, "drop_text": false, "drop_id": false, "drop_expr": false,
            "prompt": ["a portrait, realistic style"] * batch_size, "key": [f"bench-{i}" for i in range(batch_size)]}  # fmt: skip


def bare_loop(module: AdapterTrainingModule, batch: dict[str, Any], steps: int, warmup: int) -> list[float]:
    """compute_losses + backward + AdamW + EMA, the work of one Lightning step, in plain PyTorch."""
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        terms = module.compute_losses(batch, module.step_generator(i))
        loss = torch.stack([v.mean() for v in terms.values()]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if module.ema is not None:
            module.ema.update_parameters(module.trainable_modules())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


class _StepClock(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.starts = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())


def lightning_loop(module: AdapterTrainingModule, batch: dict[str, Any], steps: int, warmup: int) -> list[float]:
    """Trainer.fit on the same batch repeated; per-step wall time from one batch start to the next
    (so the loop's own work between steps counts)."""
    from torch.utils.data import DataLoader

    clock = _StepClock(warmup)
    trainer = L.Trainer(max_steps=steps + warmup, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
                        num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    module.on_fit_end = lambda: None  # no export in a benchmark
    trainer.fit(module, DataLoader([batch] * (steps + warmup), batch_size=None, collate_fn=lambda b: b))
    return [b - a for a, b in zip(clock.starts[warmup:-1], clock.starts[warmup + 1 :], strict=True)]


def summarise(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "steps": len(times)}


def bench_tiny(args: argparse.Namespace) -> dict[str, Any]:
    batch = world_batch(args.batch)
    common = {"ema_decay": 0.999, "seed": 0}
    out: dict[str, Any] = {}
    for name, cls in (("decoupled", DecoupledModule), ("ica", ICAModule)):
        torch.manual_seed(0)
        bare = bare_loop(cls(**common), batch, args.steps, args.warmup)
        torch.manual_seed(0)
        light = lightning_loop(cls(**common), batch, args.steps, args.warmup)
        out[name] = {"bare": summarise(bare), "lightning": summarise(light)}
        out[name]["overhead"] = out[name]["lightning"]["median_s"] / out[name]["bare"]["median_s"] - 1
    out["ica_over_stage1"] = out["ica"]["bare"]["median_s"] / out["decoupled"]["bare"]["median_s"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench/training_step.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"config": vars(args) | {"out": str(args.out)}, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "tiny": bench_tiny(args)}  # fmt: skip
    table = Table(title=f"training step, tiny backbone, batch {args.batch}, {torch.get_num_threads()} threads")
    for col in ("stage", "bare loop (ms)", "Lightning (ms)", "overhead"):
        table.add_column(col, justify="right")
    for name in ("decoupled", "ica"):
        r = result["tiny"][name]
        table.add_row(name, f"{1000 * r['bare']['median_s']:.1f}", f"{1000 * r['lightning']['median_s']:.1f}",
                      f"{100 * r['overhead']:+.1f}%")  # fmt: skip
    Console().print(table)
    Console().print(f"ICA step / stage-1 step (bare): {result['tiny']['ica_over_stage1']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
