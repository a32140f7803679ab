"""The conditioning-gain diagnostic: zero for a branch that is off, and the script's report."""

from __future__ import annotations

import json

from benchmarks.diagnostics.conditioning_gain import batches, gains, main
from data_gen.world_triplets import write_world_triplets
from emojidiff.models.bundle import FreshModel
from lightning_modules.decoupled import DecoupledModule


def test_a_branch_that_is_off_has_no_gain_and_one_that_is_on_has_some(tmp_path):
    shards = write_world_triplets(tmp_path / "d", n=8, shards=1)
    batch = batches(shards[0], 8, 1)[0]
    module = DecoupledModule(FreshModel(adapter={"num_id_tokens": 2, "num_expr_tokens": 4}), ema_decay=None)
    module.adapter.set_scales(expr_scale=0.0)
    off = gains(module, batch)
    assert off["template_gain"] == 0.0 and off["identity_gain"] != 0.0
    module.adapter.set_scales(expr_scale=1.0)
    assert gains(module, batch)["template_gain"] != 0.0


def test_the_overfit_report_has_a_curve(tmp_path):
    shards = write_world_triplets(tmp_path / "d", n=8, shards=1)
    out = tmp_path / "gain.json"
    main(
        [
            "--overfit",
            "true",
            "--shards",
            shards[0],
            "--batch",
            "8",
            "--steps",
            "2",
            "--every",
            "1",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert [row["step"] for row in report["curve"]] == [0, 1, 2]
    assert all(set(row) >= {"template_gain", "identity_gain", "text_gain", "loss"} for row in report["curve"])
