"""Train the world identity encoder and expression regressor, then report on held-out identities.

    python -m emojidiff.face.world_training --out outputs/analyzers [--seed 0] [--budget-minutes N] [--install]

Every step renders a fresh batch with `emojidiff.world.render_batch` (identities drawn from the
`id_identities` training ids 0 .. id_identities-1, random expressions, styles and scene seeds), so
no image is seen twice, and both networks train on it:

- identity: CosFace (additive cosine margin) classification over the training identities;
- expression: smooth-L1 regression of the 10 Expression parameters scaled to [0, 1] (in its
  quadratic regime, see `TrainConfig.expr_beta`).

Half of the images (`TrainConfig.degrade`) are first softened the way a latent-diffusion decoder
softens a face (Gaussian blur or lost resolution, `augment`), so both analysers read VAE decodes
and one-step reconstructions, which is what the training losses and the tables score.

The defaults (1000 identity and 3600 expression steps of 64 renders) train in about 14 minutes on 2
quiet CPU cores; --budget-minutes scales both step counts to another budget.

The report uses identities from `EVAL_ID_OFFSET` on (never trained on) and expression/scene seeds
from `EVAL_SEED_OFFSET` on (never drawn in training, which draws below 2**31): verification EER,
TAR@FAR=1e-3 (overall, per style, cross-style), expression R2 per parameter (overall, per
style) and both again on degraded renders (`DEGRADATIONS`: blur, half resolution).
`same_person_threshold` is the EER threshold on a separate validation set of identities
(`VAL_ID_OFFSET`), so the test figures at that threshold are not tuned on the test pairs.

Writes to --out: world_id.{safetensors,json}, world_expr.{safetensors,json}, report.json,
report.md, config.json (the resolved config, seed included); --install copies them to
emojidiff/face/weights/ (the report as world_report.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch import Tensor, nn

from emojidiff.degradations import down_up, gaussian_blur
from emojidiff.face.world_models import WEIGHTS_DIR, WorldExpressionRegressor, WorldIdentityEncoder
from emojidiff.splits import ANALYSER_TRAIN_IDENTITIES, HELD_OUT_SEED_OFFSET, TEST_IDENTITIES, VAL_IDENTITIES
from emojidiff.world import PARTS, STYLES, Expression, Identity, render_batch

__all__ = [
    "CosFaceHead",
    "TrainConfig",
    "evaluate_expression",
    "evaluate_identity",
    "main",
    "render_images",
    "roc_metrics",
    "run",
    "train_models",
]

EVAL_ID_OFFSET = TEST_IDENTITIES[0]  # test identities: EVAL_ID_OFFSET + k
VAL_ID_OFFSET = VAL_IDENTITIES[0]  # threshold-calibration identities
EVAL_SEED_OFFSET = HELD_OUT_SEED_OFFSET  # expression/scene seeds of evaluation renders (training draws < 2**31)
_TRAIN_SEED_HIGH = 1 << 31
MIN_IRIS_PIXELS = 2  # renders with fewer visible iris pixels (both eyes) have unobservable gaze
#: The held-out report's degradations: what a generator's decoder does to a face (robustness block).
DEGRADATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "clean": lambda x: x,
    "blur0.8": lambda x: gaussian_blur(x, 0.8).clamp(0, 1),
    "blur1.2": lambda x: gaussian_blur(x, 1.2).clamp(0, 1),
    "down2": lambda x: down_up(x, 2.0).clamp(0, 1),
}


@dataclass
class TrainConfig:
    """Everything a run depends on; written to config.json (with resolved step counts)."""

    seed: int = 0
    threads: int = 2
    size: int = 64
    styles: tuple[str, ...] = STYLES
    augment: bool = True  # light photometric noise, see `augment`
    # Fraction of training images softened as a generator softens them (Gaussian blur or lost
    # resolution, see `augment`), so the analysers read VAE decodes and one-step reconstructions
    # as they read clean renders. 0 turns it off (the analysers of the first release).
    degrade: float = 0.5
    warmup: float = 0.05  # fraction of steps with linear warm-up, then cosine to 2% of the peak
    batch: int = 64  # renders per step, shared by both models
    id_steps: int = 1000
    expr_steps: int = 3600  # still improving here: 2400 steps gave mean R2 0.89, 3600 0.92
    # identity encoder
    id_identities: int = ANALYSER_TRAIN_IDENTITIES[1] - ANALYSER_TRAIN_IDENTITIES[0]  # ids 0 .. id_identities-1
    id_lr: float = 3e-3
    id_weight_decay: float = 5e-4
    cosface_scale: float = 30.0
    cosface_margin: float = 0.25
    id_arch: dict[str, Any] = field(default_factory=dict)
    # expression regressor
    expr_lr: float = 3e-3
    expr_weight_decay: float = 1e-4
    # Smooth-L1 transition in [0, 1] target units. At 1.0 every error is in the quadratic regime
    # (0.5 * MSE): R2 is an MSE figure, and the subtle gaze parameters learn far faster than
    # under L1 (gaze_y R2 0.12 -> 0.48 at 2000 steps in our runs).
    expr_beta: float = 1.0
    expr_arch: dict[str, Any] = field(default_factory=dict)
    # time budget: when set, both step counts are scaled to it (and recorded in config.json)
    budget_minutes: float | None = None
    # evaluation
    eval_identities: int = 200
    eval_renders: int = 12  # per identity, split evenly over styles
    expr_eval_renders: int = 6  # per held-out identity
    val_identities: int = 100
    val_renders: int = 6


# --------------------------------------------------------------------------------------------
# data


def render_images(
    id_vectors: np.ndarray, expr_vectors: np.ndarray, styles: Sequence[str], seeds: Sequence[int], size: int
) -> Tensor:
    """Render and convert: (B, 18), (B, 10) parameter vectors -> (B, 3, size, size) float32 [0, 1]."""
    out = render_batch(id_vectors, expr_vectors, list(styles), size=size, seeds=[int(s) for s in seeds])
    return out.images.permute(0, 3, 1, 2).float().div_(255.0)


def expression_vectors(seeds: Sequence[int]) -> np.ndarray:
    """(B, 10) natural-unit vectors of Expression.sample(seed) for each seed."""
    return np.stack([Expression.sample(int(s)).to_vector() for s in seeds])


def identity_vectors(ids: Sequence[int]) -> np.ndarray:
    """(B, 18) vectors of Identity.sample(i) for each id."""
    return np.stack([Identity.sample(int(i)).to_vector() for i in ids])


class WorldStream:
    """Fresh random training batches drawn from `rng`: identities among ids 0 .. identity_pool-1
    (their vectors cached), random expressions, styles and scene seeds."""

    def __init__(self, rng: np.random.Generator, cfg: TrainConfig, identity_pool: int):
        self.rng, self.cfg, self.pool = rng, cfg, identity_pool
        self.id_cache = identity_vectors(range(identity_pool))

    def batch(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """images (B, 3, S, S) [0, 1], identity labels (B,) int64, expressions (B, 10) natural units."""
        rng = self.rng
        labels = rng.integers(0, self.pool, batch_size)
        exprs = expression_vectors(rng.integers(0, _TRAIN_SEED_HIGH, batch_size))
        styles = [self.cfg.styles[i] for i in rng.integers(0, len(self.cfg.styles), batch_size)]
        seeds = rng.integers(0, _TRAIN_SEED_HIGH, batch_size)
        images = render_images(self.id_cache[labels], exprs, styles, seeds, self.cfg.size)
        return images, torch.from_numpy(labels).long(), torch.from_numpy(exprs)


def augment(images: Tensor, gen: torch.Generator, degrade: float = 0.0) -> Tensor:
    """Light photometric noise so the analysers tolerate generated (slightly soft, noisy,
    off-tone) images without losing the pixel-level cues of gaze: per-image gain (+-5%) and
    offset (+-2.5%), a 3x3 binomial blur on a tenth, Gaussian noise up to sigma 0.01. Same shape.

    `degrade`: the fraction of images that are first softened the way a latent-diffusion decoder
    softens them: half of those by a Gaussian blur of sigma U(0.3, 1.3) px, half by losing
    resolution (down to 1/U(1.3, 2.5) of the side and back up, `emojidiff.degradations`)."""
    b = images.shape[0]
    if degrade > 0:
        chosen = torch.rand(b, generator=gen) < degrade
        blur = chosen & (torch.rand(b, generator=gen) < 0.5)
        sigmas = 0.3 + torch.rand(b, generator=gen)
        factors = 1.3 + 1.2 * torch.rand(b, generator=gen)
        images = images.clone()
        if bool(blur.any()):
            images[blur] = gaussian_blur(images[blur], sigmas[blur])
        for k in torch.nonzero(chosen & ~blur).flatten().tolist():
            images[k : k + 1] = down_up(images[k : k + 1], float(factors[k]))
    gain = 1.0 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.1
    offset = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.05
    images = (images - 0.5) * gain + 0.5 + offset
    blur = torch.rand(b, generator=gen) < 0.1
    if bool(blur.any()):
        k1 = torch.tensor([0.25, 0.5, 0.25])
        kernel = (k1[:, None] * k1[None, :]).expand(3, 1, 3, 3).contiguous()
        images[blur] = F.conv2d(F.pad(images[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.01
    images = images + torch.randn(images.shape, generator=gen) * sigma
    return images.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# training


class CosFaceHead(nn.Module):
    """Additive cosine margin (CosFace): logits s * (cos(theta_j) - m [j = y]) over `num_classes`.

    Input: (B, D) L2-normalised embeddings and (B,) labels; output (B, num_classes) logits.
    """

    def __init__(self, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos = F.linear(F.normalize(embeddings, dim=-1), F.normalize(self.weight, dim=-1))
        return self.scale * (cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype))


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` of the steps, then cosine decay to 2% of the peak."""
    warm = max(1, int(round(warmup * steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, steps - warm))
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
    )


