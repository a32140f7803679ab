"""Which parts of a person a model's outputs carry: skin, hair colour and style, face shape.

Identity similarity says how much of the reference person an output keeps, not what is missing.
This benchmark reads the world's ground truth back out of an identity encoder's embedding:

1. probe: a ridge regression from the encoder's (L2-normalised) embedding to each continuous
   `Identity` field, and a ridge one-vs-rest classifier for `hair_style`, fitted on renders of
   `probe_people` val-split people (random expressions, scenes and styles) and scored on held-out
   renders of other val people: what the embedding holds at all (the ceiling of the rows below);
2. outputs: the model generates the test-protocol rows (a held-out person's reference, another
   person's template), the probe reads each output's embedding, and its reading is scored against
   the reference person's true value (the output carries the attribute) and against the template
   person's (it copied the template).

R^2 = 1 - MSE / Var(truth) over the rows (0: no better than the mean; negative: worse).

    python -m benchmarks.diagnostics.identity_attributes --model emojidiff:emojidiff-world --out_dir outputs/bench/identity_attributes
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.evaluation.figures import image_grid
from benchmarks.evaluation.methods import sample_rows, world_inputs
from benchmarks.evaluation.protocol import world_protocol
from emojidiff.face import build_identity_encoder
from emojidiff.face.analyse import embed_identities
from emojidiff.models.bundle import load_model
from emojidiff.options import parse_options
from emojidiff.splits import VAL_IDENTITIES, VAL_SEEDS, identity_range
from emojidiff.world import STYLES, Expression, Identity, render_batch

CATEGORICAL = "hair_style"
#: The fields the table reports for outputs: those a face-recognition embedding measurably holds
#: (the probe's own R^2 says which; fine features such as eye spacing are not linearly readable).
CONTINUOUS = tuple(p.name for p in Identity.SPACE if not p.categorical)
PROBE_OFFSET = 500_000  # probe people: apart from the val protocol's first people


@dataclass
class AttributeProbe:
    """Ridge read-outs of `Identity` fields from L2-normalised embeddings (B, D)."""

    weights: np.ndarray  # (D + 1, len(CONTINUOUS))
    style_weights: np.ndarray  # (D + 1, number of hair styles)

    @staticmethod
    def _design(emb: np.ndarray) -> np.ndarray:
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        return np.c_[emb, np.ones(len(emb))]

    @classmethod
    def fit(
        cls, emb: np.ndarray, values: np.ndarray, styles: np.ndarray, ridge: float = 1e-2
    ) -> AttributeProbe:
        """emb (N, D); values (N, len(CONTINUOUS)); styles (N,) int hair-style indices."""
        x = cls._design(emb.astype(np.float64))
        gram = x.T @ x + ridge * np.eye(x.shape[1])
        onehot = np.eye(len(Identity.param(CATEGORICAL).choices))[styles]
        return cls(np.linalg.solve(gram, x.T @ values), np.linalg.solve(gram, x.T @ onehot))

    def predict(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, len(CONTINUOUS)) values and (N,) hair-style indices."""
        x = self._design(emb.astype(np.float64))
        return x @ self.weights, (x @ self.style_weights).argmax(1)


def r2(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per column 1 - MSE / Var(truth) of (N, K) arrays."""
    return 1.0 - ((pred - truth) ** 2).mean(0) / truth.var(0)


def truth(identities: Sequence[Identity]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([[getattr(i, f) for f in CONTINUOUS] for i in identities], np.float64)
    return values, np.array([getattr(i, CATEGORICAL) for i in identities], np.int64)


def probe_renders(
    people: int, offset: int = PROBE_OFFSET, seed: int = 0, size: int = 64, batch: int = 200
) -> tuple[list[Identity], np.ndarray]:
    """`people` val-split people, one render each with a random val expression, scene and style."""
    lo, hi = identity_range(VAL_IDENTITIES, people, offset)
    rng = np.random.default_rng(seed)
    identities = [Identity.sample(i) for i in range(lo, hi)]
    exprs = [Expression.sample(int(s)) for s in rng.integers(*VAL_SEEDS, size=people)]
    scenes = [int(s) for s in rng.integers(*VAL_SEEDS, size=people)]
    styles = [STYLES[int(s)] for s in rng.integers(len(STYLES), size=people)]
    images = [
        render_batch(
            identities[s : s + batch],
            exprs[s : s + batch],
            styles[s : s + batch],
            size,
            scenes[s : s + batch],
        ).images.numpy()
        for s in range(0, people, batch)
    ]
    return identities, np.concatenate(images)


def fit_probe(
    encoder: Any, people: int, holdout: float = 0.25, seed: int = 0
) -> tuple[AttributeProbe, dict[str, float]]:
    """The probe fitted on (1 - holdout) of `people` renders and its scores on the rest."""
    identities, images = probe_renders(people, seed=seed)
    emb = embed_identities(encoder, list(images), [f"probe person {i}" for i in range(people)]).numpy()
    values, styles = truth(identities)
    n_fit = int(round(people * (1 - holdout)))
    probe = AttributeProbe.fit(emb[:n_fit], values[:n_fit], styles[:n_fit])
    pred, pred_style = probe.predict(emb[n_fit:])
    scores = dict(zip(CONTINUOUS, r2(pred, values[n_fit:]).tolist(), strict=True))
    scores[CATEGORICAL] = float((pred_style == styles[n_fit:]).mean())
    return probe, scores


def score_outputs(
    probe: AttributeProbe, encoder: Any, images: np.ndarray, rows: Sequence[Any], ceiling: dict[str, float]
) -> dict[str, dict[str, float]]:
    """Per attribute: the probe's own score, and its reading of each image (uint8 (B, S, S, 3), one per
    protocol row) against the row's reference person and against its template person."""
    emb = embed_identities(encoder, list(images), [f"row {r.row_id} output" for r in rows])
    pred, pred_style = probe.predict(emb.numpy())
    ref_values, ref_styles = truth([Identity.sample(r.ref_identity) for r in rows])
    tmpl_values, tmpl_styles = truth([Identity.sample(r.tmpl_identity) for r in rows])
    vs_ref, vs_tmpl = r2(pred, ref_values), r2(pred, tmpl_values)
    attributes = {
        name: {
            "probe": ceiling[name],
            "output_vs_reference": float(vs_ref[j]),
            "output_vs_template": float(vs_tmpl[j]),
        }
        for j, name in enumerate(CONTINUOUS)
    }
    attributes[CATEGORICAL] = {
        "probe": ceiling[CATEGORICAL],
        "output_vs_reference": float((pred_style == ref_styles).mean()),
        "output_vs_template": float((pred_style == tmpl_styles).mean()),
        "majority_class": float(np.bincount(ref_styles).max() / len(ref_styles)),
    }
    return attributes


