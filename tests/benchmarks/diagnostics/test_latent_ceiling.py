"""The latent-ceiling benchmark on the packaged base: its figures keep the sanity order (clean
renders read better than their reconstructions, which read better than a wrong expression)."""

import json

import numpy as np
import pytest

from benchmarks.diagnostics.latent_ceiling import held_out_design, main
from emojidiff.splits import HELD_OUT_SEED_OFFSET, TEST_IDENTITIES
from emojidiff.world import STYLES


def test_design_is_held_out_and_balanced_over_styles():
    design = held_out_design(5)
    ids = design["ids"]
    assert ((ids >= TEST_IDENTITIES[0]) & (ids < TEST_IDENTITIES[1])).all() and len(set(ids)) == 15
    assert (design["expr_seeds"] >= HELD_OUT_SEED_OFFSET).all() and (
        design["scene_seeds"] >= HELD_OUT_SEED_OFFSET
    ).all()
    assert [design["styles"].count(s) for s in STYLES] == [5, 5, 5]
    assert not set(held_out_design(5, seed=1)["expr_seeds"]) & set(design["expr_seeds"])


def test_ceiling_orders_clean_below_reconstructions_below_a_random_expression(tmp_path):
    record = main(
        [
            "--n_per_style",
            "12",
            "--batch",
            "36",
            "--fd_n",
            "0",
            "--onestep_t",
            "[250]",
            "--out_dir",
            str(tmp_path),
        ]
    )
    c = record["conditions"]
    assert set(c) == {"clean", "blur", "down2", "vae", "onestep@250", "random_expression"}
    for style in STYLES:
        assert c["clean"]["per_style"][style]["expr_error"] < c["vae"]["per_style"][style]["expr_error"], (
            style
        )
    assert c["vae"]["expr_error"] < c["onestep@250"]["expr_error"] < c["random_expression"]["expr_error"]
    assert c["clean"]["id_sim"] == pytest.approx(1.0, abs=1e-5)
    assert c["vae"]["id_sim"] > 0.9 and c["vae"]["feature_psnr"] > c["down2"]["feature_psnr"] - 10
    assert np.isclose(np.mean(list(c["vae"]["per_param"].values())), c["vae"]["expr_error"], atol=1e-6)
    saved = json.loads((tmp_path / "latent_ceiling.json").read_text())
    assert saved["conditions"]["vae"]["expr_error"] == c["vae"]["expr_error"]
    assert saved["args"]["backbone"] == "emojidiff:tiny-sd15"
    assert (tmp_path / "latent_ceiling.png").stat().st_size > 0 and "| vae |" in (
        tmp_path / "latent_ceiling.md"
    ).read_text()
