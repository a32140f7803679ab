"""How much the identity and expression conditions lower stage 1's diffusion loss (a diagnostic).

    python -m benchmarks.diagnostics.conditioning_gain --model outputs/train/decoupled/model         # a trained model
    python -m benchmarks.diagnostics.conditioning_gain --overfit true --steps 300 [--lr 1e-3]         # can it learn at all?
        [--shards "data/idi/train-r0-*.tar"] [--expression_encoder vae_patches] [--depth -1]

Gain = the diffusion loss with the batch's templates (or identities) swapped within the batch
(rolled by half) minus the loss with the right ones, at the same noise and timesteps
(`AdapterTrainingModule.conditioning_gains`); ~0 while a branch ignores its input. For scale the
report also gives the loss and the gain of the text (prompt dropped).

`--model`: the gains of a model folder on `--batches` batches of `--shards` (default: the held-out
test shards). `--overfit true`: a fresh adapter trained on ONE batch (default: round-0 self pairs, whose
template is the target's own masked face, so copying it is the answer), gains every
`--every` steps: how fast the branches can pick up their input at all. Writes a JSON report.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from datamodules.triplets import stored_batches
from emojidiff.losses import diffusion_loss
from emojidiff.models.bundle import FreshModel, TrainedModel
from emojidiff.options import parse_options
from lightning_modules.decoupled import DecoupledModule


def batches(shards: str, batch_size: int, n: int) -> list[dict[str, Any]]:
    return list(itertools.islice(stored_batches(shards, batch_size), n))


@torch.no_grad()
def gains(module: DecoupledModule, batch: dict[str, Any], index: int = 0) -> dict[str, float]:
    """{"template_gain", "identity_gain", "text_gain", "loss"} (means over the batch)."""
    module.eval()
    tmpl, ident = module.conditioning_gains(batch, index)
    g = torch.Generator(device=module.device).manual_seed(10_000 + index)
    latents, noise, t, noisy = module.noised(batch, generator=g)
    target = module.diffusion_target(latents, noise, t)
    losses = {}
    for name, drop in (("right", False), ("no_text", True)):
        variant = {**batch, "drop_text": torch.full((len(t),), drop)}
        ehs, added = module.condition(variant)
        losses[name] = diffusion_loss(module.unet(noisy, t, ehs, added), target).mean().item()
    return {
        "template_gain": tmpl.mean().item(),
        "identity_gain": ident.mean().item(),
        "text_gain": losses["no_text"] - losses["right"],
        "loss": losses["right"],
    }


@dataclass
class ConditioningGainConfig:
    """The conditioning gains of a model folder (model) or of a fresh adapter overfitting one batch (overfit).

    Args:
        model: a model folder (stage 1 or ICA export).
        overfit: train a fresh adapter on one batch and report the gains.
        shards: shard spec (default: test shards for model, round-0 train for overfit).
        batch: samples per batch.
        batches: batches scored (model).
        steps: training steps (overfit).
        every: steps between measurements (overfit).
        lr: learning rate (overfit).
        expression_encoder: the fresh adapter's expression encoder (overfit).
        depth: adapter expr_resampler_depth (-1: per-token projection).
        adapter: more EAdapterConfig fields, e.g. '{"num_expr_tokens": 25, "expr_layers": "up_blocks.*"}'.
        seed: the run's seed.
        out: the JSON report.
    """

    model: str | None = None
    overfit: bool = False
    shards: str | None = None
    batch: int = 32
    batches: int = 2
    steps: int = 300
    every: int = 50
    lr: float = 1e-3
    expression_encoder: str = "tiny_conv"
    depth: int = 2
    adapter: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    out: Path = Path("outputs/bench/conditioning_gain.json")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, _ = parse_options(ConditioningGainConfig, argv)
    if bool(args.model) == args.overfit:
        raise SystemExit("benchmarks.diagnostics.conditioning_gain: give --model DIR or --overfit true")
    torch.manual_seed(args.seed)
    report: dict[str, Any] = {"args": asdict(args) | {"out": str(args.out)}}
    if args.model:
        module = DecoupledModule(TrainedModel(args.model), ema_decay=None)
        data = batches(args.shards or "data/idi/test-r1-*.tar", args.batch, args.batches)
        rows = [gains(module, b, i) for i, b in enumerate(data)]
        report["gains"] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        print(json.dumps(report["gains"], indent=2))
    else:
        model = FreshModel(
            expression_encoder=args.expression_encoder,
            seed=args.seed,
            adapter={"expr_resampler_depth": args.depth, **args.adapter},
        )
        module = DecoupledModule(
            model,
            optimizer=partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.01),
            ema_decay=None,
            seed=args.seed,
        )
        batch = batches(args.shards or "data/idi/train-r0-*.tar", args.batch, 1)[0]
        opt = module.configure_optimizers()["optimizer"]
        curve, t0 = [], time.perf_counter()
        for step in range(args.steps + 1):
            if step % args.every == 0:
                curve.append({"step": step, **gains(module, batch), "seconds": time.perf_counter() - t0})
                print(json.dumps(curve[-1]), flush=True)
            if step == args.steps:
                break
            module.train()
            loss = module.compute_losses(batch, module.step_generator(step))["diffusion"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        report["curve"] = curve
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
