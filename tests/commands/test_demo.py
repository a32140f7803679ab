"""`emojidiff demo` (`make demo`): the grid of held-out people wearing other people's expressions."""

import json

import numpy as np
from PIL import Image

from emojidiff.cli import main
from emojidiff.commands.demo import demo_inputs
from emojidiff.splits import TEST_IDENTITIES, get_split


def test_demo_uses_the_packaged_model_and_writes_a_scored_grid(tmp_path, capsys):
    out = tmp_path / "demo.png"
    argv = [
        "demo",
        "--identities",
        "2",
        "--templates",
        "3",
        "--styles",
        "[cel, brush]",
        "--steps",
        "3",
        "--cell",
        "64",
        "--out",
        str(out),
        "--quiet=true",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "identity similarity" in printed
    grid = Image.open(out)
    assert grid.size[0] > 2 * 4 * 64 and grid.size[1] > 3 * 64  # two panels of (1 + 3) columns, (1 + 2) rows
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["command"] == "demo" and record["model"]["source"] == "emojidiff:emojidiff-world"
    assert record["model"]["untrained"] is False and record["analysers"]["identity"] == "world-id-eval"
    for style in ("cel", "brush"):
        r = record["styles"][style]
        assert np.asarray(r["identity_similarity"]).shape == (2, 3) == np.asarray(r["expression_error"]).shape
        assert np.isfinite(r["mean_identity_similarity"]) and np.isfinite(r["mean_expression_error"])


def test_demo_people_are_held_out_and_templates_are_other_people():
    inputs = demo_inputs(3, 4, "shaded", 64, seed=0)
    meta = inputs["meta"]
    test = get_split("test")
    assert all(test.has_identity(i) for i in meta["reference_ids"] + meta["template_ids"])
    assert all(test.has_seed(s) for s in meta["reference_seeds"] + meta["template_seeds"])
    assert not set(meta["reference_ids"]) & set(meta["template_ids"])
    assert meta["template_names"][:4] == ["happy", "surprised", "angry", "sad"]
    assert inputs["refs"].shape == (3, 64, 64, 3) and inputs["templates"].shape == (4, 64, 64, 3)
    assert inputs["masks"].shape == (4, 64, 64) and inputs["masks"].any(axis=(1, 2)).all()
    assert min(meta["reference_ids"]) >= TEST_IDENTITIES[0]
