"""Real-scale benchmark: the training step of both stages built from the real configs (`configs/sd15/`,
`configs/sdxl/`) on the architecture-only networks (`configs/scale/`: the published SD1.5 / SDXL /
CLIP ViT-H/14 / ArcFace-R100 shapes, seeded random weights), and generation at 30 steps.

    python -m benchmarks.speed.scale --backbone sd15 --stage decoupled --image_size 256 --batch 1
    python -m benchmarks.speed.scale --backbone sd15 --stage ica --device cuda --image_size 512 --batch 16 \\
        --variants '[none, best]'

One step is what Lightning runs per batch, in plain PyTorch: the module's `compute_losses` on a
batch of world triplets read by the training loader (`datamodules.triplets`, upscaled to
`image_size`), backward, the optimizer update and the EMA update. Per variant (a set of
`StepOptions`), reported: median step time after warm-up, samples/s, peak memory (CUDA: max allocated
during the measured steps; CPU: the process's peak RSS so far), FLOPs of one step
(torch's FLOP counter registry: matmuls, convolutions and attention, forward and backward,
recomputation included) and the model FLOP utilisation against the device's bf16 peak (the datasheet's dense
figure, and the measured peak of a large matrix product, `matmul_peak`). A profile of one step names
the operators that take the time (`--profile true`). The ICA stage starts from a stage-1 export of
the same backbone, written first (the wiring the real configs use). Writes a rich table and JSON.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from benchmarks.speed.report import machine, peak_rss_bytes, print_and_write, sync
from datamodules.triplets import stored_batches
from emojidiff.models.attention import EmojiDiffAttnProcessor
from emojidiff.options import parse_options

ROOT = Path(__file__).resolve().parents[2]

#: The identity encoder of the scale configs (the shards' embeddings are its 512 values).
SCALE_IDENTITY = {
    "name": "arcface-torch",
    "init_args": {"weights": "emojidiff:arcface-r100-arch", "arch": "iresnet100"},
}

#: The real config stack of each (backbone, stage), then the architecture-only overlays.
CONFIGS: dict[tuple[str, str], list[str]] = {
    ("tiny", "decoupled"): ["configs/decoupled.yaml"],  # the embedded world's stage 1, for comparison
    ("sd15", "decoupled"): ["configs/sd15/decoupled.yaml", "configs/scale/decoupled.yaml"],
    ("sd15", "ica"): ["configs/sd15/ica.yaml", "configs/scale/ica.yaml"],
    ("sdxl", "decoupled"): [
        "configs/sd15/decoupled.yaml",
        "configs/sdxl/decoupled.yaml",
        "configs/scale/decoupled.yaml",
        "configs/scale/sdxl.yaml",
    ],
    ("sdxl", "ica"): ["configs/sd15/ica.yaml", "configs/sdxl/ica.yaml", "configs/scale/ica.yaml"],
}

#: Dense bf16 tensor-core peaks from the datasheets (FLOP/s), by a substring of the device name.
DATASHEET_BF16_PEAK: dict[str, float] = {
    "H200": 989.4e12,
    "H100 80GB HBM3": 989.4e12,  # SXM
    "H100 PCIe": 756.5e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "A10G": 70e12,
}


@dataclass(frozen=True)
class StepOptions:
    """What a training step runs with (each one a switch at scale).

    Args:
        precision: "bf16-mixed" (autocast to bf16, float32 weights, as Lightning's plugin) or "32-true".
        frozen_bf16: the frozen backbone and encoders stored in bf16 (the adapter stays float32); only
            with bf16-mixed.
        gradient_checkpointing: the UNet's activation checkpointing.
        attention: "sdpa" (torch's fused kernels: flash / memory-efficient on CUDA) or "eager" for the
            UNet's own attention layers (the adapter's layers always use SDPA).
        channels_last: UNet and VAE in channels-last memory format.
        compile: `torch.compile` on the UNet (in place; the first steps compile) with `compile_backend`
            ("inductor"; the CPU dry run of the GPU check uses "eager": the same path, no code generation).
        fused_adamw: AdamW's fused kernel (`fused=True`).
    """

    precision: str = "bf16-mixed"
    frozen_bf16: bool = False
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    fused_adamw: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("bf16-mixed", "32-true"):
            raise ValueError(f"precision must be bf16-mixed or 32-true, got {self.precision!r}")
        if self.frozen_bf16 and self.precision != "bf16-mixed":
            raise ValueError("frozen_bf16 needs precision bf16-mixed (the float32 adapter meets bf16 inputs)")
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"attention must be sdpa or eager, got {self.attention!r}")


#: Named variants: "none" is the bare step in bf16, "best" every option that helps at scale.
VARIANTS: dict[str, StepOptions] = {
    "none": StepOptions(attention="eager"),
    "fp32": StepOptions(precision="32-true", attention="eager"),
    "fp32_sdpa": StepOptions(precision="32-true"),
    "fp32_channels_last": StepOptions(precision="32-true", channels_last=True),
    "sdpa": StepOptions(),
    "checkpointing": StepOptions(gradient_checkpointing=True),
    "frozen_bf16": StepOptions(frozen_bf16=True),
    "channels_last": StepOptions(channels_last=True),
    "fused_adamw": StepOptions(fused_adamw=True),
    "best": StepOptions(frozen_bf16=True, channels_last=True, fused_adamw=True),
    "best_checkpointing": StepOptions(
        frozen_bf16=True, channels_last=True, fused_adamw=True, gradient_checkpointing=True
    ),
    "best_compiled": StepOptions(frozen_bf16=True, channels_last=True, fused_adamw=True, compile=True),
}


# ---------------------------------------------------------------------------------------------
# Devices and memory
# ---------------------------------------------------------------------------------------------


def datasheet_peak(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s from `DATASHEET_BF16_PEAK` (None on CPU or unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16_PEAK.items() if key in name), None)


def matmul_peak(device: torch.device, n: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Measured FLOP/s of an n x n x n matrix product: bf16 on CUDA (n=8192), float32 on CPU (n=1024)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n**3 / seconds}


# ---------------------------------------------------------------------------------------------
# Building a stage from its configs
# ---------------------------------------------------------------------------------------------


def build_module(backbone: str, stage: str, overrides: list[str] = (), stage1_export: Path | None = None):
    """The stage's LightningModule as its real config stack builds it (LightningCLI, no run); for ICA,
    `stage1_export` is the stage-1 model folder it continues from."""
    from emojidiff.cli import lightning_cli

    args = [arg for config in CONFIGS[(backbone, stage)] for arg in ("-c", str(ROOT / config))]
    if stage == "ica":
        if stage1_export is None:
            raise ValueError("the ICA stage needs stage1_export (a stage-1 model folder)")
        args += ["--model.init_args.model.init_args.folder", str(stage1_export)]
    args += ["--trainer.accelerator", "cpu", "--trainer.logger", "false", *overrides]
    return lightning_cli(args, run=False).model


def set_attention(unet: torch.nn.Module, attention: str) -> None:
    """The UNet's own attention layers to SDPA or eager; the adapter's processors stay."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    plain = AttnProcessor2_0 if attention == "sdpa" else AttnProcessor
    for module in unet.modules():
        proc = getattr(module, "processor", None)
        if (
            proc is not None
            and not isinstance(proc, EmojiDiffAttnProcessor)
            and hasattr(module, "set_processor")
        ):
            module.set_processor(plain())


def frozen_modules(module) -> list[torch.nn.Module]:
    """The frozen networks of a training module (backbone, encoders, ICA's loss networks)."""
    names = (
        "backbone",
        "expression_encoder",
        "identity_encoder",
        "loss_identity_encoder",
        "expression_analyser",
    )
    return [m for name in names if isinstance(m := getattr(module, name, None), torch.nn.Module)]


@contextlib.contextmanager
def applied(module, options: StepOptions, device: torch.device) -> Iterator[Callable[[], Any]]:
    """Set `options` on `module` (on `device`) and yield a one-step function; restore what is reversible
    afterwards (a compiled UNet stays compiled)."""
    unet = module.backbone.unet
    module.to(device)
    if options.frozen_bf16:
        for frozen in frozen_modules(module):
            frozen.to(torch.bfloat16)
        module.adapter.float()
    set_attention(unet, options.attention)
    if options.gradient_checkpointing:
        module.adapter.enable_gradient_checkpointing(unet)
    else:
        unet.disable_gradient_checkpointing()
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
        module.backbone.vae.to(memory_format=torch.channels_last)
    if options.compile:
        unet.compile(backend=options.compile_backend)
    params = module.parameter_groups()
    base = module.configure_optimizers()
    base = base["optimizer"] if isinstance(base, dict) else base
    kwargs = {k: v for k, v in base.defaults.items() if k in ("lr", "betas", "eps", "weight_decay")}
    optimizer = torch.optim.AdamW(params, **kwargs, fused=options.fused_adamw)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if options.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    module.train()
    counter = {"i": 0}

    def step(batch: dict[str, Any]) -> torch.Tensor:
        counter["i"] += 1
        with autocast:
            terms = module.compute_losses(batch, module.step_generator(counter["i"]))
            loss = torch.stack([v.float().mean() for v in terms.values()]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if module.ema is not None:
            module.ema.update_parameters(module.trainable_modules())
        return loss.detach()

    try:
        yield step
    finally:
        if options.frozen_bf16:
            for frozen in frozen_modules(module):
                frozen.float()
        if options.channels_last:
            unet.to(memory_format=torch.contiguous_format)
            module.backbone.vae.to(memory_format=torch.contiguous_format)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of every operator torch's FLOP counter knows (`torch.utils.flop_counter`'s
    registry: matrix products, convolutions, attention, forward and backward), as `FlopCounterMode`
    does but without its module tracker, whose hooks fail on ICA's graph ("Expected gradient
    function to be set"). Executed FLOPs: a checkpointed block's recomputation counts again."""

    #: The CPU's fused attention kernels, which the registry lacks (it knows the CUDA ones).
    CPU_ATTENTION = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_val=None, **kw: (
            sdpa_flop_count(q.shape, k.shape, v.shape)
        ),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda grad, q, k, v, *a, out_val=None, **kw: sdpa_backward_flop_count(
                grad.shape, q.shape, k.shape, v.shape
            )
        ),
    }

    def __init__(self, parts: Mapping[str, torch.nn.Module] | None = None) -> None:
        super().__init__()
        self.total = 0
        self.by_part: dict[str, int] = {}
        self._inside: list[str] = []
        self._hooks = []
        for name, module in (parts or {}).items():
            self._hooks.append(module.register_forward_pre_hook(self._enter(name)))
            self._hooks.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module, args) -> None:
            self._inside.append(name)

        return hook

    def _leave(self, module, args, output) -> None:
        self._inside.pop()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        count = flop_registry.get(packet) or self.CPU_ATTENTION.get(packet)
        if count is not None:
            flops = int(count(*args, **kwargs, out_val=out))
            self.total += flops
            part = self._inside[-1] if self._inside else "backward and losses"
            self.by_part[part] = self.by_part.get(part, 0) + flops
        return out


