"""The evaluation metrics: per-row scores with their row ids and failures, DDP sync, bootstrap CIs."""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.evaluation.compare import paired_difference
from benchmarks.evaluation.metrics import (
    ExpressionError,
    ExpressionErrorGT,
    Failure,
    IdentityLeakage,
    IdentitySimilarity,
    bootstrap_ci,
    common_rows,
    paired_bootstrap_diff,
)
from emojidiff.world import Expression

HERE = Path(__file__).parent


@functools.cache
def _child():
    import sys

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("metrics_ddp_child")


@functools.cache
def _world(n: int, identity_offset: int = 0) -> torch.Tensor:
    return _child().world_batch(n, identity_offset)


def test_identical_images_score_perfectly_and_other_identities_lower():
    x, other = _world(8), _world(8, identity_offset=100)  # same expressions, other people
    same, diff = IdentitySimilarity("world-id"), IdentitySimilarity("world-id")
    same.update(range(8), x, x)
    diff.update(range(8), x, other)
    expr = ExpressionError("world-expr")
    expr.update(range(8), x, x)
    assert float(same.compute()) == pytest.approx(1.0, abs=1e-5)
    assert float(expr.compute()) == pytest.approx(0.0, abs=1e-7)
    threshold = same.encoder.same_person_threshold
    assert (diff.per_row().values < threshold).all() and float(diff.compute()) < float(same.compute()) - 0.5


def test_leakage_is_similarity_to_the_template_and_accepts_embeddings():
    x, template = _world(6), _world(6, identity_offset=100)
    leak = IdentityLeakage("world-id")
    leak.update(torch.arange(6), x, leak.encoder(template))  # precomputed (B, D) template embeddings
    sim = IdentitySimilarity("world-id")
    sim.update(torch.arange(6), x, template)
    np.testing.assert_allclose(leak.per_row().values, sim.per_row().values, atol=1e-6)
    assert leak.higher_is_better is False and sim.higher_is_better is True


def test_ground_truth_expression_error_is_lowest_for_the_true_parameters():
    x = _world(8)
    truth = torch.from_numpy(np.stack([Expression.sample(i).to_vector() for i in range(8)]))
    right, wrong = ExpressionErrorGT("world-expr"), ExpressionErrorGT("world-expr")
    right.update(range(8), x, truth)
    wrong.update(range(8), x, truth.roll(1, dims=0))
    assert float(right.compute()) < 0.5 * float(wrong.compute())