class _IdentityTask:
    """CosFace training of a fresh WorldIdentityEncoder over `cfg.id_identities` classes."""

    name = "identity"

    def __init__(self, cfg: TrainConfig, steps: int):
        self.steps = steps
        self.model = WorldIdentityEncoder(weights=None, arch=cfg.id_arch).train()
        self.head = CosFaceHead(self.model.embedding_dim, cfg.id_identities, cfg.cosface_scale, cfg.cosface_margin)
        self.optimizer = torch.optim.AdamW(
            [{"params": self.model.parameters()}, {"params": self.head.parameters(), "weight_decay": 0.0}],
            lr=cfg.id_lr, weight_decay=cfg.id_weight_decay,
        )
        self.schedule = cosine_schedule(self.optimizer, steps, cfg.warmup)

    def step(self, images: Tensor, labels: Tensor, exprs: Tensor) -> tuple[float, float]:
        """One update; returns (CosFace loss, batch accuracy under the margin)."""
        logits = self.head(self.model(images), labels)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return loss.item(), (logits.argmax(1) == labels).float().mean().item()


class _ExpressionTask:
    """Smooth-L1 regression of [0, 1]-scaled Expression parameters by a fresh WorldExpressionRegressor."""

    name = "expression"

    def __init__(self, cfg: TrainConfig, steps: int):
        self.steps = steps
        self.model = WorldExpressionRegressor(weights=None, arch=cfg.expr_arch).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.expr_lr, weight_decay=cfg.expr_weight_decay)
        self.schedule = cosine_schedule(self.optimizer, steps, cfg.warmup)
        self.beta = cfg.expr_beta

    def step(self, images: Tensor, labels: Tensor, exprs: Tensor) -> tuple[float, float]:
        """One update; returns (smooth-L1 loss, mean absolute error on the [0, 1] scale)."""
        pred = self.model.describe_unit(images)
        target = self.model.to_unit(exprs)
        loss = F.smooth_l1_loss(pred, target, beta=self.beta)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return loss.item(), (pred.detach() - target).abs().mean().item()


