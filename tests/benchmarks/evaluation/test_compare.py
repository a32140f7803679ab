"""Paired method comparisons (benchmarks/evaluation/compare.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.evaluation.compare import main, paired_difference


def test_a_constant_shift_is_recovered_exactly_and_identical_methods_differ_by_zero():
    rng = np.random.default_rng(0)
    a = {str(i): float(v) for i, v in enumerate(rng.normal(0.3, 0.2, 100))}
    shifted = {k: v - 0.05 for k, v in a.items()}
    d = paired_difference(a, shifted)
    assert (
        d["mean"] == pytest.approx(0.05)
        and d["low"] == pytest.approx(0.05)
        and d["high"] == pytest.approx(0.05)
    )
    same = paired_difference(a, a)
    assert same["mean"] == same["low"] == same["high"] == 0.0


def test_noise_gives_an_interval_around_the_mean_over_shared_finite_rows_only():
    rng = np.random.default_rng(1)
    a = {str(i): float(v) for i, v in enumerate(rng.normal(0.0, 1.0, 200))}
    b = {str(i): float(v) for i, v in enumerate(rng.normal(0.0, 1.0, 190))}
    b["3"] = float("nan")
    d = paired_difference(a, b)
    assert d["rows"] == 189 and d["low"] < d["mean"] < d["high"] and d["low"] < 0 < d["high"]


def test_cli_writes_markdown_and_json_and_names_an_unknown_method(tmp_path):
    scores = {"scores": {"x": {"err": {"0": 0.5, "1": 0.4}}, "y": {"err": {"0": 0.3, "1": 0.2}}}}
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(scores))
    result = main([str(path), "--pairs", "[x:y]"])
    assert result["x - y"]["err"]["mean"] == pytest.approx(0.2)
    assert "| x - y | +0.200" in (tmp_path / "comparisons.md").read_text()
    assert json.loads((tmp_path / "comparisons.json").read_text())["differences"]["x - y"]["err"]["rows"] == 2
    with pytest.raises(KeyError, match="'z'"):
        main([str(path), "--pairs", "[x:z]"])