def count_flops(step: Callable[[dict], Any], batch: dict[str, Any]) -> int:
    """FLOPs of one training step (forward + backward), see `FlopCount`."""
    with FlopCount() as counter:
        step(batch)
    return counter.total


def step_parts(module) -> dict[str, torch.nn.Module]:
    """The networks of a training step whose forward FLOPs are counted apart (`flops_by_part`)."""
    bb = module.backbone
    parts = {
        "unet": bb.unet,
        "vae encoder": bb.vae.encoder,
        "vae decoder": bb.vae.decoder,
        "text encoder": bb.text_encoder,
        "expression encoder": module.expression_encoder,
        "identity projection": module.adapter.id_proj,
        "expression projection": module.adapter.expr_proj,
    }
    if bb.text_encoder_2 is not None:
        parts["text encoder 2"] = bb.text_encoder_2
    loss_id = getattr(module, "loss_identity_encoder", None)
    if isinstance(loss_id, torch.nn.Module):
        parts["identity loss network"] = loss_id
    return parts


def flops_by_part(step: Callable[[dict], Any], batch: dict[str, Any], module) -> dict[str, int]:
    """One step's FLOPs by the network whose forward ran them (a checkpointed block's recomputation
    counts in its network); everything outside a forward (the backward passes, the losses) together."""
    with FlopCount(step_parts(module)) as counter:
        step(batch)
    return dict(sorted(counter.by_part.items(), key=lambda kv: -kv[1]))


