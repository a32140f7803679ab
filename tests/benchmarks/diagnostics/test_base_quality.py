"""The world-FD of a backbone: samples of an untrained backbone are far from the world, real
portraits are close to other real portraits."""

import json

import pytest

from emojidiff.models.tiny import build_tiny_backbone, save_backbone


def test_untrained_backbone_scores_far_above_the_floor(tmp_path):
    from benchmarks.diagnostics.base_quality import main

    folder = save_backbone(build_tiny_backbone("sd15", seed=0), tmp_path / "random")
    record = main(
        [
            "--backbone",
            str(folder),
            "--n",
            "48",
            "--batch",
            "24",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "q.json"),
        ]
    )
    assert record["n"] == 48
    for feature in ("world-id", "world-expr"):
        assert record["floor"][feature] >= 0
        assert record["fd"][feature] > 3 * record["floor"][feature]  # noise images vs the world
        assert record["vae_recon"][feature] > 3 * record["floor"][feature]  # an untrained decoder
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["fd"] == record["fd"] and saved["args"]["steps"] == 2


def test_missing_backbone_is_named(tmp_path):
    from benchmarks.diagnostics.base_quality import main

    with pytest.raises(SystemExit, match="no model_index.json"):
        main(["--backbone", str(tmp_path / "none")])
