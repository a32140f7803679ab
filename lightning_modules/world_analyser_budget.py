"""Scale an analyser fit's step counts to a time budget: a config overlay for `make analysers`.

    python -m lightning_modules.world_analyser_budget --configs+=configs/analysers/train_pair.yaml \
        --minutes 15 --out outputs/analysers/budget.yaml
    python -m emojidiff.cli fit -c configs/analysers/train_pair.yaml -c outputs/analysers/budget.yaml

A throwaway fit of the configs (`configs`, stacked in order; no logger, no validation, nothing
exported) times `probe` steps of both networks, then `probe` of the one that trains longer (the first
step of each phase left out as warm-up; median step times, so a busy machine's stalls do not set the
budget), and scales `id_steps` and `expr_steps` (keeping their ratio) so that training fits `minutes`.
`out` is the overlay with the scaled counts: the model's two, the trainer's `max_steps` and
`val_check_interval` (validation still runs at the end), and the data's `steps`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from emojidiff.cli import lightning_cli
from emojidiff.options import parse_options

PROG = "python -m lightning_modules.world_analyser_budget"


@dataclass
class BudgetOptions:
    """The time budget of an analyser fit."""

    configs: list[Path]
    """the fit's config files, in order (--configs+=FILE adds one)"""
    minutes: float
    """training time to fit the step counts to"""
    out: Path
    """the config overlay written (YAML), to stack after `configs`"""
    probe: int = 6
    """steps timed per phase"""


class StepClock(L.Callback):
    """Wall-clock time at the end of every training batch (data rendering included between two)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.times.append(time.perf_counter())


def _config_args(configs: Sequence[str | Path]) -> list[str]:
    return [arg for c in configs for arg in ("-c", str(c))]


def calibrate(
    configs: Sequence[str | Path], minutes: float, probe: int = 6, overrides: Sequence[str] = ()
) -> dict[str, int]:
    """{"id_steps", "expr_steps"} of the fit `configs` (+ LightningCLI `overrides`) scaled so that
    training takes `minutes` (each at least 10), from a timed throwaway fit (see the module docstring)."""
    args = [*_config_args(configs), *overrides]
    module = lightning_cli(args, run=False).model
    id_steps, expr_steps = module.hparams.id_steps, module.hparams.expr_steps
    longer = "expr_steps" if expr_steps >= id_steps else "id_steps"
    shorter = "id_steps" if longer == "expr_steps" else "expr_steps"
    trial = lightning_cli(
        [
            *args,
            f"--model.init_args.{shorter}",
            str(probe),
            f"--model.init_args.{longer}",
            str(2 * probe),
            "--model.init_args.export_dir",
            "null",
            "--trainer.max_steps",
            str(2 * probe),
            "--trainer.logger",
            "false",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_model_summary",
            "false",
        ],
        run=False,
    )
    clock = StepClock()
    trial.trainer.callbacks.append(clock)
    trial.trainer.fit(trial.model, datamodule=trial.datamodule)
    gaps = [
        b - a for a, b in zip(clock.times, clock.times[1:], strict=False)
    ]  # gap k: batch k+1 rendered and trained
    both = statistics.median(gaps[: probe - 1])
    alone = statistics.median(gaps[probe:])
    shared = min(id_steps, expr_steps)
    extra = max(id_steps, expr_steps) - shared
    factor = minutes * 60.0 * 0.97 / (shared * both + extra * alone)
    print(
        f"calibrated: {both:.3f} s/step for both networks, {alone:.3f} for the {longer[:-6]} network alone "
        f"-> factor {factor:.3f} for {minutes:g} min"
    )
    return {"id_steps": max(10, int(id_steps * factor)), "expr_steps": max(10, int(expr_steps * factor))}


def budget_overlay(
    configs: Sequence[str | Path], steps: dict[str, int], overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The config overlay that sets `steps` ({"id_steps", "expr_steps"}) and what follows from them."""
    trainer = lightning_cli([*_config_args(configs), *overrides], run=False).trainer
    total = max(steps.values())
    interval = trainer.val_check_interval
    return {
        "model": {"init_args": dict(steps)},
        "trainer": {
            "max_steps": total,
            "val_check_interval": min(interval, total) if isinstance(interval, int) else interval,
        },
        "data": {"init_args": {"steps": total}},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, _ = parse_options(BudgetOptions, argv, prog=PROG, description=__doc__)
    steps = calibrate(options.configs, options.minutes, options.probe)
    overlay = budget_overlay(options.configs, steps)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# {PROG} {' '.join(argv)}\n# the step counts of {', '.join(map(str, options.configs))} "
        f"scaled to {options.minutes:g} min of training on this machine\n"
    )
    options.out.write_text(header + yaml.safe_dump(overlay, sort_keys=False))
    print(f"wrote {options.out}")
    return overlay


if __name__ == "__main__":
    main()
