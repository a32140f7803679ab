"""How much the identity and expression conditions lower stage 1's diffusion loss (a diagnostic).

    python -m benchmarks.diagnostics.conditioning_gain --model outputs/train/decoupled/model         # a trained model
    python -m benchmarks.diagnostics.conditioning_gain --overfit --steps 300 [--lr 1e-3]              # can it learn at all?
        [--shards "data/idi/train-r0-*.tar"] [--expression-encoder vae_patches] [--depth -1]

Gain = the diffusion loss with the batch's templates (or identities) swapped within the batch
(rolled by half) minus the loss with the right ones, at the same noise and timesteps
(`AdapterTrainingModule.conditioning_gains`); ~0 while a branch ignores its input. For scale the
report also gives the loss and the gain of the text (prompt dropped).

`--model`: the gains of a model folder on `--batches` batches of `--shards` (default: the held-out
test shards). `--overfit`: a fresh adapter trained on ONE batch (default: round-0 self pairs, whose
template is the target's own masked face, so copying it is the answer), gains every
`--every` steps: how fast the branches can pick up their input at all. Writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from datamodules.triplets import TripletDataModule
from emojidiff.losses import diffusion_loss
from lightning_modules.decoupled import DecoupledModule


def batches(shards: str, batch_size: int, n: int) -> list[dict[str, Any]]:
    dm = TripletDataModule(train_shards=shards, batch_size=batch_size, num_workers=0, shuffle_buffer=0,
                           drop_text=0, drop_id=0, drop_expr=0, drop_all=0)  # fmt: skip
    out = []
    for b in dm.train_dataloader():
        out.append(b)
        if len(out) == n:
            break
    return out


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
    return {"template_gain": tmpl.mean().item(), "identity_gain": ident.mean().item(),
            "text_gain": losses["no_text"] - losses["right"], "loss": losses["right"]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder (stage 1 or ICA export)")
    p.add_argument("--overfit", action="store_true", help="train a fresh adapter on one batch and report the gains")
    p.add_argument("--shards", default=None, help="shard spec (default: test shards for --model, round-0 train for --overfit)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--expression-encoder", default="tiny_conv")
    p.add_argument("--depth", type=int, default=2, help="adapter expr_resampler_depth (-1: per-token projection)")
    p.add_argument("--adapter", type=json.loads, default={},
                   help='more EAdapterConfig fields as JSON, e.g. \'{"num_expr_tokens": 25, "expr_layers": "up_blocks.*"}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/bench/conditioning_gain.json"))
    args = p.parse_args(argv)
    if bool(args.model) == args.overfit:
        p.error("give --model DIR or --overfit")
    torch.manual_seed(args.seed)
    report: dict[str, Any] = {"args": vars(args) | {"out": str(args.out)}}
    if args.model:
        module = DecoupledModule(init_from=args.model, ema_decay=None)
        data = batches(args.shards or "data/idi/test-r1-*.tar", args.batch, args.batches)
        rows = [gains(module, b, i) for i, b in enumerate(data)]
        report["gains"] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        print(json.dumps(report["gains"], indent=2))
    else:
        module = DecoupledModule(lr=args.lr, ema_decay=None, seed=args.seed, expression_encoder=args.expression_encoder,
                                 adapter={"expr_resampler_depth": args.depth, **args.adapter})  # fmt: skip
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
