"""Options and helpers shared by the commands: which model, how to sample, where records go.

The option groups are dataclasses; `emojidiff.cli` builds each command's options from them
(`--help` shows a field's docstring, `--print_config` its value). Kept free of torch/diffusers
imports at module level so `emojidiff --help` stays fast: torch is imported inside the functions
that load or run a model.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Literal

from emojidiff.choices import DEFAULT_EXPRESSION_ENCODER, DEFAULT_IDENTITY_ENCODER, Scheduler
from emojidiff.packaged import DEFAULT_MODEL

DType = Literal["float32", "float16", "bfloat16"]
#: An encoder or analyser: a registry name, or {"name": ..., "init_args": {...}} (JSON on the command line).
Spec = str | dict[str, Any]

#: The command line of the command being run (set by `emojidiff.cli.main` around `run`); `write_config`
#: records it.
COMMAND_LINE: ContextVar[list[str] | None] = ContextVar("emojidiff_command_line", default=None)


@dataclass
class ModelOptions:
    """model: a trained model folder (--model), or a backbone with a fresh UNTRAINED adapter (--backbone)"""

    model: str = DEFAULT_MODEL
    """an EmojiDiff model folder (emojidiff_model.json, adapter/), or a packaged one (emojidiff:NAME)"""
    backbone: str | None = None
    """instead of --model: a diffusers backbone folder, or a packaged one (emojidiff:NAME), with a fresh
    UNTRAINED adapter; only when asked for"""
    identity_encoder: Spec = DEFAULT_IDENTITY_ENCODER
    """with --backbone: the identity encoder, a name or a JSON spec {"name": ..., "init_args": {...}}"""
    expression_encoder: Spec = DEFAULT_EXPRESSION_ENCODER
    """with --backbone: the expression encoder, a name or a JSON spec"""
    adapter_seed: int = 0
    """with --backbone: seed of the untrained adapter"""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... (auto: cuda if available)"""
    dtype: DType = "float32"
    """backbone weight dtype"""
    threads: int | None = None
    """CPU threads for torch (default: torch's, one per core). Use 1 when another job is running: torch's
    OpenMP threads spin-wait, and on a shared core that made generation 20x slower"""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.backbone is not None and self.model != DEFAULT_MODEL:
            raise ValueError("give --model or --backbone, not both")
        own = (
            self.identity_encoder == DEFAULT_IDENTITY_ENCODER
            and self.expression_encoder == DEFAULT_EXPRESSION_ENCODER
        )
        if self.backbone is None and not own:
            raise ValueError(
                "--identity_encoder/--expression_encoder apply to --backbone; a --model names its own"
            )


@dataclass
class SamplingOptions:
    """sampling"""

    steps: int = 30
    """denoising steps"""
    scheduler: Scheduler = "ddim"
    """inference scheduler"""
    guidance: float = 5.0
    """text guidance g_text"""
    id_guidance: float | None = None
    """identity guidance g_id (default: --guidance)"""
    expr_guidance: float | None = None
    """expression guidance g_expr (default: --guidance)"""
    id_scale: float | None = None
    """identity branch weight (default: the adapter's)"""
    expr_scale: float | None = None
    """expression branch weight (default: the adapter's)"""
    negative_prompt: str = ""
    """negative prompt (the text guidance's null condition)"""
    size: int | None = None
    """output side in pixels (default: the model's)"""
    batch_size: int = 8
    """images per pipeline call"""
    quiet: bool = False
    """no progress bar"""


def sampling_kwargs(sampling: SamplingOptions) -> dict[str, Any]:
    """EmojiDiffPipeline keyword arguments of `sampling`."""
    return dict(
        guidance_scale=sampling.guidance,
        id_guidance=sampling.id_guidance,
        expr_guidance=sampling.expr_guidance,
        num_inference_steps=sampling.steps,
        scheduler=sampling.scheduler,
        id_scale=sampling.id_scale,
        expr_scale=sampling.expr_scale,
        negative_prompt=sampling.negative_prompt,
    )


def resolve_device(name: str):
    import torch  # here, not at module level: `emojidiff --help` imports this module (start-up time)

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_from_args(options: ModelOptions):
    """An `EmojiDiffModel` of `options`: --model (by default the packaged trained model), or a fresh
    untrained adapter on --backbone."""
    # here, not at module level: `emojidiff --help` imports this module (start-up time)
    import torch

    from emojidiff.models.bundle import fresh_model, load_model

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    device, dtype = resolve_device(options.device), getattr(torch, options.dtype)
    if options.backbone is None:
        return load_model(options.model, device=device, dtype=dtype)
    return fresh_model(
        options.backbone,
        options.identity_encoder,
        options.expression_encoder,
        seed=options.adapter_seed,
        device=device,
        dtype=dtype,
    )


def jsonable(value: Any) -> Any:
    """Option values -> JSON (paths as strings, dataclasses as dicts)."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_config(path: str | Path, command: str, options: list[Any], **sections: Any) -> Path:
    """Write a run's record as JSON at `path`: its command line, the resolved `options` (the command's
    option dataclasses, merged into one mapping: a valid `--config` file of the command), and `sections`."""
    import emojidiff

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = COMMAND_LINE.get()
    data = {
        "command": command,
        "argv": sys.argv[1:] if argv is None else argv,
        "arguments": {k: v for o in options for k, v in jsonable(o).items()},
        **{k: jsonable(v) for k, v in sections.items()},
        "environment": {
            "emojidiff": getattr(emojidiff, "__version__", "0"),
            "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
