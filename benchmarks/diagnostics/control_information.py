"""How much of each expression parameter a control signal carries, before any generator is trained.

A generator conditioned on a control can transfer at most what the control holds. This reads the
world's 10 true expression parameters back out of each control's features, computed from held-out
renders exactly as the expression encoders compute them for a template, with a ridge regression
fitted on two thirds of the renders (its strength chosen on a held-out fifth of those) and scored
on the last third (other people, other expressions): R^2 = 1 - MSE / Var(truth) per parameter.
A linear read-out is a lower bound of what the adapter's MLP projection could use; a parameter
a control does not hold at all (gaze in landmarks) reads near 0 however it is read.

    python -m benchmarks.diagnostics.control_information --out_dir docs/results/control_information
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.diagnostics.identity_attributes import r2
from emojidiff.images import to_tensor
from emojidiff.models.bundle import build_expression_encoder
from emojidiff.options import parse_options
from emojidiff.splits import VAL_IDENTITIES, VAL_SEEDS
from emojidiff.world import STYLES, Expression, Identity, render_batch
from emojidiff.world.landmarks import landmarks68, to_face_frame

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
OFFSET = 700_000  # val-split people and seeds apart from the val panels' and the probes' first ones


@dataclass
class ControlInformation:
    """Options.

    Args:
        renders: held-out world renders (one person, expression, scene and style each).
        size: render side in pixels (the templates' side in training).
        out_dir: where control_information.json / .md are written.
        seed: the renders' draw (people, expressions, scenes).
        controls: which of `CONTROLS` to measure (None: all).
        threads: torch threads (0: torch's default).
    """

    renders: int = 3000
    size: int = 64
    out_dir: Path = Path("docs/results/control_information")
    seed: int = 0
    controls: list[str] | None = None
    threads: int = 0


@dataclass
class Renders:
    images: torch.Tensor  # (N, 3, S, S) [0, 1]
    masks: torch.Tensor  # (N, 1, S, S) face masks
    identities: np.ndarray  # (N, 18)
    expressions: np.ndarray  # (N, 10) natural units: the truth
    styles: list[str]
    seeds: list[int]


def held_out_renders(n: int, size: int, seed: int, batch: int = 250) -> Renders:
    rng = np.random.default_rng([seed, 0xC0])
    people = VAL_IDENTITIES[0] + OFFSET + rng.permutation(100_000)[:n]
    expr_seeds = VAL_SEEDS[0] + OFFSET + 2 * np.arange(n)
    ids = np.stack([Identity.sample(int(p)).to_vector() for p in people])
    exprs = np.stack([Expression.sample(int(s)).to_vector() for s in expr_seeds])
    styles = [STYLES[int(k)] for k in rng.integers(0, len(STYLES), n)]
    seeds = [int(s) + 1 for s in expr_seeds]
    images, masks = [], []
    for start in tqdm(range(0, n, batch), desc="renders", unit="batch"):
        sl = slice(start, start + batch)
        out = render_batch(ids[sl], exprs[sl], styles[sl], size=size, seeds=seeds[sl])
        images.append(to_tensor(out.images))
        masks.append(out.masks[:, None].float())
    return Renders(torch.cat(images), torch.cat(masks), ids, exprs, styles, seeds)


def _encoder(spec: str | dict) -> Callable[[Renders], np.ndarray]:
    """The features of an expression encoder (built when first called) for the renders: (N, L * F)."""

    def features(r: Renders) -> np.ndarray:
        encoder = build_expression_encoder(spec)
        with torch.no_grad():
            out = [encoder(r.images[k : k + 250], r.masks[k : k + 250]) for k in range(0, len(r.images), 250)]
        return torch.cat(out).flatten(1).numpy()

    return features


def _label_features(r: Renders) -> np.ndarray:
    onehot_intensity = _encoder("emotion_label")(r)
    onehot, intensity = onehot_intensity[:, :-1], onehot_intensity[:, -1:]
    return np.c_[onehot_intensity, onehot * intensity]  # the label's own scale along each preset


def _renderer_landmarks(r: Renders) -> np.ndarray:
    lms = landmarks68(r.identities, r.expressions, r.styles, r.images.shape[-1], r.seeds)
    return to_face_frame(lms).flatten(1).numpy()


#: control -> (what it is, its features from renders); the encoders as training builds them
CONTROLS: dict[str, tuple[str, Callable[[Renders], np.ndarray]]] = {
    "rgb-template": (
        "the method's template features (world_expr_features, 16 tokens of the masked face)",
        _encoder("world_expr_features"),
    ),
    "parameter-vector": (
        "the complete 10-parameter vector (world-expr's reading)",
        _encoder("expression_params"),
    ),
    "landmarks": (
        "68 landmarks, face frame (world-lms's reading)",
        _encoder({"name": "landmarks", "init_args": {}}),
    ),
    "landmarks-image-frame": (
        "68 landmarks, image frame (world-lms's reading)",
        _encoder({"name": "landmarks", "init_args": {"frame": "image"}}),
    ),
    "keypoints-5": (
        "InstantID's 5 keypoints, face frame (world-lms's reading)",
        _encoder({"name": "landmarks", "init_args": {"points": 5}}),
    ),
    "landmarks-exact": (
        "68 landmarks, face frame, the renderer's own (a perfect detector)",
        _renderer_landmarks,
    ),
    "emotion-label": ("the nearest of six presets + an intensity (world-expr's reading)", _label_features),
}


def ridge_r2(features: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Fit on the first two thirds (strength from `RIDGES` chosen on their last fifth), R^2 per
    parameter on the last third."""
    n = len(truth)
    fit_end, test_start = int(n * 2 / 3), int(n * 2 / 3)
    inner = int(fit_end * 0.8)
    x = features.astype(np.float64)
    mean, std = x[:fit_end].mean(0), x[:fit_end].std(0) + 1e-8
    x = np.c_[(x - mean) / std, np.ones(n)]

    def solve(rows: slice, ridge: float) -> np.ndarray:
        a = x[rows]
        return np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ truth[rows])

    scores = {
        lam: r2(x[inner:fit_end] @ solve(slice(0, inner), lam), truth[inner:fit_end]).mean() for lam in RIDGES
    }
    best = max(scores, key=scores.get)
    per = r2(x[test_start:] @ solve(slice(0, fit_end), best), truth[test_start:])
    return {
        "ridge": best,
        "r2": dict(zip(Expression.names(), per.tolist(), strict=True)),
        "mean_r2": float(per.mean()),
    }


def measure(options: ControlInformation) -> dict[str, Any]:
    chosen = list(CONTROLS) if options.controls is None else list(options.controls)
    unknown = [c for c in chosen if c not in CONTROLS]
    if unknown:
        raise ValueError(f"controls: unknown {unknown}; known: {', '.join(CONTROLS)}")
    renders = held_out_renders(options.renders, options.size, options.seed)
    record: dict[str, Any] = {"options": {k: str(v) for k, v in asdict(options).items()}, "controls": {}}
    for name in tqdm(chosen, desc="controls", unit="control"):
        what, features = CONTROLS[name]
        feats = features(renders)
        record["controls"][name] = {
            "what": what,
            "dim": int(feats.shape[1]),
            **ridge_r2(feats, renders.expressions),
        }
    return record


def markdown(record: dict[str, Any]) -> str:
    names = Expression.names()
    lines = [
        f"R^2 of a ridge read-out of each true expression parameter from each control's features "
        f"({record['options']['renders']} held-out renders: fit on two thirds, scored on the last third; "
        "1 = the control holds the parameter, 0 = nothing of it is linearly readable):",
        "",
        "| control | dims | " + " | ".join(names) + " | mean |",
        "| --- | ---: |" + " ---: |" * (len(names) + 1),
    ]
    for name, c in record["controls"].items():
        lines.append(
            f"| **{name}**: {c['what']} | {c['dim']} | "
            + " | ".join(f"{c['r2'][n]:.2f}" for n in names)
            + f" | {c['mean_r2']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options, resolved = parse_options(ControlInformation, argv)
    record = measure(options)
    record["command"] = "python -m benchmarks.diagnostics.control_information " + " ".join(
        argv or sys.argv[1:]
    )
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "control_information.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "control_information.md").write_text("# What each control carries\n\n" + markdown(record))
    (out / "config.yaml").write_text(resolved)
    print(markdown(record))
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
