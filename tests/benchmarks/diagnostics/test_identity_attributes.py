"""The identity-attribute benchmark: its probe reads what the world renders hold, and its output
scoring tells an image of the reference person from an image of the template person."""

import json

import numpy as np
import pytest

from benchmarks.diagnostics.identity_attributes import (
    AttributeProbe,
    fit_probe,
    main,
    protocol_rows,
    r2,
    score_outputs,
)
from benchmarks.evaluation.methods import world_inputs
from emojidiff.face import build_identity_encoder


@pytest.fixture(scope="module")
def probe():
    encoder = build_identity_encoder("world-id-eval")
    return encoder, *fit_probe(encoder, 400)


def test_r2_is_one_minus_mse_over_variance():
    truth = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 4.0]])
    pred = np.array([[0.0, 2.0], [1.0, 1.0], [1.0, 4.0]])
    # column 0: MSE 1/3, Var 2/3; column 1: MSE 1/3, Var 2
    assert np.allclose(r2(pred, truth), [1 - (1 / 3) / (2 / 3), 1 - (1 / 3) / 2])


def test_the_ridge_probe_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(500, 16))
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = rng.normal(size=(16, 3))
    styles = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0).astype(int)
    fitted = AttributeProbe.fit(emb, x @ w + 0.5, styles, ridge=1e-6)
    values, predicted_styles = fitted.predict(emb)
    assert np.allclose(values, x @ w + 0.5, atol=1e-4)
    assert (predicted_styles == styles).mean() > 0.8


def test_the_probe_reads_skin_and_hair_from_held_out_renders(probe):
    _, _, ceiling = probe
    assert ceiling["skin_tone"] > 0.8 and ceiling["hair_colour"] > 0.7, ceiling
    assert ceiling["hair_style"] > 0.5, ceiling


def test_ground_truth_scores_as_the_reference_and_templates_as_the_template(probe):
    encoder, fitted, ceiling = probe
    rows = protocol_rows(24, 4)
    inputs = world_inputs(rows, 64)
    gt = score_outputs(fitted, encoder, inputs.ground_truth, rows, ceiling)
    tmpl = score_outputs(fitted, encoder, inputs.templates, rows, ceiling)
    for name in ("skin_tone", "hair_colour"):
        assert gt[name]["output_vs_reference"] > 0.6 > gt[name]["output_vs_template"], (name, gt[name])
        assert tmpl[name]["output_vs_template"] > 0.6 > tmpl[name]["output_vs_reference"], (name, tmpl[name])
    assert gt["hair_style"]["output_vs_reference"] > gt["hair_style"]["output_vs_template"]


def test_main_writes_its_record_and_table(tmp_path):
    record = main(
        [
            "--people",
            "3",
            "--templates",
            "3",
            "--probe_people",
            "200",
            "--steps",
            "4",
            "--out_dir",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "identity_attributes.json").read_text())
    assert saved["rows"] == 9 and saved["attributes"] == record["attributes"]
    assert "| skin_tone |" in (tmp_path / "identity_attributes.md").read_text()
    assert (tmp_path / "identity_attributes.png").stat().st_size > 0