@dataclass
class TrainResult:
    """Trained models (eval mode; None when not trained) and per-step losses by task name."""

    identity: WorldIdentityEncoder | None
    expression: WorldExpressionRegressor | None
    losses: dict[str, list[float]]
    seconds: float


def train_models(
    cfg: TrainConfig,
    steps: int | None = None,
    tasks: Sequence[str] = ("identity", "expression"),
    seed_offset: int = 0,
    progress: bool = True,
    log_every: int = 25,
) -> TrainResult:
    """Train fresh models on one stream of rendered batches: the identity encoder for
    `cfg.id_steps`, the regressor for `cfg.expr_steps` (`steps` overrides both).

    Each step renders `cfg.batch` new images (identities drawn from the `cfg.id_identities`
    training ids, random expressions, styles and scene seeds) and every model still training
    takes one step on them: rendering costs about as much as a step, so sharing it saves time.
    """
    unknown = set(tasks) - {"identity", "expression"}
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of identity, expression; got {list(tasks)}")
    torch.manual_seed(cfg.seed + seed_offset)
    rng = np.random.default_rng([cfg.seed, seed_offset])
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + seed_offset)
    runners: list[_IdentityTask | _ExpressionTask] = []
    if "identity" in tasks:
        runners.append(_IdentityTask(cfg, cfg.id_steps if steps is None else steps))
    if "expression" in tasks:
        runners.append(_ExpressionTask(cfg, cfg.expr_steps if steps is None else steps))
    total = max(r.steps for r in runners)
    stream = WorldStream(rng, cfg, identity_pool=cfg.id_identities)
    losses: dict[str, list[float]] = {r.name: [] for r in runners}
    metric = {"identity": "acc", "expression": "mae01"}
    recent: dict[str, list[float]] = {r.name: [] for r in runners}
    start = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task("training " + " + ".join(losses), total=total, info="", visible=progress)
        for i in range(total):
            images, labels, exprs = stream.batch(cfg.batch)
            if cfg.augment:
                images = augment(images, gen, cfg.degrade)
            for r in runners:
                if i < r.steps:
                    loss, value = r.step(images, labels, exprs)
                    losses[r.name].append(loss)
                    recent[r.name].append(value)
            if i % log_every == 0 or i == total - 1:
                info = "  ".join(
                    f"{n} loss {np.mean(losses[n][-log_every:]):.4f} {metric[n]} {np.mean(recent[n][-log_every:]):.3f}"
                    for n in losses
                )
                bar.update(task, info=info)
                if progress and not bar.console.is_terminal and i % (8 * log_every) == 0:
                    bar.console.print(f"step {i}/{total}  {info}")  # logs get lines, not a live bar
            bar.advance(task)
    models = {r.name: r.model.eval() for r in runners}
    return TrainResult(models.get("identity"), models.get("expression"), losses, time.perf_counter() - start)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# evaluation


