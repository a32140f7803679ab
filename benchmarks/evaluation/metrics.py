"""Evaluation metrics as torchmetrics `Metric`s, so they sync across DDP ranks with no code of ours.

All images enter as float (B, 3, H, W) RGB in [0, 1].

Per-row metrics (`IdentitySimilarity`, `IdentityLeakage`, `ExpressionError`, `ExpressionErrorGT`,
`DetectionRate`) take `row_ids` (B,) with every batch and keep, per row, the row id (int64), the
value (float64, NaN where the row could not be scored) and a `Failure` code, all as
`dist_reduce_fx="cat"` states. `compute()` is the mean over the rows with a finite value;
`per_row()` gives the synced rows (sorted by id, each id once: a distributed sampler that pads
repeats rows) for bootstrap CIs, per-style tables and failure lists. A row without a face is
recorded as a failure, never dropped.

Set metrics: FID and KID on the TF-FID Inception (`make_fid`, `make_kid`, from
`benchmarks.evaluation.fid_features`), and `WorldFD`, the Frechet distance in the world analysers' feature
spaces. `bootstrap_ci` and `paired_bootstrap_diff` turn per-row values into confidence intervals.

Backends whose `aligner_name` is "none" (the world's CNNs, "dlib-lms") get the float images
directly; the others go through `emojidiff.face.analyse` (`embed_identities`,
`describe_expressions`), which align each image with the model's aligner and give NaN rows where
no face is found.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities.data import dim_zero_cat

from benchmarks.evaluation.fid_features import FrechetDistance, TFInceptionFeatures, make_fid, make_kid
from emojidiff.errors import FaceNotFoundError
from emojidiff.face import build_expression_analyser, build_face_aligner, build_identity_encoder
from emojidiff.face.analyse import describe_expressions, embed_identities
from emojidiff.face.base import ExpressionAnalyser, FaceAligner, IdentityEncoder, tensor_to_images

__all__ = [
    "CI",
    "WORLD_FEATURES",
    "DetectionRate",
    "ExpressionError",
    "ExpressionErrorGT",
    "Failure",
    "IdentityLeakage",
    "IdentitySimilarity",
    "RowMetric",
    "RowScores",
    "TFInceptionFeatures",
    "WorldFD",
    "WorldFeatures",
    "bootstrap_ci",
    "common_rows",
    "make_fid",
    "make_kid",
    "paired_bootstrap_diff",
]


class Failure(enum.IntFlag):
    """Why a row has no value (bit flags, so 3 = no face on either side)."""

    OK = 0
    NO_FACE_OUTPUT = 1  # nothing found in the generated image
    NO_FACE_REFERENCE = 2  # nothing found in the reference / template, or its given vector is NaN
    NOT_FINITE = 4  # both sides scored, but the value is NaN or infinite

    @staticmethod
    def describe(code: int) -> str:
        """'ok' or the names of the set flags, e.g. 'no_face_output+no_face_reference'."""
        if code == 0:
            return "ok"
        return "+".join(f.name.lower() for f in Failure if f and code & f)


# --------------------------------------------------------------------------------------------
# per-row results


@dataclass
class RowScores:
    """Synced per-row results, sorted by row id, each id once.

    row_ids: int64 (N,); values: float64 (N,), NaN where not scored; failures: int64 (N,) `Failure` codes.
    """

    row_ids: np.ndarray
    values: np.ndarray
    failures: np.ndarray

    @property
    def finite(self) -> np.ndarray:
        """bool (N,): rows that count in the mean."""
        return np.isfinite(self.values)

    @property
    def mean(self) -> float:
        """Mean over finite rows (NaN when there is none)."""
        v = self.values[self.finite]
        return float(v.mean()) if v.size else float("nan")

    def failed(self) -> list[tuple[int, str]]:
        """(row id, reason) of every row with a non-zero failure code."""
        return [
            (int(r), Failure.describe(int(c))) for r, c in zip(self.row_ids, self.failures, strict=True) if c
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready {"row_ids": [...], "values": [...] (None for NaN), "failures": [...]}."""
        return {
            "row_ids": self.row_ids.tolist(),
            "values": [float(v) if np.isfinite(v) else None for v in self.values],
            "failures": self.failures.tolist(),
        }


