"""Filters decide with their thresholds and keep every score; the report's precision/recall arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from data_gen.filters import REASONS, FilterConfig, TripletFilter
from data_gen.idi import config_from_namespace, make_parser
from data_gen.report import filter_quality, precision_recall
from emojidiff.face import build_expression_analyser, build_identity_encoder


@pytest.fixture(scope="module")
def filt() -> TripletFilter:
    return TripletFilter(
        build_identity_encoder("world-id"),
        build_expression_analyser("world-expr"),
        FilterConfig(max_expression_distance=0.1, max_identity_similarity=0.5),
    )


def _scores(**over):
    base = {
        "alter_ok": np.array([True] * 5),
        "face_found": np.array([True] * 5),
        "identity_similarity": np.array([0.1, 0.9, 0.2, 0.3, np.nan], np.float32),
        "expression_distance": np.array([0.05, 0.05, 0.3, 0.05, 0.05], np.float32),
        "pixel_std": np.array([50, 50, 50, 2, 50], np.float32),
        "saturated_fraction": np.zeros(5, np.float32),
    }
    base.update(over)
    return base


def test_decide_reports_the_first_failed_filter(filt):
    assert filt.decide(_scores()) == [None, "identity", "expression", "sanity", "no_face"]
    failed = _scores(alter_ok=np.array([False, True, True, True, True]))
    assert filt.decide(failed)[0] == "alter_error"
    assert REASONS[0] == "alter_error"


def test_identity_threshold_defaults_to_the_encoders_same_person_threshold():
    enc = build_identity_encoder("world-id")
    f = TripletFilter(enc, build_expression_analyser("world-expr"), FilterConfig())
    assert f.identity_threshold == pytest.approx(enc.same_person_threshold)


def test_precision_recall_arithmetic():
    passed = np.array([True, True, True, False, False, False])
    good = np.array([True, False, True, True, False, False])
    q = precision_recall(passed, good)
    assert (
        q["precision"] == pytest.approx(2 / 3)
        and q["recall"] == pytest.approx(2 / 3)
        and q["base_rate"] == 0.5
    )
    assert precision_recall(np.zeros(3, bool), np.ones(3, bool))["precision"] is None


def test_filter_quality_ignores_candidates_without_ground_truth():
    scores = {
        "score_gt_expression_error": np.array([0.0, 0.5, np.nan]),
        "pass_expression": np.array([True, True, False]),
        "score_gt_identity_distance": np.array([0.9, 0.9, 0.1]),
        "pass_identity": np.array([True, True, True]),
        "reason": np.array([-1, -1, 4]),
    }
    q = filter_quality(scores, {"gt_expression_tolerance": 0.1, "gt_min_identity_distance": 0.4})
    assert q["expression"]["n"] == 2 and q["expression"]["precision"] == 0.5
    assert q["identity"]["recall"] == 1.0 and q["identity"]["precision"] == pytest.approx(2 / 3)
    assert q["accept"]["n"] == 2 and q["accept"]["precision"] == 0.5


def test_threshold_sweep_includes_the_used_threshold_and_is_monotone_in_recall():
    from data_gen.report import threshold_sweep

    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 0.3, 500)
    scores = {"score_expression_distance": gt + rng.normal(0, 0.02, 500), "score_gt_expression_error": gt}
    rows = threshold_sweep(scores, {"gt_expression_tolerance": 0.1, "max_expression_distance": 0.1})[
        "expression"
    ]
    assert [r["threshold"] for r in rows if r["used"]] == [0.1]
    recalls = [r["recall"] for r in rows]
    assert recalls == sorted(recalls) and rows[0]["precision"] > rows[-1]["precision"]


def _study_filter() -> TripletFilter:
    """The filter `make data` builds from configs/data/world.yaml (the study's training data)."""
    parser = make_parser()
    config = config_from_namespace(parser, parser.parse_args(["-c", "configs/data/world.yaml"]))
    return TripletFilter(
        build_identity_encoder(config.identity_encoder),
        build_expression_analyser(config.expression_analyser),
        config.filters,
    )


def test_the_study_filters_accept_just_inside_and_reject_just_outside_each_threshold():
    """The thresholds the study's data stands on: expression distance 0.10 (world-expr parameter
    units, the config's documented cut) and the identity encoder's own same-person (EER) similarity,
    read from the encoder's record rather than the filter. Candidates 0.005 either side of each."""
    filt = _study_filter()
    eer = build_identity_encoder("world-id").same_person_threshold
    ok = np.array([True] * 4)
    scores = {
        "alter_ok": ok,
        "face_found": ok,
        "pixel_std": np.full(4, 50, np.float32),
        "saturated_fraction": np.zeros(4, np.float32),
        "expression_distance": np.array([0.095, 0.105, 0.05, 0.05], np.float32),
        "identity_similarity": np.array([0.0, 0.0, eer - 0.005, eer + 0.005], np.float32),
    }
    assert filt.decide(scores) == [None, "expression", None, "identity"]