def test_one_process_and_two_gloo_processes_agree(tmp_path):
    n = 9
    child = _child()
    single = child.score(list(range(n)), list(range(n)), n)
    mp.spawn(child.run_rank, args=(2, str(tmp_path / "pg"), n, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("id_sim", "expr_err", "detection"):
        for result in ranks:
            assert result[name]["rows"]["row_ids"] == list(range(n))  # both halves, row 0 once
            # float32 convolutions differ in the last bits with the batch's size: same rows, not same bits
            np.testing.assert_allclose(
                result[name]["rows"]["values"], single[name]["rows"]["values"], atol=1e-6
            )
            assert result[name]["value"] == pytest.approx(single[name]["value"], abs=1e-6)
    for feature, value in single["world_fd"].items():
        assert ranks[0]["world_fd"][feature] == pytest.approx(value, rel=1e-4)
        assert ranks[1]["world_fd"][feature] == pytest.approx(value, rel=1e-4)


def _photo_rows() -> tuple[torch.Tensor, torch.Tensor]:
    from skimage.data import astronaut

    face = torch.from_numpy(astronaut()).permute(2, 0, 1).float() / 255.0
    blank = torch.full_like(face, 0.5)
    return face, blank


def test_a_row_without_a_face_is_a_recorded_failure_not_dropped():
    face, blank = _photo_rows()
    metric = IdentitySimilarity("dlib")
    metric.update([10, 11, 12], torch.stack([face, blank, face]), torch.stack([face, face, blank]))
    rows = metric.per_row()
    assert rows.row_ids.tolist() == [10, 11, 12]
    assert rows.failures.tolist() == [Failure.OK, Failure.NO_FACE_OUTPUT, Failure.NO_FACE_REFERENCE]
    assert rows.failed() == [(11, "no_face_output"), (12, "no_face_reference")]
    assert np.isnan(rows.values[1:]).all()
    assert float(metric.compute()) == pytest.approx(1.0, abs=1e-5)  # the mean of the one scored row


def test_an_analyser_that_raises_on_a_faceless_row_gives_a_failure():
    face, blank = _photo_rows()
    metric = ExpressionError("dlib-lms")  # raises FaceNotFoundError on the blank image
    metric.update([0, 1], torch.stack([face, blank]), torch.stack([face, face]))
    rows = metric.per_row()
    assert rows.failures.tolist() == [Failure.OK, Failure.NO_FACE_OUTPUT]
    assert float(metric.compute()) == pytest.approx(0.0, abs=1e-7)


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_rows():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, 2000)
    small, large = bootstrap_ci(values[:40]), bootstrap_ci(np.append(values, np.nan))  # NaN rows left out
    for ci in (small, large):
        assert ci.low < ci.mean < ci.high
    assert large.mean == pytest.approx(values.mean())
    assert (large.high - large.low) < 0.3 * (small.high - small.low)


def test_bootstrap_intervals_are_95_percent_wide_on_data_with_a_known_spread():
    """The normal approximation of the mean's 95% interval, mean +- 1.96 sd / sqrt(n), is
    independent of resampling: both bootstraps (row CIs; the results page's paired verdicts) match
    its width within 7% (a 90% interval is 16% narrower, a 99% one 31% wider)."""
    rng = np.random.default_rng(3)
    diff = rng.normal(0.1, 1.0, 400)
    expected = 2 * 1.959964 * diff.std(ddof=1) / np.sqrt(diff.size)
    row = bootstrap_ci(diff)
    assert row.high - row.low == pytest.approx(expected, rel=0.07)
    paired = paired_difference(
        {str(i): float(v) for i, v in enumerate(diff)}, {str(i): 0.0 for i in range(diff.size)}
    )
    assert paired["high"] - paired["low"] == pytest.approx(expected, rel=0.07)
    assert paired["low"] < diff.mean() < paired["high"] and paired["rows"] == diff.size


def test_paired_diff_excludes_zero_for_a_clear_difference_only():
    rng = np.random.default_rng(1)
    base = rng.normal(0.5, 0.2, 200)  # per-row difficulty shared by both methods
    better = base + 0.05 + rng.normal(0, 0.02, 200)
    same = base + rng.normal(0, 0.02, 200)
    clear, null = paired_bootstrap_diff(better, base), paired_bootstrap_diff(same, base)
    assert clear.low > 0 and clear.mean == pytest.approx(0.05, abs=0.01)
    assert null.low < 0 < null.high


def test_common_rows_pairs_two_methods_by_row_id():
    a, b = IdentitySimilarity("world-id"), IdentitySimilarity("world-id")
    x = _world(4)
    a.update([3, 1, 2], x[:3], x[:3])
    b.update([0, 2, 3], x[:3], x[:3])
    ids, va, vb = common_rows(a.per_row(), b.per_row())
    assert ids.tolist() == [2, 3] and va.shape == vb.shape == (2,)


def test_per_parameter_errors_are_each_parameters_absolute_error_and_average_to_the_row_error():
    from benchmarks.evaluation.metrics import MethodRowMetrics, parameter_metric
    from emojidiff.face import build_expression_analyser, build_identity_encoder

    x, template = _world(6), _world(6, identity_offset=100).flip(0)  # other expressions
    truth = torch.from_numpy(np.stack([Expression.sample(i).to_vector() for i in range(6)])).flip(0)
    analyser = build_expression_analyser("world-expr")
    metrics = MethodRowMetrics(build_identity_encoder("world-id"), analyser, None, True, per_parameter=True)
    metrics.update_all(torch.arange(6), x, template, template, truth)
    with torch.no_grad():  # the expected values, from the analyser's readings directly
        out, tmpl = analyser.describe(x).numpy(), analyser.describe(template).numpy()
    names = Expression.names()
    for metric, other in (("expression_error", tmpl), ("expression_error_gt", truth.numpy())):
        per = np.stack([metrics[parameter_metric(metric, n)].per_row().values for n in names], 1)
        np.testing.assert_allclose(per, np.abs(out - other), atol=1e-5)
        np.testing.assert_allclose(per.mean(1), metrics[metric].per_row().values, atol=1e-5)
    assert per[:, names.index("smile")].max() > 0.05  # the rows do differ
