"""The latent ceiling: how much expression (and identity) survives a backbone's VAE and UNet.

    python -m benchmarks.diagnostics.latent_ceiling --backbone DIR [--n_per_style 192] [--fd_n 384] [--out_dir outputs/bench/latent_ceiling]

Every image an EmojiDiff model outputs is a VAE decode, so the VAE bounds how much expression
any method can show. On a fixed held-out design (`emojidiff.splits.TEST_IDENTITIES`, held-out
expression and scene seeds, `--n_per_style` renders in each style) the expression analyser reads
each of these images and its parameters are compared with the renders' ground truth:

- `clean`: the renders themselves (the analyser's own error: the floor);
- `blur`: Gaussian blur, sigma `--blur_sigma` px (a reference degradation);
- `down2`: downsampled 2x and back up (a reference: "the face at half the resolution");
- `vae`: VAE reconstructions (encode, posterior mode, decode): the ceiling of every method;
- `onestep@T`: the UNet's one-step x0 from the render's latent noised to timestep T with its
  caption, decoded (the reconstruction ICA supervises; the UNet's own ceiling at that noise).

Per condition and style: expression error (mean absolute error of the analyser's parameters
against ground truth, natural units; per parameter too), identity similarity to the clean render
(cosine of the identity encoder), and the PSNR on the eyes, brows, nose and mouth against the
clean render (analyser-free). With `--fd_n > 0` the backbone's text-to-image samples get the
world-FD of `benchmarks.diagnostics.base_quality`. Writes latent_ceiling.json (figures, arguments, analysers),
latent_ceiling.md (the tables) and latent_ceiling.png (per-parameter bars) to `--out_dir`.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import Tensor

from benchmarks.diagnostics.base_quality import world_fd
from emojidiff.degradations import down_up, gaussian_blur
from emojidiff.images import to_signed, to_tensor, to_unit
from emojidiff.models.backbone import Backbone
from emojidiff.models.bundle import DEFAULT_BACKBONE, build_expression_analyser, build_identity_encoder
from emojidiff.options import parse_options
from emojidiff.plots import pyplot
from emojidiff.registry import spec_from_text
from emojidiff.splits import HELD_OUT_SEED_OFFSET, TEST_IDENTITIES
from emojidiff.world import PARTS, STYLES, Expression, Identity, render_batch
from emojidiff.world.prompts import sample_prompt

FEATURE_PARTS = ("eye", "iris", "brow", "nose", "lips", "mouth_interior")
#: Seeds of this benchmark's renders: disjoint from the analysers' report (which uses offset + k
#: for k < 2**31) and from training (below 2**31).
_SEED_BASE = HELD_OUT_SEED_OFFSET + (1 << 31) + (1 << 30)


def held_out_design(n_per_style: int, styles: Sequence[str] = STYLES, seed: int = 0) -> dict[str, Any]:
    """The fixed measurement set: per style, `n_per_style` held-out identities with held-out
    expressions and scenes. {"ids": (N,), "expr_seeds": (N,), "scene_seeds": (N,), "styles": [N]}."""
    n = n_per_style * len(styles)
    k = np.arange(n)
    base = _SEED_BASE + seed * 4 * n
    return {
        "ids": TEST_IDENTITIES[0] + k,
        "expr_seeds": base + 2 * k,
        "scene_seeds": base + 2 * k + 1,
        "styles": [styles[int(i) // n_per_style] for i in k],
    }


@torch.no_grad()
def vae_reconstruct(backbone: Backbone, images: Tensor) -> Tensor:
    """(B, 3, H, W) [0, 1] -> VAE reconstructions (posterior mode) in [0, 1]."""
    latents = backbone.encode_images(to_signed(images), sample=False)
    return to_unit(backbone.decode_latents(latents).float())


@torch.no_grad()
def one_step_reconstruct(
    backbone: Backbone, images: Tensor, prompts: list[str], timestep: int, generator: torch.Generator
) -> Tensor:
    """(B, 3, H, W) [0, 1] -> decoded one-step x0 estimates from latents noised to `timestep`."""
    latents = backbone.encode_images(to_signed(images), sample=False)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    scheduler = backbone.noise_scheduler
    t = torch.full((len(latents),), timestep, dtype=torch.long, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    cond = backbone.encode_prompt(prompts)
    pred = backbone.unet(
        noisy, t, cond["encoder_hidden_states"], added_cond_kwargs=cond["added_cond_kwargs"]
    ).sample
    alpha = scheduler.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1).to(latents.dtype)
    if scheduler.config.prediction_type == "v_prediction":
        x0 = alpha.sqrt() * noisy - (1 - alpha).sqrt() * pred
    else:
        x0 = (noisy - (1 - alpha).sqrt() * pred) / alpha.sqrt()
    return to_unit(backbone.decode_latents(x0).float())


def _psnr(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Per-image PSNR (images in [0, 1]) over the pixels where `mask` (B, 1, H, W) is set."""
    m = mask.expand_as(a)
    mse = ((a - b) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def measure(
    backbone: Backbone,
    n_per_style: int = 192,
    styles: Sequence[str] = STYLES,
    batch: int = 64,
    expression_analyser: str | dict = "world-expr",
    identity_encoder: str | dict = "world-id",
    blur_sigma: float = 0.8,
    onestep_timesteps: Sequence[int] = (250,),
    seed: int = 0,
) -> dict[str, Any]:
    """Per condition and style: expression error (overall and per parameter), identity similarity and
    feature PSNR against the clean renders. See the module docstring for the conditions."""
    expr = build_expression_analyser(expression_analyser)
    ident = build_identity_encoder(identity_encoder)
    size = backbone.default_image_size
    design = held_out_design(n_per_style, styles, seed)
    feature_labels = torch.tensor([PARTS[p] for p in FEATURE_PARTS], dtype=torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    conditions: dict[str, Callable[[Tensor, list[str]], Tensor]] = {
        "clean": lambda x, p: x,
        "blur": lambda x, p: gaussian_blur(x, blur_sigma).clamp(0, 1),
        "down2": lambda x, p: down_up(x).clamp(0, 1),
        "vae": lambda x, p: vae_reconstruct(backbone, x),
    }
    for t in onestep_timesteps:
        conditions[f"onestep@{t}"] = lambda x, p, t=t: one_step_reconstruct(backbone, x, p, t, generator)
    rows: dict[str, dict[str, list[Tensor]]] = {
        c: {"abs_err": [], "id_sim": [], "psnr": []} for c in conditions
    }
    truth_all = []
    n = len(design["ids"])
    for start in track(range(0, n, batch), description="latent ceiling"):
        sl = slice(start, min(start + batch, n))
        identities = [Identity.sample(int(i)) for i in design["ids"][sl]]
        expressions = [Expression.sample(int(s)) for s in design["expr_seeds"][sl]]
        style_list = design["styles"][sl]
        out = render_batch(
            identities,
            expressions,
            style_list,
            size,
            [int(s) for s in design["scene_seeds"][sl]],
            return_parts=True,
        )
        clean = to_tensor(out.images)
        features = torch.isin(out.parts, feature_labels).unsqueeze(1).float()
        rng = np.random.default_rng(int(design["ids"][sl][0]))
        prompts = [sample_prompt(s, i, rng) for s, i in zip(style_list, identities, strict=True)]
        truth = torch.from_numpy(np.stack([e.to_vector() for e in expressions]))
        truth_all.append(truth)
        with torch.no_grad():
            clean_emb = F.normalize(ident(clean), dim=-1)
            for name, fn in conditions.items():
                images = fn(clean, prompts).float().cpu()
                rows[name]["abs_err"].append((expr(images).float() - truth).abs())
                rows[name]["id_sim"].append((F.normalize(ident(images), dim=-1) * clean_emb).sum(-1))
                rows[name]["psnr"].append(_psnr(images, clean, features))
    style_arr = np.array(design["styles"])
    names = Expression.names()
    result: dict[str, Any] = {}
    for name, r in rows.items():
        err, sim, psnr = (torch.cat(r[k]).numpy() for k in ("abs_err", "id_sim", "psnr"))
        per_style = {}
        for s in styles:
            m = style_arr == s
            per_style[s] = {
                "expr_error": float(err[m].mean()),
                "id_sim": float(sim[m].mean()),
                "feature_psnr": float(psnr[m].mean()),
            }
        result[name] = {
            "expr_error": float(err.mean()),
            # 95% CI of the mean over images (per-image errors are independent draws)
            "expr_error_ci95": float(1.96 * err.mean(1).std(ddof=1) / np.sqrt(len(err))),
            "id_sim": float(sim.mean()),
            "feature_psnr": float(psnr.mean()),
            "per_param": {p: float(v) for p, v in zip(names, err.mean(0), strict=True)},
            "per_style": per_style,
        }
    # the error a wrong expression makes: ground truth of one image against the next's
    truth = torch.cat(truth_all)
    result["random_expression"] = {"expr_error": float((truth - truth.roll(1, 0)).abs().mean())}
    return result


def _markdown(record: dict[str, Any]) -> str:
    conds = [c for c in record["conditions"] if c != "random_expression"]
    styles = record["args"]["styles"]
    lines = [
        f"# Latent ceiling of `{record['backbone']}`",
        "",
        f"{record['n_images']} held-out renders ({record['args']['n_per_style']} per style, {record['size']} px); "
        f"expression analyser `{record['expression_analyser']}`, identity encoder `{record['identity_encoder']}`.",
        "",
        "| images | expr error ("
        + " / ".join(styles)
        + ") | mean ± 95% CI | id sim to clean | feature PSNR dB |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for c in conds:
        r = record["conditions"][c]
        per = " / ".join(f"{r['per_style'][s]['expr_error']:.3f}" for s in styles)
        psnr = "identical" if c == "clean" else f"{r['feature_psnr']:.1f}"
        lines.append(
            f"| {c} | {per} | {r['expr_error']:.3f} ± {r['expr_error_ci95']:.3f} | {r['id_sim']:.3f} | {psnr} |"
        )
    lines.append(
        f"| a random other expression | | {record['conditions']['random_expression']['expr_error']:.3f} | | |"
    )
    names = list(record["conditions"]["clean"]["per_param"])
    lines += [
        "",
        "Per parameter (mean absolute error, natural units):",
        "",
        "| parameter | " + " | ".join(conds) + " |",
        "| --- |" + " ---: |" * len(conds),
    ]
    for p in names:
        lines.append(
            f"| {p} | " + " | ".join(f"{record['conditions'][c]['per_param'][p]:.3f}" for c in conds) + " |"
        )
    if "world_fd" in record:
        fd = record["world_fd"]
        lines += [
            "",
            f"world-FD of {fd['n']} text-to-image samples (`benchmarks.diagnostics.base_quality`):",
            "",
            "| features | samples | VAE reconstructions | floor |",
            "| --- | ---: | ---: | ---: |",
        ]
        for f in fd["fd"]:
            lines.append(f"| {f} | {fd['fd'][f]:.4f} | {fd['vae_recon'][f]:.4f} | {fd['floor'][f]:.4f} |")
    return "\n".join(lines) + "\n"


def _figure(record: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    conds = [c for c in record["conditions"] if c != "random_expression"]
    names = list(record["conditions"]["clean"]["per_param"])
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(conds)
    x = np.arange(len(names))
    for k, c in enumerate(conds):
        ax.bar(
            x + (k - (len(conds) - 1) / 2) * width,
            [record["conditions"][c]["per_param"][p] for p in names],
            width,
            label=f"{c} ({record['conditions'][c]['expr_error']:.3f})",
        )
    ax.axhline(
        record["conditions"]["random_expression"]["expr_error"],
        color="grey",
        ls="--",
        lw=1,
        label="random expression (mean)",
    )
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("mean absolute error (natural units)")
    ax.set_title(f"expression error per parameter: {record['backbone']}")
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class LatentCeilingConfig:
    """The latent-ceiling measurement.

    Args:
        backbone: packaged name (emojidiff:tiny-sd15) or diffusers folder.
        n_per_style: held-out renders per style.
        styles: the styles measured.
        batch: images per batch.
        expression_analyser: registry name or JSON spec.
        identity_encoder: registry name or JSON spec.
        blur_sigma: sigma (px) of the blur row.
        onestep_t: timesteps of the one-step x0 rows.
        fd_n: text-to-image samples for the world-FD (0: skip).
        seed: the samples' seed.
        threads: torch threads (0: torch's default).
        out_dir: folder of latent_ceiling.{json,md,png}.
    """

    backbone: str = DEFAULT_BACKBONE
    n_per_style: int = 192
    styles: list[Literal[STYLES]] = field(default_factory=lambda: list(STYLES))
    batch: int = 64
    expression_analyser: str = "world-expr"
    identity_encoder: str = "world-id"
    blur_sigma: float = 0.8
    onestep_t: list[int] = field(default_factory=lambda: [250])
    fd_n: int = 384
    seed: int = 0
    threads: int = 0
    out_dir: Path = Path("outputs/bench/latent_ceiling")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, _ = parse_options(LatentCeilingConfig, argv)

    backbone = Backbone.from_folder(args.backbone, key="--backbone")
    start = time.perf_counter()
    conditions = measure(
        backbone,
        args.n_per_style,
        args.styles,
        args.batch,
        spec_from_text(args.expression_analyser),
        spec_from_text(args.identity_encoder),
        args.blur_sigma,
        args.onestep_t,
        args.seed,
    )
    record: dict[str, Any] = {
        "command": "python -m benchmarks.diagnostics.latent_ceiling",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
        "backbone": str(args.backbone),
        "size": backbone.default_image_size,
        "n_images": args.n_per_style * len(args.styles),
        "expression_analyser": args.expression_analyser,
        "identity_encoder": args.identity_encoder,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "conditions": conditions,
    }
    if args.fd_n > 0:
        specs = {
            "world-id": spec_from_text(args.identity_encoder),
            "world-expr": spec_from_text(args.expression_analyser),
        }
        record["world_fd"] = world_fd(args.backbone, n=args.fd_n, seed=args.seed, specs=specs)
    record["seconds"] = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "latent_ceiling.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out_dir / "latent_ceiling.md").write_text(_markdown(record))
    _figure(record, args.out_dir / "latent_ceiling.png")
    table = Table(title=f"latent ceiling of {args.backbone} ({record['n_images']} held-out renders)")
    for column in ("images", *(f"expr err {s}" for s in args.styles), "id sim", "feature PSNR"):
        table.add_column(column, justify="right")
    for c, r in conditions.items():
        if c == "random_expression":
            continue
        table.add_row(
            c,
            *(f"{r['per_style'][s]['expr_error']:.3f}" for s in args.styles),
            f"{r['id_sim']:.3f}",
            "identical" if c == "clean" else f"{r['feature_psnr']:.1f}",
        )
    Console().print(table)
    if "world_fd" in record:
        fd = record["world_fd"]
        Console().print(
            "world-FD samples: "
            + ", ".join(
                f"{f} {v:.4f} (VAE {fd['vae_recon'][f]:.4f}, floor {fd['floor'][f]:.4f})"
                for f, v in fd["fd"].items()
            )
        )
    print(f"wrote {args.out_dir}/latent_ceiling.{{json,md,png}}")
    return record


if __name__ == "__main__":
    main()