def profile_step(step: Callable[[dict], Any], batch: dict[str, Any], device: torch.device, top: int = 12):
    """The operators that take one step's time (torch.profiler), most first: name, share of the step, ms."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(batch)
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {"op": e.key, "share": getattr(e, attr) / total, "ms": getattr(e, attr) / 1e3, "calls": e.count}
        for e in events[:top]
    ]


def measure_variant(
    module,
    batch: dict[str, Any],
    options: StepOptions,
    device: torch.device,
    steps: int,
    warmup: int,
    flops: bool = True,
    profile: bool = False,
    peak: float | None = None,
) -> dict[str, Any]:
    """Time `steps` training steps of `module` under `options` after `warmup`; see the module docstring."""
    batch = to_device(batch, device)
    out: dict[str, Any] = {"options": asdict(options)}
    try:
        with applied(module, options, device) as step:
            for _ in range(warmup):
                step(batch)
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                loss = step(batch)
                sync(device)
                times.append(time.perf_counter() - start)
            out["memory_gib"] = (
                torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
            ) / 2**30
            out["memory"] = "cuda max allocated" if device.type == "cuda" else "process peak RSS so far"
            out["loss_finite"] = bool(torch.isfinite(loss).item())
            step_s = statistics.median(times)
            out.update(step_s=step_s, step_s_min=min(times), samples_per_s=batch["tgt"].shape[0] / step_s)
            if flops and not options.compile:
                out["flops_by_part"] = flops_by_part(step, batch, module)
                out["flops_per_step"] = sum(out["flops_by_part"].values())
                out["achieved_flops_per_s"] = out["flops_per_step"] / step_s
                if peak:
                    out["mfu"] = out["achieved_flops_per_s"] / peak
            if profile:
                out["profile"] = profile_step(step, batch, device)
    except torch.cuda.OutOfMemoryError as err:
        out["error"] = f"out of memory: {str(err).splitlines()[0]}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        gc.collect()
    return out


def measure_generation(
    module, batch: dict[str, Any], device: torch.device, steps: int = 30
) -> dict[str, Any]:
    """Seconds per image of the module's pipeline at `steps` DDIM steps (bf16 autocast on CUDA), for the
    batch's templates and identity embeddings at the batch's image size."""
    pipe = module.pipeline()
    batch = to_device(batch, device)
    size = batch["tgt"].shape[-1]
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    module.eval()

    def run() -> None:
        with torch.no_grad(), autocast:
            pipe(
                (batch["tmpl"] + 1) / 2,
                id_embeds=batch["id_embed"],
                expr_mask=batch["tmpl_mask"],
                prompt=list(batch["prompt"]),
                num_inference_steps=steps,
                seed=0,
                height=size,
                width=size,
            )

    run()
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    seconds = time.perf_counter() - start
    n = batch["tmpl"].shape[0]
    return {"steps": steps, "batch": n, "image_size": size, "s_per_image": seconds / n}


@dataclass
class ScaleOptions:
    """One backbone and stage of the real-scale benchmark.

    Args:
        backbone: "sd15" or "sdxl" (the architecture-only networks of `configs/scale/`).
        stage: "decoupled" (stage 1) or "ica".
        device: "cpu" or "cuda".
        image_size: pixels per side of the training images (SD1.5 512, SDXL 1024 at full size).
        batch: triplets per step.
        variants: names of `VARIANTS` to measure, in order.
        steps / warmup: measured and warm-up steps per variant.
        flops: count one step's FLOPs (FlopCounterMode) and the MFU.
        profile: profile one step of the last variant (the operators that take the time).
        generation_steps: also time generation at this many steps (0: no).
        threads: torch CPU threads (default: torch's).
        out: the JSON record.
    """

    backbone: str = "sd15"
    stage: str = "decoupled"
    device: str = "cpu"
    image_size: int = 256
    batch: int = 1
    variants: list[str] = field(default_factory=lambda: ["fp32"])
    steps: int = 2
    warmup: int = 1
    flops: bool = True
    profile: bool = False
    generation_steps: int = 0
    threads: int | None = None
    out: str = "outputs/bench/scale.json"

    def __post_init__(self) -> None:
        if (self.backbone, self.stage) not in CONFIGS:
            raise ValueError(
                f"backbone/stage must be one of {sorted(CONFIGS)}, got {(self.backbone, self.stage)}"
            )
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")


def world_shards(
    folder: Path, n: int, size: int, identity_encoder: str | Mapping[str, Any] = SCALE_IDENTITY
) -> list[str]:
    """n world triplets rendered at `size` px in IDI-contract shards (the loader resizes them), with the
    `identity_encoder`'s embeddings (default: the scale configs' 512-d ArcFace)."""
    from data_gen.world_triplets import write_world_triplets

    return write_world_triplets(folder, n=n, shards=1, size=size, identity_encoder=identity_encoder)


def stage_case(
    backbone: str,
    stage: str,
    device: torch.device,
    image_size: int,
    batch_size: int,
    variants: Mapping[str, StepOptions],
    steps: int,
    warmup: int,
    shards: list[str],
    workdir: Path,
    flops: bool = True,
    profile: bool = False,
    generation_steps: int = 0,
    peak: float | None = None,
    overrides: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Build (backbone, stage) from its configs (plus `overrides[stage]`, LightningCLI arguments) and
    measure each of `variants` (see `measure_variant`) and, with `generation_steps`, generation."""
    overrides = overrides or {}
    started = time.perf_counter()
    stage1_export = None
    if stage == "ica":  # ICA continues from a stage-1 export of the same backbone
        stage1 = build_module(backbone, "decoupled", list(overrides.get("decoupled", ())))
        stage1_export = stage1.export(workdir / f"{backbone}-stage1", use_ema=False)
        del stage1
        gc.collect()
    module = build_module(backbone, stage, list(overrides.get(stage, ())), stage1_export)
    built_s = time.perf_counter() - started
    batch = next(stored_batches(shards, batch_size, image_size))
    record: dict[str, Any] = {
        "backbone": backbone,
        "stage": stage,
        "configs": CONFIGS[(backbone, stage)],
        "image_size": image_size,
        "batch": batch_size,
        "build_s": built_s,
        "trainable_params": sum(p.numel() for p in module.trainable_parameters()),
        "unet_params": sum(p.numel() for p in module.backbone.unet.parameters()),
        "variants": {},
    }
    for i, (name, options) in enumerate(variants.items()):
        last = i == len(variants) - 1
        record["variants"][name] = measure_variant(
            module, batch, options, device, steps, warmup, flops, profile and last, peak
        )
    if generation_steps:  # bf16 frozen weights on CUDA (what inference runs), float32 on the CPU
        with applied(module, VARIANTS["frozen_bf16" if device.type == "cuda" else "fp32"], device):
            record["generation"] = measure_generation(module, batch, device, generation_steps)
    del module
    gc.collect()
    return record