def common_rows(a: RowScores, b: RowScores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two methods' scores on the rows both have: (row_ids, a values, b values), for `paired_bootstrap_diff`."""
    ids, ia, ib = np.intersect1d(a.row_ids, b.row_ids, assume_unique=True, return_indices=True)
    return ids, a.values[ia], b.values[ib]


class RowMetric(Metric):
    """Base of the per-row metrics: states `row_ids` (int64), `values` (float64) and `failures`
    (int64), one entry per row, all gathered by concatenation across ranks.

    Subclasses compute (values, failures) for a batch and call `_record`.
    """

    is_differentiable = False
    full_state_update = False
    higher_is_better: bool | None = None

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("row_ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("failures", default=[], dist_reduce_fx="cat")

    def _record(self, row_ids: Tensor | Sequence[int], values: Tensor, failures: Tensor) -> None:
        """Append a batch: row_ids (B,), values (B,) (NaN where failures != 0), failures (B,) int."""
        ids = torch.as_tensor(row_ids, dtype=torch.int64).reshape(-1)
        values = values.detach().reshape(-1).to(torch.float64)
        failures = failures.detach().reshape(-1).to(torch.int64)
        if not ids.shape[0] == values.shape[0] == failures.shape[0]:
            raise ValueError(f"{type(self).__name__}: {ids.shape[0]} row ids for {values.shape[0]} rows")
        failures = torch.where((failures == 0) & ~torch.isfinite(values), int(Failure.NOT_FINITE), failures)
        values = torch.where(failures == 0, values, torch.full_like(values, float("nan")))
        self.row_ids.append(ids.to(self.device))
        self.values.append(values.to(self.device))
        self.failures.append(failures.to(self.device))

    def _rows(self) -> RowScores:
        """The current (local or synced) states as RowScores, first occurrence of each row id kept."""
        if isinstance(self.row_ids, list) and not self.row_ids:
            return RowScores(np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64))
        ids = dim_zero_cat(self.row_ids).cpu().numpy().astype(np.int64)
        values = dim_zero_cat(self.values).cpu().numpy().astype(np.float64)
        failures = dim_zero_cat(self.failures).cpu().numpy().astype(np.int64)
        ids, first = np.unique(ids, return_index=True)
        return RowScores(ids, values[first], failures[first])

    def compute(self) -> Tensor:
        """Mean over rows with a finite value (each row id once); NaN when there is none."""
        return torch.tensor(self._rows().mean, dtype=torch.float64)

    def per_row(self) -> RowScores:
        """Every row of every rank (a collective call under DDP: call it on all ranks)."""
        if self._is_synced:
            return self._rows()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            return self._rows()


# --------------------------------------------------------------------------------------------
# running the face models


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    return p.device if p is not None else fallback


def _check_images(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what}: expected float images (B, 3, H, W) in [0, 1], got {shape}")


@torch.no_grad()
def _run_whole_images(model: nn.Module, images: Tensor, dim: int) -> Tensor:
    """A model with aligner "none" on (B, 3, H, W) [0, 1]: (B, dim) float32; NaN rows where it
    raised FaceNotFoundError (then it is run one image at a time)."""
    x = images.to(_model_device(model, images.device)).float()
    try:
        return model(x).float()
    except FaceNotFoundError:
        rows = []
        for i in range(x.shape[0]):
            try:
                rows.append(model(x[i : i + 1]).float())
            except FaceNotFoundError:
                rows.append(torch.full((1, dim), float("nan"), device=x.device))
        return torch.cat(rows)


def _names(row_ids: Tensor, role: str) -> list[str]:
    return [f"row {int(r)} ({role})" for r in row_ids]


def identity_embeddings(encoder: IdentityEncoder, x: Tensor, row_ids: Tensor, role: str) -> Tensor:
    """(B, 3, H, W) [0, 1] images -> (B, D) L2-normalised embeddings, NaN rows where no face was found.

    A 2-D x is taken as precomputed (B, D) embeddings and returned as float32.
    """
    if isinstance(x, Tensor) and x.ndim == 2:
        if x.shape[1] != encoder.embedding_dim:
            raise ValueError(f"{role}: embeddings must be (B, {encoder.embedding_dim}), got {tuple(x.shape)}")
        return x.float()
    _check_images(x, role)
    if encoder.aligner_name == "none":
        return _run_whole_images(encoder, x, encoder.embedding_dim)
    return embed_identities(encoder, tensor_to_images(x), _names(row_ids, role), on_missing="nan")


def expression_descriptors(analyser: ExpressionAnalyser, x: Tensor, row_ids: Tensor, role: str) -> Tensor:
    """(B, 3, H, W) [0, 1] images -> (B, K) descriptors, NaN rows where no face was found.

    A 2-D x is taken as given (B, K) descriptors (e.g. ground-truth parameters) and returned as float32.
    """
    if isinstance(x, Tensor) and x.ndim == 2:
        if x.shape[1] != analyser.descriptor_dim:
            raise ValueError(
                f"{role}: descriptors must be (B, {analyser.descriptor_dim}), got {tuple(x.shape)}"
            )
        return x.float()
    _check_images(x, role)
    if analyser.aligner_name == "none":
        return _run_whole_images(analyser, x, analyser.descriptor_dim)
    return describe_expressions(analyser, tensor_to_images(x), _names(row_ids, role))


def _failures(out: Tensor, other: Tensor) -> Tensor:
    """(B,) failure codes from NaN rows of the output's and the other side's vectors (B, *)."""
    no_out = torch.isnan(out).any(dim=-1).cpu()
    no_other = torch.isnan(other).any(dim=-1).cpu()
    return no_out.long() * int(Failure.NO_FACE_OUTPUT) + no_other.long() * int(Failure.NO_FACE_REFERENCE)


def _ids(row_ids: Tensor | Sequence[int], batch: int, who: str) -> Tensor:
    ids = torch.as_tensor(row_ids, dtype=torch.int64).reshape(-1).cpu()
    if ids.shape[0] != batch:
        raise ValueError(f"{who}: {ids.shape[0]} row ids for a batch of {batch}")
    return ids


# --------------------------------------------------------------------------------------------
# identity


class PairedRowMetric(RowMetric):
    """A score per row between the output and one other image of the row (its `other_role`), both
    described by the same network first; NaN descriptions are failures (no face)."""

    other_role: str

    def _describe(self, x: Tensor, row_ids: Tensor, role: str) -> Tensor:
        """(B, 3, H, W) [0, 1] images, or (B, D) descriptions passed through -> (B, D) on the CPU."""
        raise NotImplementedError

    def _score(self, out: Tensor, other: Tensor) -> Tensor:
        """(B, D), (B, D) -> (B,) the row's value."""
        raise NotImplementedError

    def update(self, row_ids: Tensor | Sequence[int], outputs: Tensor, others: Tensor) -> None:
        """row_ids (B,) int; outputs (B, 3, H, W) float [0, 1]; others (B, 3, H', W') float [0, 1]
        images, or their precomputed (B, D) descriptions (NaN rows = no face)."""
        ids = _ids(row_ids, outputs.shape[0], type(self).__name__)
        out = self._describe(outputs, ids, "output").cpu()
        other = self._describe(others, ids, self.other_role).cpu()
        if other.shape[0] != out.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: {out.shape[0]} outputs but {other.shape[0]} {self.other_role}s"
            )
        self._record(ids, self._score(out, other), _failures(out, other))