def roc_metrics(genuine: np.ndarray, impostor: np.ndarray, far_targets: Sequence[float] = (1e-3,)) -> dict[str, Any]:
    """Verification figures from similarity scores (higher = more alike).

    Returns eer, eer_threshold, and for each FAR target the threshold (the impostor quantile)
    and TAR (fraction of genuine scores above it), plus pair counts.
    """
    gen = np.sort(np.asarray(genuine, np.float64))
    imp = np.sort(np.asarray(impostor, np.float64))
    thresholds = np.unique(np.concatenate([gen, imp]))
    far = 1.0 - np.searchsorted(imp, thresholds, side="left") / imp.size  # impostors >= t
    frr = np.searchsorted(gen, thresholds, side="left") / gen.size  # genuines < t
    i = int(np.argmin(np.abs(far - frr)))
    out: dict[str, Any] = {
        "eer": float((far[i] + frr[i]) / 2),
        "eer_threshold": float(thresholds[i]),
        "genuine_pairs": int(gen.size),
        "impostor_pairs": int(imp.size),
        "genuine_mean": float(gen.mean()),
        "impostor_mean": float(imp.mean()),
    }
    for target in far_targets:
        k = int(math.ceil((1.0 - target) * imp.size)) - 1
        thr = float(imp[min(max(k, 0), imp.size - 1)])
        out[f"tar@far={target:g}"] = float((gen > thr).mean())
        out[f"threshold@far={target:g}"] = thr
    return out


def _design(n_ids: int, renders: int, id_offset: int, seed_offset: int, styles: Sequence[str]) -> dict[str, np.ndarray]:
    """A fixed evaluation design: each identity rendered `renders` times, styles cycled evenly,
    expression and scene seeds unique and disjoint from training."""
    ids = np.repeat(np.arange(n_ids) + id_offset, renders)
    style_idx = np.tile(np.arange(renders) % len(styles), n_ids)
    k = np.arange(n_ids * renders)
    return {"ids": ids, "style": style_idx, "expr_seed": seed_offset + 2 * k, "scene_seed": seed_offset + 2 * k + 1}


