"""`emojidiff probe-layers` on a random tiny model: outputs, rows, grouping, switching restored."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emojidiff.cli import main
from emojidiff.commands.probe_layers import (
    block_of,
    expression_off,
    expression_units,
    short_label,
    world_pairs,
)
from emojidiff.models.bundle import fresh_model
from emojidiff.models.tiny import build_tiny_backbone, save_backbone
from emojidiff.splits import TEST_IDENTITIES

RANDOM_ID = {"name": "world-id", "init_args": {"weights": None}}
EXPR_ENCODER = {"name": "tiny_conv", "init_args": {"feature_dim": 32, "width": 16}}
FAST = ["--pairs", "2", "--steps", "2", "--size", "32", "--quiet=true"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved (random) model whose expression branch sits in the up blocks only."""
    root = tmp_path_factory.mktemp("probe")
    backbone = save_backbone(build_tiny_backbone("sd15", seed=0), root / "tiny")
    adapter = {"num_id_tokens": 2, "num_expr_tokens": 4, "expr_layers": ["up_blocks.*"], "expr_scale": 3.0}
    model = fresh_model(backbone, "world-id", EXPR_ENCODER, adapter, seed=1)
    return model.save(root / "model")


def _rows(out: Path) -> list[dict]:
    with (out / "probe.csv").open() as f:
        return list(csv.DictReader(f))


def test_probe_per_layer_writes_csv_md_png_config(model_dir, tmp_path):
    out = tmp_path / "probe"
    assert main(["probe-layers", "--model", str(model_dir), "--out_dir", str(out), *FAST]) == 0
    rows = _rows(out)
    expected = [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
    ]
    assert [r["condition"] for r in rows] == ["baseline", "all-off", *expected]
    assert [r["pattern"] for r in rows[2:]] == expected
    base = rows[0]
    assert float(base["d_expr_error"]) == 0 and float(base["d_id_similarity"]) == 0 and base["n_valid"] == "2"
    assert all(np.isfinite(float(r["expr_error"])) and np.isfinite(float(r["id_similarity"])) for r in rows)
    # switching the whole branch off changes the outputs, so at least one metric moves
    off = rows[1]
    assert abs(float(off["d_expr_error"])) + abs(float(off["d_id_similarity"])) > 0
    md = (out / "probe.md").read_text()
    assert "| baseline |" in md and all(f"`{name}`" in md for name in expected)
    assert Image.open(out / "probe.png").size[0] > 100
    cfg = json.loads((out / "probe_config.json").read_text())
    assert cfg["command"] == "probe-layers" and len(cfg["pairs"]) == 2 and cfg["model"]["untrained"] is False


def test_probe_per_block_with_fresh_backbone(model_dir, tmp_path):
    out = tmp_path / "blocks"
    spec = json.dumps(RANDOM_ID)
    argv = [
        "probe-layers",
        "--backbone",
        str(model_dir.parent / "tiny"),
        "--identity_encoder",
        spec,
        "--group",
        "block",
        "--out_dir",
        str(out),
        *FAST,
    ]
    assert main(argv) == 0
    rows = _rows(out)
    assert [r["condition"] for r in rows] == [
        "baseline",
        "all-off",
        "down_blocks.0",
        "down_blocks.1",
        "mid_block",
        "up_blocks.1",
        "up_blocks.2",
    ]
    assert rows[4]["pattern"] == "mid_block.*" and rows[5]["n_layers"] == "2"
    assert "UNTRAINED" in (out / "probe.md").read_text()


def test_units_grouping_and_switch_restores(model_dir):
    from emojidiff.models.bundle import load_model

    model = load_model(model_dir, load_identity_encoder=False)
    adapter = model.pipeline.adapter
    assert list(expression_units(adapter, "block")) == ["up_blocks.1", "up_blocks.2"]
    assert block_of("mid_block.attentions.0.transformer_blocks.0.attn2.processor") == "mid_block"
    assert short_label("up_blocks.1.attentions.0.transformer_blocks.0.attn2") == "up_blocks.1/att0/tb0"
    pairs = world_pairs(2, "shaded", 32, seed=0, identity_offset=TEST_IDENTITIES[0])
    assert pairs["templates"].shape == (2, 32, 32, 3) and pairs["masks"].shape == (2, 32, 32)
    assert pairs["meta"][0]["template_identity"] != pairs["meta"][0]["reference_identity"]
    x = torch.from_numpy(pairs["templates"]).permute(0, 3, 1, 2).float() / 255
    ids = torch.randn(2, adapter.config.id_embed_dim, generator=torch.Generator().manual_seed(0))
    call = dict(id_embeds=ids, num_inference_steps=2, height=32, width=32, seed=0)
    on = model.pipeline(x, **call).latents
    layers = adapter.expression_layers()
    with expression_off(adapter, layers):
        off = model.pipeline(x, **call).latents
        off_other = model.pipeline(
            x.flip(0), id_embeds=ids, num_inference_steps=2, height=32, width=32, seed=0
        ).latents
    assert not torch.equal(on, off)
    assert torch.equal(off, off_other)  # with the branch off everywhere the template no longer matters
    assert all(adapter.processors()[n].has_expr for n in layers)
    assert torch.equal(model.pipeline(x, **call).latents, on)


def test_paired_delta_removes_pair_spread_and_skips_nan():
    from emojidiff.commands.probe_layers import paired_delta

    base = np.array([0.1, 0.5, 0.9, np.nan])
    mean, low, high = paired_delta(base + 0.02 + np.array([0.001, -0.001, 0.0, 0.0]), base)
    # a constant shift with tiny noise: pair-to-pair spread (0.4) must not widen the interval
    assert abs(mean - 0.02) < 1e-9 and low < 0.02 < high and high - low < 0.01
    mean, low, high = paired_delta(base, base)
    assert mean == 0 and low == 0 and high == 0
    assert all(np.isnan(v) for v in paired_delta([np.nan], [0.0]))