def protocol_rows(people: int, templates: int, seed: int = 0) -> list[Any]:
    """The test protocol's people x templates pairs, each in one output style (pair % 3): every
    template person is worn by every person, and the styles stay balanced."""
    rows = world_protocol(people, templates, split="test", seed=seed)
    k = len(STYLES)
    return [rows[pair * k + pair % k] for pair in range(people * templates)]


def measure(
    model: str,
    people: int = 32,
    templates: int = 4,
    probe_people: int = 1600,
    encoder_name: str = "world-id-eval",
    steps: int = 30,
    guidance: float = 5.0,
    seed: int = 0,
    grid: Path | None = None,
    grid_rows: int = 12,
) -> dict[str, Any]:
    """The record; `grid`: also a PNG of the first `grid_rows` rows (reference, template, ground truth, output)."""

    encoder = build_identity_encoder(encoder_name)
    probe, ceiling = fit_probe(encoder, probe_people, seed=seed)
    loaded = load_model(model)
    rows = protocol_rows(people, templates, seed)
    inputs = world_inputs(rows, int(loaded.spec.image_size or 64))
    sampling = {"num_inference_steps": steps, "guidance_scale": guidance, "scheduler": "ddim"}
    generated = sample_rows(loaded.pipeline, inputs, sampling)
    ok = generated.ok
    attributes = score_outputs(
        probe, encoder, generated.images[ok], [r for r, k in zip(rows, ok, strict=True) if k], ceiling
    )
    if grid is not None:
        n = min(grid_rows, len(rows))
        image_grid(
            grid,
            inputs.references[:n],
            inputs.templates[:n],
            {
                "ground truth": list(inputs.ground_truth[:n]),
                "output": [im if k else None for im, k in zip(generated.images[:n], ok[:n], strict=True)],
            },
            [f"row {r.row_id} {r.style}" for r in rows[:n]],
        )
    return {
        "model": model,
        "encoder": encoder_name,
        "rows": len(rows),
        "failed_rows": int((~ok).sum()),
        "probe_people": probe_people,
        "sampling": sampling,
        "seed": seed,
        "attributes": attributes,
    }


def markdown(record: dict[str, Any], min_probe_r2: float = 0.3) -> str:
    lines = [
        f"# Identity attributes of `{record['model']}`",
        "",
        f"{record['rows']} test-protocol rows ({record['failed_rows']} failed); probe: ridge on `{record['encoder']}` "
        f"embeddings of {record['probe_people']} val people (fitted on 75%, scored on 25%). Continuous fields: R^2; "
        f"`{CATEGORICAL}`: accuracy. Fields the probe reads with R^2 < {min_probe_r2} are left out of the table.",
        "",
        "| attribute | probe (ceiling) | output vs reference | output vs template |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, a in record["attributes"].items():
        if name != CATEGORICAL and a["probe"] < min_probe_r2:
            continue
        extra = f" (majority class {a['majority_class']:.3f})" if name == CATEGORICAL else ""
        lines.append(
            f"| {name}{extra} | {a['probe']:.3f} | {a['output_vs_reference']:.3f} | {a['output_vs_template']:.3f} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class IdentityAttributesConfig:
    """The identity-attribute probe of a model's outputs.

    Args:
        model: model folder or packaged name.
        people: test-protocol people (rows: people x templates).
        templates: template people, each worn by every person.
        probe_people: val people whose renders fit the probe.
        encoder: identity encoder the probe reads (registry name).
        steps: sampling steps.
        guidance: classifier-free guidance scale.
        seed: the run's seed.
        out_dir: folder of identity_attributes.{json,md,png}.
    """

    model: str = "emojidiff:emojidiff-world"
    people: int = 32
    templates: int = 4
    probe_people: int = 1600
    encoder: str = "world-id-eval"
    steps: int = 30
    guidance: float = 5.0
    seed: int = 0
    out_dir: Path = Path("outputs/bench/identity_attributes")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, _ = parse_options(IdentityAttributesConfig, argv)
    torch.manual_seed(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = measure(
        args.model,
        args.people,
        args.templates,
        args.probe_people,
        args.encoder,
        args.steps,
        args.guidance,
        args.seed,
        grid=args.out_dir / "identity_attributes.png",
    )
    record["command"] = " ".join(
        [
            Path(sys.executable).name,
            "-m",
            "benchmarks.diagnostics.identity_attributes",
            *(argv or sys.argv[1:]),
        ]
    )
    (args.out_dir / "identity_attributes.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out_dir / "identity_attributes.md").write_text(markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
