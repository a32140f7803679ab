"""Arguments and helpers shared by the commands: which model, how to sample, where configs go.

Kept free of torch/diffusers imports at module level so `emojidiff --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from emojidiff.packaged import DEFAULT_BACKBONE, DEFAULT_MODEL
from emojidiff.registry import spec_from_text

SCHEDULERS = ("ddim", "dpm++", "euler", "ddpm")
DTYPES = ("float32", "float16", "bfloat16")


# Mirrors of emojidiff.models.bundle's encoder defaults (for help texts without importing torch).
DEFAULT_IDENTITY_ENCODER = "world-id"
DEFAULT_EXPRESSION_ENCODER = "tiny_conv"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(f"model (--model, default the packaged trained {DEFAULT_MODEL}; or --backbone)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path,
                     help=f"an EmojiDiff model folder (emojidiff_model.json, adapter/), or a packaged one (default {DEFAULT_MODEL})")
    src.add_argument(
        "--backbone", type=Path, default=None,
        help=f"a diffusers backbone folder (e.g. {DEFAULT_BACKBONE}) with a fresh UNTRAINED adapter: only when asked for",
    )  # fmt: skip
    g.add_argument("--identity-encoder", default=None,
                   help=f"with --backbone: identity encoder name or JSON spec (default {DEFAULT_IDENTITY_ENCODER})")
    g.add_argument("--expression-encoder", default=None,
                   help=f"with --backbone: expression encoder name or JSON spec (default {DEFAULT_EXPRESSION_ENCODER})")
    g.add_argument("--adapter-seed", type=int, default=0, help="with --backbone: seed of the untrained adapter")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="backbone weight dtype")
    g.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (default: torch's, one per core). Use 1 when another job is running: "
        "torch's OpenMP threads spin-wait, and on a shared core that made generation 20x slower",
    )  # fmt: skip


def add_sampling_arguments(p: argparse.ArgumentParser, steps: int = 30) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    g.add_argument("--guidance", type=float, default=5.0, help="text guidance g_text (default 5)")
    g.add_argument("--id-guidance", type=float, default=None, help="identity guidance g_id (default: --guidance)")
    g.add_argument("--expr-guidance", type=float, default=None, help="expression guidance g_expr (default: --guidance)")
    g.add_argument("--id-scale", type=float, default=None, help="identity branch weight (default: the adapter's)")
    g.add_argument("--expr-scale", type=float, default=None, help="expression branch weight (default: the adapter's)")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--size", type=int, default=None, help="output side in pixels (default: the model's)")
    g.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """EmojiDiffPipeline keyword arguments from `add_sampling_arguments`' options."""
    return dict(
        guidance_scale=args.guidance, id_guidance=args.id_guidance, expr_guidance=args.expr_guidance,
        num_inference_steps=args.steps, scheduler=args.scheduler, id_scale=args.id_scale,
        expr_scale=args.expr_scale, negative_prompt=args.negative_prompt,
    )  # fmt: skip


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_from_args(args: argparse.Namespace):
    """An `EmojiDiffModel` from `add_model_arguments`' options: --model, a fresh untrained adapter on
    --backbone, or (neither given) the packaged trained model."""
    import torch

    from emojidiff.models.bundle import fresh_model, load_model

    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    if args.backbone is None:
        if args.identity_encoder or args.expression_encoder:
            raise ValueError("--identity-encoder/--expression-encoder apply to --backbone; a --model names its own")
        return load_model(args.model if args.model is not None else DEFAULT_MODEL, device=device, dtype=dtype)
    return fresh_model(
        args.backbone,
        spec_from_text(args.identity_encoder) or DEFAULT_IDENTITY_ENCODER,
        spec_from_text(args.expression_encoder) or DEFAULT_EXPRESSION_ENCODER,
        seed=args.adapter_seed, device=device, dtype=dtype,
    )  # fmt: skip


def jsonable(value: Any) -> Any:
    """argparse values -> JSON (paths as strings)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_config(path: str | Path, command: str, args: argparse.Namespace, **sections: Any) -> Path:
    """Write the resolved arguments (+ `sections`) of a run as JSON at `path`."""
    import emojidiff

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "command": command,
        "argv": getattr(args, "_argv", sys.argv[1:]),
        "arguments": {k: jsonable(v) for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
        **{k: jsonable(v) for k, v in sections.items()},
        "environment": {"emojidiff": getattr(emojidiff, "__version__", "0"), "python": platform.python_version(),
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