def table(records: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    for col in (
        "backbone",
        "stage",
        "px",
        "batch",
        "variant",
        "s/step",
        "samples/s",
        "GiB",
        "TFLOP/step",
        "MFU",
    ):
        t.add_column(col, justify="left" if col in ("backbone", "stage", "variant") else "right")
    for rec in records:
        for name, v in rec["variants"].items():
            flops = v.get("flops_per_step")
            t.add_row(
                rec["backbone"],
                rec["stage"],
                str(rec["image_size"]),
                str(rec["batch"]),
                name,
                f"{v['step_s']:.3f}" if "step_s" in v else v.get("error", "-"),
                f"{v['samples_per_s']:.2f}" if "samples_per_s" in v else "-",
                f"{v['memory_gib']:.1f}" if "memory_gib" in v else "-",
                f"{flops / 1e12:.3g}" if flops else "-",
                f"{v['mfu']:.1%}" if "mfu" in v else "-",
            )
    return t


def run(opts: ScaleOptions, resolved: str = "") -> dict[str, Any]:
    """Measure `opts` and write the record (with `resolved`, the options as parsed, YAML)."""
    device = torch.device(opts.device)
    peak_measured = matmul_peak(device)
    peak = datasheet_peak(device) or peak_measured["flops_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = world_shards(work / "shards", n=opts.batch, size=min(opts.image_size, 512))
        rec = stage_case(
            opts.backbone,
            opts.stage,
            device,
            opts.image_size,
            opts.batch,
            {v: VARIANTS[v] for v in opts.variants},
            opts.steps,
            opts.warmup,
            shards,
            work,
            opts.flops,
            opts.profile,
            opts.generation_steps,
            peak,
        )
    record = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_flops_per_s": peak,
        "peak_source": "datasheet dense bf16" if datasheet_peak(device) else "measured matmul",
        "matmul_peak": peak_measured,
        "options": asdict(opts),
        "resolved_options": resolved,
        "cases": [rec],
    }
    shown = [table([rec], f"{opts.backbone} {opts.stage} on {record['device']}")]
    if "profile" in next(reversed(rec["variants"].values())):
        prof = Table(title="where one step's time goes (last variant)")
        for col in ("op", "share", "ms", "calls"):
            prof.add_column(col)
        for row in next(reversed(rec["variants"].values()))["profile"]:
            prof.add_row(row["op"], f"{row['share']:.1%}", f"{row['ms']:.1f}", str(row["calls"]))
        shown.append(prof)
    print_and_write(opts.out, record, *shown, width=140)
    return record


def main(argv: list[str] | None = None) -> int:
    opts, resolved = parse_options(ScaleOptions, argv)
    run(opts, resolved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
