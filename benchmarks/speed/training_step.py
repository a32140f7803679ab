"""Training-step benchmark: the stage-1 step through Lightning against a bare PyTorch loop doing the
same work, and the ICA step's cost against the stage-1 step.

    python -m benchmarks.speed.training_step [--steps 30] [--warmup 5] [--rounds 3] [--batch 16] [--threads 2]

Tiny (default): the packaged tiny backbone with a fresh adapter on world triplets rendered once
and held in memory (no data loading in either timing). One step = the module's `compute_losses`
+ backward + AdamW step + EMA update:

- bare: a Python loop calling exactly that, timed per step;
- lightning: `Trainer.fit` on the same module and batches (logger, checkpointing, progress bar
  off, as a headless cluster job runs), timed per step from `on_train_batch_start` to
  `on_train_batch_end` plus the loop's own gaps (wall time of the fit divided by its steps,
  after warm-up).

The two ways run in interleaved rounds (alternating order) and the medians are over all
rounds' steps. Overhead = lightning / bare - 1 (target <= 5%); on a shared machine whose speed drifts by more
than that, the direct measure is Lightning's own time per step: hooks around the step give the
time outside training_step, backward, the AdamW update and the EMA ("Lightning's own", and its
share of the step); the ICA step's cost is reported as a multiple of
the stage-1 step (it adds the expression-off UNet pass, a VAE decode with gradients and the face
networks' backward). Writes a rich table and outputs/bench/training_step.json. (The SD1.5-shaped
UNet step on a GPU: `benchmarks.speed.adapter_step --sd15_shaped true`.)
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.table import Table
from torch.utils.data import DataLoader

from benchmarks.speed.report import print_and_write
from emojidiff.images import to_signed, to_tensor, to_unit
from emojidiff.models.bundle import FreshModel, build_expression_analyser, build_identity_encoder
from emojidiff.options import parse_options
from emojidiff.splits import TRAIN_IDENTITIES, TRAIN_SEEDS
from emojidiff.world import Expression, Identity, render_batch
from lightning_modules.adapter_training import AdapterTrainingModule
from lightning_modules.decoupled import DecoupledModule
from lightning_modules.ica import ICAModule


def world_batch(batch_size: int, size: int = 64) -> dict[str, Any]:
    """One batch of world triplets in the datamodule's format (tgt/ref/tmpl in [-1, 1], world-id embeddings)."""

    ids = [Identity.sample(TRAIN_IDENTITIES[0] + i) for i in range(batch_size)]
    others = [Identity.sample(TRAIN_IDENTITIES[0] + 1000 + i) for i in range(batch_size)]
    ex = [Expression.sample(TRAIN_SEEDS[0] + i) for i in range(batch_size)]
    seeds = list(range(batch_size))

    def t(images):
        return to_signed(to_tensor(images))

    tgt = render_batch(ids, ex, "shaded", size, seeds)
    ref = render_batch(ids, [Expression.preset("neutral")] * batch_size, "shaded", size, seeds)
    tmpl = render_batch(others, ex, "shaded", size, seeds)
    with torch.no_grad():
        emb = build_identity_encoder("world-id")(to_unit(t(ref.images)))
    false = torch.zeros(batch_size, dtype=torch.bool)
    return {
        "tgt": t(tgt.images),
        "ref": t(ref.images),
        "tmpl": t(tmpl.images),
        "tmpl_mask": tmpl.masks[:, None].float(),
        "id_embed": emb,
        "drop_text": false,
        "drop_id": false,
        "drop_expr": false,
        "prompt": ["a portrait, realistic style"] * batch_size,
        "key": [f"bench-{i}" for i in range(batch_size)],
    }


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
    """Timestamps of every hook around the work of a step. Lightning runs, per step:
    batch start -> [optimizer.step(closure): training_step, backward] -> the AdamW update ->
    batch end (EMA update) -> next batch start. Its own time is what lies between those parts."""

    def __init__(self, warmup: int):
        self.warmup, self.starts = warmup, []
        self.marks: dict[str, list[float]] = {}

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, []).append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())
        self.mark("start")

    def on_before_backward(self, trainer, pl_module, loss):
        self.mark("before_backward")

    def on_after_backward(self, trainer, pl_module):
        self.mark("after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.mark("before_optimizer")

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())

    def framework_seconds(self) -> list[float]:
        """Per step: the time outside training_step, backward, the optimizer update and the EMA."""
        m, out = self.marks, []
        for i in range(self.warmup, len(m["start"])):
            nxt = self.starts[i + 1]
            parts = (
                (m["step_in"][i] - m["start"][i])
                + (m["before_backward"][i] - m["step_out"][i])
                + (m["before_optimizer"][i] - m["after_backward"][i])
                + (nxt - m["batch_end_done"][i])
            )
            out.append(parts)
        return out