class IdentitySimilarity(PairedRowMetric):
    """Cosine similarity of the encoder's embeddings of each output and its identity reference.

    encoder: an IdentityEncoder or a registry spec ("world-id", "dlib", ...); use one trained apart
    from the training losses' encoder. Higher is better; range [-1, 1].
    update(row_ids, outputs, references): references as images or (B, D) embeddings.
    """

    higher_is_better = True
    other_role = "reference"

    def __init__(self, encoder: IdentityEncoder | str | Mapping[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.encoder = build_identity_encoder(encoder) if isinstance(encoder, (str, Mapping)) else encoder
        self.encoder.eval()

    def _describe(self, x: Tensor, row_ids: Tensor, role: str) -> Tensor:
        return identity_embeddings(self.encoder, x, row_ids, role)

    def _score(self, out: Tensor, other: Tensor) -> Tensor:
        return IdentityEncoder.similarity(out, other)


class IdentityLeakage(IdentitySimilarity):
    """Cosine similarity of each output to its expression *template* (identity A's face): how much
    of the template's person leaked into the output. Lower is better.

    update(row_ids, outputs, templates): templates (B, 3, H, W) [0, 1] or (B, D) embeddings;
    a template without a face is failure NO_FACE_REFERENCE.
    """

    higher_is_better = False
    other_role = "template"


# --------------------------------------------------------------------------------------------
# expression


class ExpressionError(PairedRowMetric):
    """`analyser.distance` (mean absolute difference) between the descriptors of each output and
    its expression template. Lower is better; in the analyser's units.

    analyser: an ExpressionAnalyser or a registry spec ("world-expr", "dlib-lms", ...).
    update(row_ids, outputs, templates): templates as images or (B, K) descriptors.
    """

    higher_is_better = False
    other_role = "template"

    def __init__(self, analyser: ExpressionAnalyser | str | Mapping[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.analyser = (
            build_expression_analyser(analyser) if isinstance(analyser, (str, Mapping)) else analyser
        )
        self.analyser.eval()

    def _describe(self, x: Tensor, row_ids: Tensor, role: str) -> Tensor:
        return expression_descriptors(self.analyser, x, row_ids, role)

    def _score(self, out: Tensor, other: Tensor) -> Tensor:
        return self.analyser.distance(out, other)


class ExpressionErrorGT(ExpressionError):
    """Mean absolute difference between each output's descriptor and the template's ground-truth
    expression parameters (the world's `Expression` vector, in the analyser's units). Lower is better.

    update(row_ids, outputs, template_params): template_params float (B, K); a NaN row is failure
    NO_FACE_REFERENCE (no ground truth).
    """

    other_role = "ground truth"

    def update(self, row_ids: Tensor | Sequence[int], outputs: Tensor, template_params: Tensor) -> None:
        params = torch.as_tensor(template_params)
        if params.ndim != 2:
            raise ValueError(
                f"ExpressionErrorGT: template_params must be (B, {self.analyser.descriptor_dim}), "
                f"got {tuple(params.shape)}"
            )
        super().update(row_ids, outputs, params)


class ExpressionParameterError(ExpressionError):
    """The absolute difference of one descriptor component (`analyser.names[component]`) between each
    output and its template: the per-parameter breakdown of `ExpressionError` (whose value is the mean
    of its components'). Lower is better; in that component's units.

    update(row_ids, outputs, templates): images or (B, K) descriptors (`MethodRowMetrics` passes
    descriptors computed once per batch).
    """

    def __init__(self, analyser: ExpressionAnalyser | str | Mapping[str, Any], component: int, **kwargs: Any):
        super().__init__(analyser, **kwargs)
        if not 0 <= component < self.analyser.descriptor_dim:
            raise ValueError(f"component {component} outside the analyser's {self.analyser.descriptor_dim}")
        self.component = int(component)

    def _score(self, out: Tensor, other: Tensor) -> Tensor:
        return (out[:, self.component].float() - other[:, self.component].float()).abs()


class ExpressionParameterErrorGT(ExpressionParameterError):
    """`ExpressionParameterError` against the template's ground-truth parameters (world rows)."""

    other_role = "ground truth"


# --------------------------------------------------------------------------------------------
# detection


class DetectionRate(RowMetric):
    """Fraction of outputs in which the aligner finds a face: value 1 or 0 per row, a 0 row is
    failure NO_FACE_OUTPUT (so the rows appear in `per_row().failed()`). Higher is better.

    aligner: a FaceAligner, a registry name ("dlib-chip", ...) or None, where every row counts as
    found (the world's analysers take whole portraits and need no detection).
    """

    higher_is_better = True

    def __init__(self, aligner: FaceAligner | str | Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.aligner = build_face_aligner(aligner) if isinstance(aligner, (str, Mapping)) else aligner

    def update(self, row_ids: Tensor | Sequence[int], outputs: Tensor) -> None:
        """row_ids (B,) int; outputs (B, 3, H, W) float [0, 1]."""
        _check_images(outputs, "DetectionRate outputs")
        ids = _ids(row_ids, outputs.shape[0], type(self).__name__)
        if self.aligner is None:
            found = torch.ones(ids.shape[0], dtype=torch.bool)
        else:
            found = torch.tensor([bool(self.aligner.detect(im)) for im in tensor_to_images(outputs)])
        values = found.to(torch.float64)
        self._record(ids, values, (~found).long() * int(Failure.NO_FACE_OUTPUT))

    def compute(self) -> Tensor:
        """Detection rate over all rows (each row id once)."""
        rows = self._rows()
        rate = float((rows.failures == 0).mean()) if rows.row_ids.size else float("nan")
        return torch.tensor(rate, dtype=torch.float64)


class MethodRowMetrics(nn.ModuleDict):
    """One method's per-row metrics, sharing the evaluation's encoder and analyser: identity
    similarity and leakage, expression error (and against the ground truth where the rows carry
    template parameters), detection.

    aligner: DetectionRate's aligner (None: every row counts as found).
    ground_truth: include ExpressionErrorGT (world rows carry the template's parameters).
    per_parameter: also each descriptor component's error, "expression_error/<name>" (and
    "expression_error_gt/<name>" with ground truth), `PARAMETER_SEP` joining metric and name.
    """

    def __init__(
        self,
        encoder: IdentityEncoder,
        analyser: ExpressionAnalyser,
        aligner: FaceAligner | str | Mapping[str, Any] | None,
        ground_truth: bool,
        per_parameter: bool = False,
    ):
        metrics: dict[str, RowMetric] = {
            "identity_similarity": IdentitySimilarity(encoder),
            "identity_leakage": IdentityLeakage(encoder),
            "expression_error": ExpressionError(analyser),
            "detected": DetectionRate(aligner),
        }
        if ground_truth:
            metrics["expression_error_gt"] = ExpressionErrorGT(analyser)
        if per_parameter:
            for k, name in enumerate(analyser.names):
                metrics[parameter_metric("expression_error", name)] = ExpressionParameterError(analyser, k)
                if ground_truth:
                    metrics[parameter_metric("expression_error_gt", name)] = ExpressionParameterErrorGT(
                        analyser, k
                    )
        super().__init__(metrics)

    def update_one(
        self,
        name: str,
        row_ids: Tensor,
        outputs: Tensor,
        references: Tensor,
        templates: Tensor,
        template_params: Tensor | None = None,
    ) -> None:
        """Update metric `name` with the row inputs it scores the outputs against (images (B, 3, H, W)
        in [0, 1]; template_params (B, K), needed by expression_error_gt)."""
        metric = self[name]
        if name == "detected":
            metric.update(row_ids, outputs)
        elif name == "identity_similarity":
            metric.update(row_ids, outputs, references)
        elif name == "expression_error_gt":
            metric.update(row_ids, outputs, template_params)
        else:
            metric.update(row_ids, outputs, templates)

    def update_all(
        self,
        row_ids: Tensor,
        outputs: Tensor,
        references: Tensor,
        templates: Tensor,
        template_params: Tensor | None = None,
    ) -> None:
        """Every metric's `update_one` with the same inputs (not `update`: that is ModuleDict's own);
        the per-parameter metrics share one description of the outputs and templates per batch."""
        described: tuple[Tensor, Tensor] | None = None
        for name in self:
            if PARAMETER_SEP not in name:
                self.update_one(name, row_ids, outputs, references, templates, template_params)
                continue
            if described is None:
                ids = _ids(row_ids, outputs.shape[0], type(self).__name__)
                analyser = self["expression_error"].analyser
                described = (
                    expression_descriptors(analyser, outputs, ids, "output"),
                    expression_descriptors(analyser, templates, ids, "template"),
                )
            gt = name.startswith("expression_error_gt" + PARAMETER_SEP)
            self[name].update(row_ids, described[0], template_params if gt else described[1])


PARAMETER_SEP = "/"


def parameter_metric(metric: str, name: str) -> str:
    """The per-parameter metric's name: ("expression_error", "smile") -> "expression_error/smile"."""
    return f"{metric}{PARAMETER_SEP}{name}"


# --------------------------------------------------------------------------------------------
# set distances


WORLD_FEATURES = ("world-id", "world-expr")


class WorldFeatures(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] -> (B, D) features of a world analyser, for torchmetrics' FID.

    feature: "world-id" (the 128-d identity embedding) or "world-expr" (the 10 expression
    parameters); spec: the analyser's registry spec (default: that name, i.e. the packaged
    weights), e.g. {"name": "world-expr", "init_args": {"weights": "other.safetensors"}}.
    """

    def __init__(self, feature: str, spec: str | Mapping[str, Any] | None = None):
        super().__init__()
        if feature not in WORLD_FEATURES:
            raise ValueError(f"unknown world feature {feature!r}; one of {', '.join(WORLD_FEATURES)}")
        if feature == "world-id":
            self.model: nn.Module = build_identity_encoder(spec or feature)
            self.num_features = int(self.model.embedding_dim)
        else:
            self.model = build_expression_analyser(spec or feature)
            self.num_features = int(self.model.descriptor_dim)
        self.model.eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float [0, 1] -> (B, num_features) float32."""
        return self.model(images.float())


class WorldFD(MetricCollection):
    """Frechet distance between two image sets in each world analyser's feature space.

    analyser_specs: feature names (see WORLD_FEATURES) or {feature: registry spec or None}.
    update(images float (B, 3, H, W) in [0, 1], real=bool); compute() -> {feature: FD tensor}.
    One torchmetrics FrechetInceptionDistance per feature, so it syncs across ranks like FID.
    """

    def __init__(
        self,
        analyser_specs: Sequence[str] | Mapping[str, Any] = WORLD_FEATURES,
        reset_real_features: bool = True,
    ):
        specs = dict(analyser_specs) if isinstance(analyser_specs, Mapping) else dict.fromkeys(analyser_specs)
        metrics = {
            f: FrechetDistance(
                feature=WorldFeatures(f, s), normalize=True, reset_real_features=reset_real_features
            )
            for f, s in specs.items()
        }
        super().__init__(metrics, compute_groups=False)


# --------------------------------------------------------------------------------------------
# confidence intervals


class CI(NamedTuple):
    """A bootstrap estimate: the sample mean and the (low, high) percentile interval."""

    mean: float
    low: float
    high: float


def bootstrap_ci(
    values: np.ndarray | Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> CI:
    """Percentile bootstrap CI of the mean over the finite entries of `values` (NaN rows, i.e.
    failures, are left out), by `scipy.stats.bootstrap`. Returns CI(mean, low, high); all NaN when
    no value is finite; a single value is its own interval."""
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return CI(float("nan"), float("nan"), float("nan"))
    if v.size == 1 or np.ptp(v) == 0:
        return CI(float(v[0]), float(v[0]), float(v[0]))
    res = stats.bootstrap(
        (v,),
        np.mean,
        n_resamples=n_boot,
        confidence_level=1 - alpha,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return CI(float(v.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high))


def paired_bootstrap_diff(
    a: np.ndarray | Sequence[float],
    b: np.ndarray | Sequence[float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> CI:
    """Bootstrap CI of mean(a - b) for two methods scored on the same rows (a[i], b[i] one row;
    rows where either is NaN are left out). A CI that excludes 0 is a difference at level alpha.
    Use `common_rows` to pair two RowScores."""
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_diff needs the same rows: {a.shape[0]} vs {b.shape[0]} values")
    return bootstrap_ci(a - b, n_boot, alpha, seed)
