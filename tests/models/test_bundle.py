"""Model folders: save_model -> load_model round trip, path rules, missing files, fresh models, names."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from emojidiff.errors import MissingWeightsError
from emojidiff.models import EXPRESSION_ENCODERS, ClipVisionExpressionEncoder, TinyConvExpressionEncoder
from emojidiff.models.bundle import (
    MODEL_FILE,
    build_expression_encoder,
    fresh_model,
    load_model,
    load_pipeline,
    normalise_spec,
    read_spec,
    save_model,
)
from emojidiff.models.tiny import build_tiny_backbone, save_backbone
from emojidiff.world import Expression, Identity, render

#: world-id without weights: a random (seeded) network, enough for plumbing.
RANDOM_ID = {"name": "world-id", "init_args": {"weights": None}}
ADAPTER = {"num_id_tokens": 2, "num_expr_tokens": 4, "expr_layers": ["up_blocks.*"]}
EXPR = {"name": "tiny-conv", "init_args": {"feature_dim": 32, "width": 16}}
CALL = dict(prompt="a portrait", num_inference_steps=2, height=32, width=32, seed=5)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    return save_backbone(build_tiny_backbone("sd15", seed=0), tmp_path_factory.mktemp("bb") / "tiny")


@pytest.fixture(scope="module")
def inputs():
    tmpl, mask = render(Identity.sample(1), Expression.preset("happy"), size=32, seed=0)
    ref, _ = render(Identity.sample(2), Expression.preset("neutral"), size=32, seed=1)
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    return to_t(tmpl), torch.from_numpy(mask)[None, None].float(), to_t(ref)


def _fresh(backbone_dir: Path, **kw):
    return fresh_model(backbone_dir, RANDOM_ID, EXPR, ADAPTER, seed=3, default_prompt="a portrait", **kw)


def test_round_trip_gives_identical_images(backbone_dir, inputs, tmp_path):
    tmpl, mask, ref = inputs
    model = _fresh(backbone_dir)
    a = model.pipeline(tmpl, id_image=ref, expr_mask=mask, **CALL)
    folder = model.save(tmp_path / "model")
    assert (folder / "adapter" / "adapter.safetensors").is_file() and (
        folder / "expression_encoder.safetensors"
    ).is_file()
    loaded = load_model(folder)
    assert not loaded.untrained and loaded.spec.default_prompt == "a portrait" and loaded.image_size == 64
    b = loaded.pipeline(tmpl, id_image=ref, expr_mask=mask, **CALL)
    assert (a.images == b.images).all() and torch.equal(a.latents, b.latents)
    assert loaded.pipeline.adapter.expression_layers() == model.pipeline.adapter.expression_layers()
    assert isinstance(load_pipeline(folder).expression_encoder, TinyConvExpressionEncoder)


def test_model_file_contents_and_relative_backbone(backbone_dir, tmp_path, monkeypatch):
    model = _fresh(backbone_dir)
    monkeypatch.chdir(tmp_path)
    rel_backbone = os.path.relpath(backbone_dir, tmp_path)
    save_model(
        "models/m1",
        backbone_path=rel_backbone,
        adapter=model.pipeline.adapter,
        expression_encoder=model.pipeline.expression_encoder,
        expression_encoder_spec=EXPR,
        identity_encoder_spec=RANDOM_ID,
        image_size=32,
        mask_from="none",
    )
    data = json.loads((tmp_path / "models/m1" / MODEL_FILE).read_text())
    assert data["format"] == "emojidiff-model" and data["version"] == 1
    assert data["expression_encoder"] == {"name": "tiny_conv", "init_args": {"feature_dim": 32, "width": 16}}
    assert (
        data["identity_encoder"] == RANDOM_ID
        and data["expression_encoder_weights"] == "expression_encoder.safetensors"
    )
    # a CWD-relative backbone is stored relative to the model folder, so loading works from anywhere
    assert (tmp_path / "models/m1" / data["backbone"]).resolve() == backbone_dir.resolve()
    monkeypatch.chdir(backbone_dir)
    assert load_model(tmp_path / "models/m1").image_size == 32


def test_missing_files_name_key_and_file(backbone_dir, tmp_path):
    with pytest.raises(MissingWeightsError, match=MODEL_FILE):
        read_spec(tmp_path / "nowhere")
    folder = _fresh(backbone_dir).save(tmp_path / "m")
    (folder / "expression_encoder.safetensors").unlink()
    with pytest.raises(
        MissingWeightsError, match="expression_encoder_weights.*expression_encoder.safetensors"
    ):
        load_model(folder)
    (folder / "adapter" / "adapter.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match=r"adapter.*adapter\.safetensors"):
        load_model(folder)
    spec = json.loads((folder / MODEL_FILE).read_text())
    spec["backbone"] = "no/such/backbone"
    (folder / MODEL_FILE).write_text(json.dumps(spec))
    with pytest.raises(MissingWeightsError, match="backbone.*model_index.json"):
        load_model(folder)


def test_fresh_model_is_logged_untrained_and_checks_dims(backbone_dir, caplog, tmp_path, monkeypatch):
    with caplog.at_level(logging.WARNING, logger="emojidiff.models.bundle"):
        model = _fresh(backbone_dir)
    assert model.untrained and "UNTRAINED" in caplog.text
    assert model.describe()["untrained"] is True and model.source.startswith("fresh:")
    with pytest.raises(ValueError, match="id_embed_dim=7"):
        fresh_model(backbone_dir, RANDOM_ID, EXPR, {**ADAPTER, "id_embed_dim": 7})
    monkeypatch.chdir(tmp_path)  # the default backbone is packaged: it loads from any directory
    default = fresh_model(identity_encoder_spec=RANDOM_ID)
    assert default.spec.backbone == "emojidiff:tiny-sd15" and default.image_size == 64


def test_expression_encoder_names_and_spec_check(backbone_dir, tmp_path):
    assert isinstance(build_expression_encoder("tiny-conv"), TinyConvExpressionEncoder)
    assert normalise_spec("clip-vision", {"clip-vision": "clip"})["name"] == "clip"
    assert EXPRESSION_ENCODERS.get("clip") is ClipVisionExpressionEncoder
    with pytest.raises(KeyError, match="tiny_conv"):
        build_expression_encoder("no-such-encoder")
    model = _fresh(backbone_dir)
    with pytest.raises(ValueError, match="ClipVisionExpressionEncoder"):
        save_model(
            tmp_path / "bad",
            backbone_path=backbone_dir,
            adapter=model.pipeline.adapter,
            expression_encoder=model.pipeline.expression_encoder,
            expression_encoder_spec="clip-vision",
            identity_encoder_spec=RANDOM_ID,
        )


def test_fresh_model_with_packaged_world_id(backbone_dir):
    model = fresh_model(backbone_dir, "world-id", EXPR, ADAPTER)
    assert model.pipeline.adapter.config.id_embed_dim == model.pipeline.identity_encoder.embedding_dim == 128
