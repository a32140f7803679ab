"""The UNet LoRA: saved in diffusers' layout inside the model folder, loaded with no extra flag, and
acting as W x + (alpha / r) B A x on the attention projections (checked by hand against the file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emojidiff.errors import MissingWeightsError
from emojidiff.models.bundle import MODEL_FILE, fresh_model, load_model
from emojidiff.models.lora import LORA_DIR, LORA_WEIGHTS, add_unet_lora, has_lora, lora_modules
from emojidiff.models.tiny import build_tiny_backbone, save_backbone

RANDOM_ID = {"name": "world-id", "init_args": {"weights": None}}
ADAPTER = {"num_id_tokens": 2, "num_expr_tokens": 4}
EXPR = {"name": "tiny-conv", "init_args": {"feature_dim": 32, "width": 16}}
CALL = dict(prompt="a portrait", num_inference_steps=2, height=32, width=32, seed=5)
RANK, ALPHA = 2, 4.0
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    return save_backbone(build_tiny_backbone("sd15", seed=0), tmp_path_factory.mktemp("bb") / "tiny")


@pytest.fixture(scope="module")
def lora_folder(backbone_dir, tmp_path_factory) -> Path:
    """A fresh model whose UNet carries a rank-2 LoRA with random (non-zero) A and B, saved."""
    model = fresh_model(backbone_dir, RANDOM_ID, EXPR, ADAPTER, seed=0)
    unet = model.pipeline.backbone.unet
    add_unet_lora(unet, {"rank": RANK, "alpha": ALPHA})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_modules(unet).parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.save(tmp_path_factory.mktemp("lora") / "model")


def _inputs():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.randn(1, 128)


def test_the_folder_holds_the_lora_in_diffusers_layout_and_load_model_applies_it(lora_folder, backbone_dir):
    assert json.loads((lora_folder / MODEL_FILE).read_text())["unet_lora"] == LORA_DIR
    state = load_file(str(lora_folder / LORA_DIR / LORA_WEIGHTS))
    down, up = state[f"unet.{LAYER}.lora.down.weight"], state[f"unet.{LAYER}.lora.up.weight"]
    assert down.shape[0] == RANK and up.shape[1] == RANK

    loaded = load_model(lora_folder)
    unet = loaded.pipeline.backbone.unet
    assert has_lora(unet)
    assert not any(p.requires_grad for p in lora_modules(unet).parameters()), "a loaded LoRA is frozen"
    # by hand: the base layer's weight (from the untouched backbone) plus (alpha / r) up @ down
    base = load_model(lora_folder).pipeline.backbone.unet  # a second copy, for the frozen base weight
    weight = base.get_submodule(LAYER).base_layer.weight.detach()
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(2))
    expected = x @ weight.T + (ALPHA / RANK) * (x @ down.T @ up.T)
    torch.testing.assert_close(unet.get_submodule(LAYER)(x), expected, rtol=1e-5, atol=1e-5)


def test_the_lora_changes_the_output_and_the_round_trip_keeps_it(lora_folder, tmp_path):
    tmpl, emb = _inputs()
    with_lora = load_model(lora_folder).pipeline(tmpl, id_embeds=emb, **CALL).images
    again = load_model(lora_folder).pipeline(tmpl, id_embeds=emb, **CALL).images
    np.testing.assert_array_equal(with_lora, again)
    plain = tmp_path / "no_lora"  # the same folder with the LoRA switched off in its json
    shutil.copytree(lora_folder, plain)
    spec = json.loads((plain / MODEL_FILE).read_text())
    (plain / MODEL_FILE).write_text(json.dumps({**spec, "unet_lora": None}))
    without = load_model(plain).pipeline(tmpl, id_embeds=emb, **CALL).images
    assert np.abs(with_lora.astype(int) - without.astype(int)).mean() > 1.0


def test_a_missing_lora_file_names_the_key_and_the_file(lora_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(lora_folder, broken)
    (broken / LORA_DIR / LORA_WEIGHTS).unlink()
    with pytest.raises(MissingWeightsError, match=rf"unet_lora.*{LORA_WEIGHTS}"):
        load_model(broken)
