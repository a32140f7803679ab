"""E-Adapter training-step benchmark: step time, peak memory, adapter overhead on the UNet forward.

    python -m benchmarks.speed.adapter_step [--steps 10] [--warmup 2] [--batch 8] [--threads 1]
    python -m benchmarks.speed.adapter_step --sd15_shaped true [--batch 8]                   # GPU; bf16, 64x64 latents
    python -m benchmarks.speed.adapter_step --sd15_shaped true --allow_cpu true              # CPU: batch 1, fp32, slow

Tiny (default): the embedded tiny sd15 backbone; one step = VAE-encode 64x64 images (no grad) ->
noise -> text encoding -> trainable TinyConvExpressionEncoder + adapter tokens -> UNet ->
epsilon MSE -> backward -> AdamW step over adapter + expression-encoder parameters.

SD1.5-shaped (`--sd15_shaped true`): a UNet2DConditionModel built from SD1.5's public UNet config
(written out below; random weights, nothing downloaded) at 64x64 latents (= 512px), bf16 on GPU,
with random text states (B, 77, 768), ArcFace-sized id embeddings (B, 512) and CLIP ViT-H-sized
expression features (B, 257, 1280); the VAE and encoders are left out (their cost is a fixed
no-grad forward). Runs with and without gradient checkpointing.

Reported: median step time over `--steps` after `--warmup`; peak memory: on CUDA
`torch.cuda.max_memory_allocated` (reset before the measured steps); on CPU the growth of the
process's peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss` after the steps
minus the current RSS before the first step, so it includes allocator caching and is only a rough
upper bound); and the ratio of adapter-attached UNet forward time (no grad, [text | id | expr]
tokens) to the plain UNet forward time (text tokens only). Writes a rich table and
outputs/bench/adapter_step[_sd15].json.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from rich.table import Table

from benchmarks.speed.report import peak_rss_bytes, print_and_write, sync
from emojidiff.images import to_signed
from emojidiff.models import EAdapter, EAdapterConfig, TinyConvExpressionEncoder, build_tiny_backbone
from emojidiff.options import parse_options

#: SD1.5's UNet config (runwayml/stable-diffusion-v1-5 unet/config.json), written out.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def time_fn(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> list[float]:
    """Wall-clock seconds of `steps` calls after `warmup` calls (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure_step(step: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Median step time (s) and peak memory (MiB; see the module docstring for what it means)."""
    rss_before = _rss_bytes()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_fn(step, device, steps, 0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        kind = "cuda max_memory_allocated"
    else:
        peak = max(0, peak_rss_bytes() - rss_before)
        kind = "cpu peak RSS growth"
    return {
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "peak_mib": peak / 2**20,
        "memory": kind,
    }


def forward_ratio(
    unet, adapter: EAdapter, lat, t, text, tokens, added, device, steps, warmup
) -> dict[str, float]:
    """Median no-grad forward time of the plain UNet and with the adapter attached."""

    def median_forward(ehs) -> float:
        call = lambda: unet(lat, t, encoder_hidden_states=ehs, added_cond_kwargs=added)  # noqa: E731
        return statistics.median(time_fn(call, device, steps, warmup))

    with torch.no_grad():
        plain = median_forward(text)
        adapter.attach(unet)
        adapted = median_forward(adapter.build_encoder_hidden_states(text, tokens))
        adapter.detach(unet)
    return {"unet_forward_s": plain, "adapted_forward_s": adapted, "forward_ratio": adapted / plain}


@dataclass
class AdapterStepConfig:
    """The E-Adapter training-step benchmark.

    Args:
        steps: measured steps (median reported).
        warmup: steps before the measured ones.
        batch: images per step (the SD1.5-shaped step on CPU: 1).
        device: torch device (default: cuda where available).
        sd15_shaped: SD1.5-sized UNet (GPU).
        allow_cpu: run sd15_shaped on CPU with batch 1.
        threads: torch CPU threads (default: torch's).
        out: the JSON record (default: outputs/bench/adapter_step[_sd15].json).
    """

    steps: int = 10
    warmup: int = 2
    batch: int = 8
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    sd15_shaped: bool = False
    allow_cpu: bool = False
    threads: int | None = None
    out: Path | None = None


def bench_tiny(args: AdapterStepConfig, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    bb = build_tiny_backbone("sd15", seed=0).to(device)
    cfg = EAdapterConfig(
        id_embed_dim=512,
        num_id_tokens=4,
        num_expr_tokens=16,
        expr_feature_dim=64,
        expr_layers=["up_blocks.*"],
    )
    adapter = EAdapter(cfg, bb.unet).to(device)
    encoder = TinyConvExpressionEncoder(feature_dim=64).to(device)
    params = adapter.trainable_parameters() + [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    b = args.batch
    images = to_signed(torch.rand(b, 3, 64, 64, device=device))
    templates = torch.rand(b, 3, 64, 64, device=device)
    id_embeds = F.normalize(torch.randn(b, 512, device=device), dim=-1)
    prompts = ["a portrait, anime style"] * b
    sched = bb.noise_scheduler

    def step() -> None:
        latents = bb.encode_images(images)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        text = bb.encode_prompt(prompts)["encoder_hidden_states"]
        tokens = adapter.encode_conditions(id_embeds, encoder(templates))
        pred = bb.unet(
            noisy, t, encoder_hidden_states=adapter.build_encoder_hidden_states(text, tokens)
        ).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    lat = torch.randn(b, bb.unet.config.in_channels, 16, 16, device=device)
    t = torch.full((b,), 500, device=device)
    with torch.no_grad():
        text = bb.encode_prompt(prompts)["encoder_hidden_states"]
        tokens = adapter.encode_conditions(id_embeds, encoder(templates))
    ratio = forward_ratio(bb.unet, adapter, lat, t, text, tokens, None, device, args.steps, args.warmup)
    adapter.attach(bb.unet)
    n_params = sum(p.numel() for p in params)
    row = {
        "model": "tiny-sd15",
        "batch": b,
        "dtype": "float32",
        "checkpointing": False,
        "trainable_params": n_params,
        **measure_step(step, device, args.steps, args.warmup),
        **ratio,
    }
    return [row]


def bench_sd15(args: AdapterStepConfig, device: torch.device) -> list[dict[str, Any]]:
    if device.type != "cuda" and not args.allow_cpu:
        raise SystemExit(
            "--sd15_shaped needs a CUDA GPU (SD1.5-sized UNet, bf16, batch 8); "
            "pass --allow_cpu true to run it on CPU anyway with batch 1 in fp32 (minutes per step)"
        )
    on_gpu = device.type == "cuda"
    b = args.batch if on_gpu else 1
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(0)
    unet = (
        UNet2DConditionModel(**SD15_UNET_CONFIG).to(device=device, dtype=dtype).requires_grad_(False).eval()
    )
    cfg = EAdapterConfig(
        id_embed_dim=512,
        num_id_tokens=4,
        num_expr_tokens=16,
        expr_feature_dim=1280,
        expr_layers=["up_blocks.*"],
        expr_resampler_heads=8,
    )
    adapter = EAdapter(cfg, unet).to(device)  # fp32 master weights; the processors cast to bf16
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents = torch.randn(b, 4, 64, 64, device=device, dtype=dtype)
    text = torch.randn(b, 77, 768, device=device, dtype=dtype)
    id_embeds = F.normalize(torch.randn(b, 512, device=device), dim=-1)
    expr = torch.randn(b, 257, 1280, device=device)
    params = adapter.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (b,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=on_gpu):
            tokens = adapter.encode_conditions(id_embeds, expr)
            pred = unet(
                noisy, t, encoder_hidden_states=adapter.build_encoder_hidden_states(text, tokens)
            ).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=on_gpu):
        tokens = adapter.encode_conditions(id_embeds, expr).to(dtype)
    ratio = forward_ratio(
        unet,
        adapter,
        latents,
        torch.full((b,), 500, device=device),
        text,
        tokens,
        None,
        device,
        args.steps,
        args.warmup,
    )
    rows = []
    adapter.attach(unet)
    for ckpt in (False, True):
        if ckpt:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        rows.append(
            {
                "model": "sd15-shaped",
                "batch": b,
                "dtype": str(dtype).removeprefix("torch."),
                "checkpointing": ckpt,
                "trainable_params": sum(p.numel() for p in params),
                **measure_step(step, device, args.steps, args.warmup),
                **ratio,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    args, _ = parse_options(AdapterStepConfig, argv)
    device = torch.device(args.device)
    rows = bench_sd15(args, device) if args.sd15_shaped else bench_tiny(args, device)

    table = Table(title=f"E-Adapter training step on {device} ({torch.get_num_threads()} threads)")
    cols = [
        "model",
        "batch",
        "dtype",
        "checkpointing",
        "trainable_params",
        "step_s",
        "peak_mib",
        "unet_forward_s",
        "adapted_forward_s",
        "forward_ratio",
    ]
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    out = args.out or Path("outputs/bench") / (
        "adapter_step_sd15.json" if args.sd15_shaped else "adapter_step.json"
    )
    meta = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.machine(),
        "steps": args.steps,
        "warmup": args.warmup,
    }
    print_and_write(out, {"meta": meta, "results": rows}, table, width=160)


if __name__ == "__main__":
    main()