@torch.no_grad()
def _run_model(fn: Callable[[Tensor], Tensor], design: dict[str, np.ndarray], styles: Sequence[str], size: int,
               batch: int = 256, degradation: str = "clean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render `design` in chunks, degrade (`DEGRADATIONS`) and apply `fn`; returns outputs (N, K),
    expression vectors (N, 10) and the number of visible iris pixels per render (N,)."""
    degrade = DEGRADATIONS[degradation]
    outs, exprs_all, iris = [], [], []
    n = design["ids"].size
    for s in range(0, n, batch):
        sl = slice(s, min(n, s + batch))
        exprs = expression_vectors(design["expr_seed"][sl])
        out = render_batch(identity_vectors(design["ids"][sl]), exprs, [styles[i] for i in design["style"][sl]],
                           size=size, seeds=[int(v) for v in design["scene_seed"][sl]], return_parts=True)
        outs.append(fn(degrade(out.images.permute(0, 3, 1, 2).float().div_(255.0))).float().numpy())
        exprs_all.append(exprs)
        assert out.parts is not None
        iris.append((out.parts == PARTS["iris"]).flatten(1).sum(1).numpy())
    return np.concatenate(outs), np.concatenate(exprs_all), np.concatenate(iris)


def _pair_scores(emb: np.ndarray, ids: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor cosine scores over unordered pairs (i < j) with i in A, j in B or
    i in B, j in A."""
    sim = emb @ emb.T
    iu, ju = np.triu_indices(len(ids), k=1)
    keep = (mask_a[iu] & mask_b[ju]) | (mask_b[iu] & mask_a[ju])
    iu, ju = iu[keep], ju[keep]
    same = ids[iu] == ids[ju]
    scores = sim[iu, ju]
    return scores[same], scores[~same]


def evaluate_identity(model: WorldIdentityEncoder, cfg: TrainConfig, n_ids: int | None = None,
                      renders: int | None = None, id_offset: int = EVAL_ID_OFFSET,
                      seed_offset: int = EVAL_SEED_OFFSET, threshold: float | None = None,
                      degradation: str = "clean") -> dict[str, Any]:
    """Verification on held-out identities: overall, per style (both images in it) and cross-style
    (images in different styles). With `threshold`, also FAR/FRR at that similarity. Every image
    is degraded by `degradation` (a key of `DEGRADATIONS`) first."""
    n_ids = cfg.eval_identities if n_ids is None else n_ids
    renders = cfg.eval_renders if renders is None else renders
    design = _design(n_ids, renders, id_offset, seed_offset, cfg.styles)
    emb, _, _ = _run_model(model, design, cfg.styles, cfg.size, degradation=degradation)
    ids, style = design["ids"], design["style"]
    everything = np.ones_like(ids, dtype=bool)
    report: dict[str, Any] = {"identities": n_ids, "renders_per_identity": renders, "first_identity": id_offset}
    report["overall"] = roc_metrics(*_pair_scores(emb, ids, everything, everything))
    report["per_style"] = {}
    for k, name in enumerate(cfg.styles):
        m = style == k
        report["per_style"][name] = roc_metrics(*_pair_scores(emb, ids, m, m))
    gen, imp = [], []
    for a in range(len(cfg.styles)):
        for b in range(a + 1, len(cfg.styles)):
            g, i = _pair_scores(emb, ids, style == a, style == b)
            gen.append(g)
            imp.append(i)
    if gen:
        report["cross_style"] = roc_metrics(np.concatenate(gen), np.concatenate(imp))
    if threshold is not None:
        g, i = _pair_scores(emb, ids, everything, everything)
        report["at_threshold"] = {"threshold": threshold, "far": float((i >= threshold).mean()),
                                  "frr": float((g < threshold).mean())}
    return report


def r2_scores(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-column coefficient of determination of (N, K) predictions."""
    ss_res = ((pred - target) ** 2).sum(0)
    ss_tot = ((target - target.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / np.maximum(ss_tot, 1e-12)


def evaluate_expression(model: WorldExpressionRegressor, cfg: TrainConfig, n_ids: int | None = None,
                        renders: int | None = None, id_offset: int = EVAL_ID_OFFSET,
                        seed_offset: int = EVAL_SEED_OFFSET + (1 << 30), degradation: str = "clean") -> dict[str, Any]:
    """R2 and MAE (natural units) per Expression parameter on held-out identities with unseen
    expressions, overall and per style; images degraded by `degradation` first."""
    n_ids = cfg.eval_identities if n_ids is None else n_ids
    renders = cfg.expr_eval_renders if renders is None else renders
    design = _design(n_ids, renders, id_offset, seed_offset, cfg.styles)
    pred, target, iris = _run_model(model, design, cfg.styles, cfg.size, degradation=degradation)
    names = Expression.names()

    def block(mask: np.ndarray) -> dict[str, Any]:
        r2 = r2_scores(pred[mask], target[mask])
        mae = np.abs(pred[mask] - target[mask]).mean(0)
        return {"renders": int(mask.sum()), "mean_r2": float(r2.mean()), "mean_mae": float(mae.mean()),
                "r2": dict(zip(names, map(float, r2), strict=True)),
                "mae": dict(zip(names, map(float, mae), strict=True))}

    report: dict[str, Any] = {"identities": n_ids, "renders_per_identity": renders, "first_identity": id_offset}
    report["overall"] = block(np.ones(len(pred), dtype=bool))
    report["per_style"] = {name: block(design["style"] == k) for k, name in enumerate(cfg.styles)}
    # Gaze is only observable through the iris, which at 64 px is a few pixels and vanishes when
    # the eyes are near-closed: this block separates model error from what the pixels hold.
    report["iris_visible"] = block(iris >= MIN_IRIS_PIXELS)
    report["iris_visible"]["min_iris_pixels"] = MIN_IRIS_PIXELS
    return report


def _robustness_row(ex: dict[str, Any], idr: dict[str, Any]) -> dict[str, float]:
    """One row of the robustness table from the "overall" blocks of the two evaluations."""
    return {"expr_mae": ex["mean_mae"], "expr_r2": ex["mean_r2"], "id_eer": idr["eer"],
            "id_genuine_mean": idr["genuine_mean"]}


def evaluate_robustness(id_model: WorldIdentityEncoder, ex_model: WorldExpressionRegressor, cfg: TrainConfig,
                        degradations: Sequence[str] = tuple(DEGRADATIONS),
                        clean: tuple[dict[str, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The analysers on degraded held-out renders (`DEGRADATIONS`: what a decoder does to a face):
    per degradation, expression mean MAE and R2 (the expression design) and identity EER (every
    image of the verification design degraded). {degradation: {"expr_mae", "expr_r2", "id_eer"}}.
    `clean`: the (expression, identity) reports already computed on clean renders, reused for
    the "clean" row instead of evaluating again."""
    out = {}
    for name in degradations:
        if name == "clean" and clean is not None:
            ex, idr = clean[0]["overall"], clean[1]["overall"]
        else:
            ex = evaluate_expression(ex_model, cfg, degradation=name)["overall"]
            idr = evaluate_identity(id_model, cfg, degradation=name)["overall"]
        out[name] = _robustness_row(ex, idr)
    return out


# --------------------------------------------------------------------------------------------
# report


def _markdown(report: dict[str, Any]) -> str:
    idr, exr, meta = report["identity"], report["expression"], report["meta"]
    o = idr["overall"]
    lines = [
        "# World analysers: held-out report",
        "",
        f"Trained in {meta['train_seconds']:.0f} s ({meta['id_steps']} identity and {meta['expr_steps']} "
        f"expression steps on batches of {meta['batch']} fresh renders, shared while both train) on {meta['threads']} CPU threads; seed {meta['seed']}; evaluated with the fp16 "
        "weights as packaged.",
        "",
        f"## Identity verification (world-id, {idr['identities']} held-out identities x "
        f"{idr['renders_per_identity']} renders, unseen expressions)",
        "",
        "| pairs | genuine | impostor | EER | TAR@FAR=1e-3 | EER threshold |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(name: str, r: dict[str, Any]) -> str:
        return (f"| {name} | {r['genuine_pairs']} | {r['impostor_pairs']} | {100 * r['eer']:.2f}% | "
                f"{100 * r['tar@far=0.001']:.2f}% | {r['eer_threshold']:.3f} |")

    lines.append(row("all", o))
    for name, r in idr["per_style"].items():
        lines.append(row(f"both {name}", r))
    if "cross_style" in idr:
        lines.append(row("cross-style", idr["cross_style"]))
    t = idr.get("at_threshold")
    if t:
        lines += ["", f"Packaged `same_person_threshold` = {t['threshold']:.3f} (EER threshold on "
                  f"{meta['val_identities']} separate validation identities): on the test pairs FAR "
                  f"{100 * t['far']:.3f}%, FRR {100 * t['frr']:.2f}%."]
    names = list(exr["overall"]["r2"])
    lines += [
        "",
        f"## Expression regression (world-expr, {exr['identities']} held-out identities x "
        f"{exr['renders_per_identity']} renders)",
        "",
        "| parameter | R2 | MAE | " + " | ".join(f"R2 {s}" for s in exr["per_style"]) + " | R2 iris visible |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in exr["per_style"]) + " | ---: |",
    ]
    vis = exr["iris_visible"]
    for n in names:
        per = " | ".join(f"{r['r2'][n]:.3f}" for r in exr["per_style"].values())
        lines.append(f"| {n} | {exr['overall']['r2'][n]:.3f} | {exr['overall']['mae'][n]:.3f} | {per} | "
                     f"{vis['r2'][n]:.3f} |")
    per = " | ".join(f"**{r['mean_r2']:.3f}**" for r in exr["per_style"].values())
    lines.append(f"| **mean** | **{exr['overall']['mean_r2']:.3f}** | {exr['overall']['mean_mae']:.3f} | {per} | "
                 f"**{vis['mean_r2']:.3f}** |")
    lines += [
        "",
        f"MAE is in each parameter's natural units. \"iris visible\": the {vis['renders']} of "
        f"{exr['overall']['renders']} renders with at least {vis['min_iris_pixels']} iris pixels; gaze is "
        "not observable in the others (eyes near-closed, or irises too small at 64 px).",
        "",
    ]
    rob = report.get("robustness")
    if rob:
        lines += [
            "## Robustness: degraded renders (what a decoder does to a face)",
            "",
            f"Training softened {100 * meta.get('degrade', 0):.0f}% of the images (Gaussian blur or lost resolution). "
            "Same held-out designs as above, every image degraded: blur0.8/1.2 = Gaussian blur of that sigma in px, "
            "down2 = half the resolution and back.",
            "",
            "| images | expression MAE | expression mean R2 | identity EER | genuine cosine |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, r in rob.items():
            lines.append(f"| {name} | {r['expr_mae']:.3f} | {r['expr_r2']:.3f} | {100 * r['id_eer']:.2f}% | "
                         f"{r['id_genuine_mean']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def _print_summary(report: dict[str, Any], console: Console) -> None:
    idr, exr = report["identity"], report["expression"]
    table = Table(title="world analysers on held-out identities")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("EER (all pairs)", f"{100 * idr['overall']['eer']:.2f}%")
    table.add_row("TAR@FAR=1e-3", f"{100 * idr['overall']['tar@far=0.001']:.2f}%")
    for name, r in idr["per_style"].items():
        table.add_row(f"EER {name}", f"{100 * r['eer']:.2f}%")
    if "cross_style" in idr:
        table.add_row("EER cross-style", f"{100 * idr['cross_style']['eer']:.2f}%")
    for name, v in exr["overall"]["r2"].items():
        table.add_row(f"R2 {name}", f"{v:.3f}")
    table.add_row("mean R2", f"{exr['overall']['mean_r2']:.3f}")
    table.add_row("mean R2 (iris visible)", f"{exr['iris_visible']['mean_r2']:.3f}")
    table.add_row("train seconds", f"{report['meta']['train_seconds']:.0f}")
    console.print(table)


def _calibrate(cfg: TrainConfig, console: Console) -> TrainConfig:
    """Scale `id_steps` and `expr_steps` (keeping their ratio) so that training fits
    `budget_minutes`; step costs are timed on throwaway models."""
    def per_step(tasks: tuple[str, ...]) -> float:
        train_models(cfg, steps=2, tasks=tasks, seed_offset=99, progress=False)  # warm-up
        return train_models(cfg, steps=4, tasks=tasks, seed_offset=98, progress=False).seconds / 4

    both, id_only, expr_only = per_step(("identity", "expression")), per_step(("identity",)), per_step(("expression",))
    shared = min(cfg.id_steps, cfg.expr_steps)
    alone = (cfg.id_steps - shared) * id_only + (cfg.expr_steps - shared) * expr_only
    factor = cfg.budget_minutes * 60.0 * 0.98 / (shared * both + alone)
    cfg.id_steps = max(10, int(cfg.id_steps * factor))
    cfg.expr_steps = max(10, int(cfg.expr_steps * factor))
    console.print(f"calibrated: {both:.3f} s/step for both models, {id_only:.3f} identity, {expr_only:.3f} expression "
                  f"-> {cfg.id_steps} identity and {cfg.expr_steps} expression steps for {cfg.budget_minutes} min")
    return cfg


def run(cfg: TrainConfig, out: Path, install: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Train both models, save them to `out`, evaluate the saved (fp16) weights, write reports."""
    console = console or Console()
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.budget_minutes:
        cfg = _calibrate(cfg, console)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    result = train_models(cfg)
    assert result.identity is not None and result.expression is not None
    resolved = {**asdict(cfg), "id_net": asdict(result.identity.net.config),
                "expr_net": asdict(result.expression.net.config)}
    (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    id_path = result.identity.save(out / "world_id.safetensors")
    ex_path = result.expression.save(out / "world_expr.safetensors")
    id_model, ex_model = WorldIdentityEncoder(id_path), WorldExpressionRegressor(ex_path)

    console.print("evaluating the saved weights on held-out identities ...")
    eval_start = time.perf_counter()
    val = evaluate_identity(id_model, cfg, cfg.val_identities, cfg.val_renders, id_offset=VAL_ID_OFFSET,
                            seed_offset=EVAL_SEED_OFFSET + (1 << 31))
    threshold = round(val["overall"]["eer_threshold"], 4)
    id_model.same_person_threshold = threshold
    id_model.save(out / "world_id.safetensors", extra={"validation_eer": val["overall"]["eer"]})
    id_report = evaluate_identity(id_model, cfg, threshold=threshold)
    ex_report = evaluate_expression(ex_model, cfg)
    robustness = evaluate_robustness(id_model, ex_model, cfg, clean=(ex_report, id_report))
    meta = {
        "seed": cfg.seed, "threads": cfg.threads, "id_steps": cfg.id_steps, "expr_steps": cfg.expr_steps,
        "batch": cfg.batch, "degrade": cfg.degrade,
        "train_seconds": result.seconds, "eval_seconds": time.perf_counter() - eval_start,
        "val_identities": cfg.val_identities,
        "id_final_loss": float(np.mean(result.losses["identity"][-25:])),
        "expr_final_loss": float(np.mean(result.losses["expression"][-25:])),
        "id_params": sum(p.numel() for p in id_model.parameters()),
        "expr_params": sum(p.numel() for p in ex_model.parameters()),
        "torch": torch.__version__, "machine": platform.machine(),
    }
    report = {"meta": meta, "identity": id_report, "identity_validation": val, "expression": ex_report,
              "robustness": robustness}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    _print_summary(report, console)
    if install:
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("world_id.safetensors", "world_id.json", "world_expr.safetensors", "world_expr.json"):
            shutil.copy2(out / name, WEIGHTS_DIR / name)
        shutil.copy2(out / "report.md", WEIGHTS_DIR / "world_report.md")
        shutil.copy2(out / "report.json", WEIGHTS_DIR / "world_report.json")
        console.print(f"installed weights and report into {WEIGHTS_DIR}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="scale the step counts to this training time (default: fixed step counts)")
    parser.add_argument("--id-steps", type=int, default=TrainConfig.id_steps)
    parser.add_argument("--expr-steps", type=int, default=TrainConfig.expr_steps)
    parser.add_argument("--batch", type=int, default=TrainConfig.batch)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--degrade", type=float, default=TrainConfig.degrade,
                        help="fraction of training images blurred or down-sampled (see `augment`; 0: off)")
    parser.add_argument("--install", action="store_true", help="copy weights and report into emojidiff/face/weights/")
    args = parser.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, threads=args.threads, id_steps=args.id_steps, expr_steps=args.expr_steps,
                      batch=args.batch, degrade=args.degrade,
                      budget_minutes=args.budget_minutes)
    run(cfg, args.out, install=args.install)


if __name__ == "__main__":
    main()