def lightning_loop(
    module: AdapterTrainingModule,
    batch: dict[str, Any],
    steps: int,
    warmup: int,
    clock: _StepClock | None = None,
) -> list[float]:
    """Trainer.fit on the same batch repeated; per-step wall time from one batch start to the next
    (so the loop's own work between steps counts)."""

    clock = clock or _StepClock(warmup)
    step, end = module.training_step, module.on_train_batch_end

    def timed_step(batch, batch_idx):
        clock.mark("step_in")
        out = step(batch, batch_idx)
        clock.mark("step_out")
        return out

    def timed_end(*args):
        end(*args)
        clock.mark("batch_end_done")

    module.training_step, module.on_train_batch_end = timed_step, timed_end
    trainer = L.Trainer(
        max_steps=steps + warmup,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    module.on_fit_end = lambda: None  # no export in a benchmark
    trainer.fit(module, DataLoader([batch] * (steps + warmup), batch_size=None, collate_fn=lambda b: b))
    return [b - a for a, b in zip(clock.starts[warmup:-1], clock.starts[warmup + 1 :], strict=True)]


def summarise(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "steps": len(times)}


@dataclass
class TrainingStepConfig:
    """The training-step benchmark.

    Args:
        steps: measured steps per round and way.
        warmup: steps before the measured ones.
        rounds: interleaved bare/Lightning rounds (alternating order).
        batch: triplets per step.
        threads: torch CPU threads (default: torch's).
        out: the JSON record.
    """

    steps: int = 30
    warmup: int = 5
    rounds: int = 3
    batch: int = 16
    threads: int | None = None
    out: Path = Path("outputs/bench/training_step.json")


def tiny_module(cls: type[AdapterTrainingModule]) -> AdapterTrainingModule:
    """`cls` on a fresh default adapter (seed 0) on the packaged tiny backbone with world-id and tiny_conv;
    ICA with world-expr as its training expression analyser."""

    extra = (
        {"expression_analyser": build_expression_analyser("world-expr")} if issubclass(cls, ICAModule) else {}
    )
    return cls(FreshModel(seed=0), ema_decay=0.999, seed=0, **extra)


def bench_tiny(args: TrainingStepConfig) -> dict[str, Any]:
    batch = world_batch(args.batch)
    out: dict[str, Any] = {}
    for name, cls in (("decoupled", DecoupledModule), ("ica", ICAModule)):
        bare, light, framework = [], [], []
        # interleaved rounds in alternating order: a shared machine's speed drifts by more than
        # the overhead being measured, so each way gets the same mix of fast and slow moments
        for r in range(args.rounds):
            for way in ("bare", "lightning") if r % 2 == 0 else ("lightning", "bare"):
                torch.manual_seed(0)
                if way == "bare":
                    bare.extend(bare_loop(tiny_module(cls), batch, args.steps, args.warmup))
                else:
                    clock = _StepClock(args.warmup)
                    light.extend(lightning_loop(tiny_module(cls), batch, args.steps, args.warmup, clock))
                    framework.extend(clock.framework_seconds())
        out[name] = {
            "bare": summarise(bare),
            "lightning": summarise(light),
            "framework": summarise(framework),
        }
        out[name]["framework_share"] = out[name]["framework"]["median_s"] / out[name]["lightning"]["median_s"]
        out[name]["overhead"] = out[name]["lightning"]["median_s"] / out[name]["bare"]["median_s"] - 1
    out["ica_over_stage1"] = out["ica"]["bare"]["median_s"] / out["decoupled"]["bare"]["median_s"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, _ = parse_options(TrainingStepConfig, argv)
    result = {
        "config": asdict(args) | {"out": str(args.out)},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tiny": bench_tiny(args),
    }
    table = Table(
        title=f"training step, tiny backbone, batch {args.batch}, {torch.get_num_threads()} threads"
    )
    for col in (
        "stage",
        "bare loop (ms)",
        "Lightning (ms)",
        "Lightning / bare - 1",
        "Lightning's own (ms)",
        "its share",
    ):
        table.add_column(col, justify="right")
    for name in ("decoupled", "ica"):
        r = result["tiny"][name]
        table.add_row(
            name,
            f"{1000 * r['bare']['median_s']:.1f}",
            f"{1000 * r['lightning']['median_s']:.1f}",
            f"{100 * r['overhead']:+.1f}%",
            f"{1000 * r['framework']['median_s']:.2f}",
            f"{100 * r['framework_share']:.1f}%",
        )
    print_and_write(
        args.out, result, table, f"ICA step / stage-1 step (bare): {result['tiny']['ica_over_stage1']:.2f}x"
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
