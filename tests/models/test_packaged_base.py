"""The packaged embedded backbone (`emojidiff:tiny-sd15`): loads through `Backbone.from_folder`,
matches its record, is stored as fp16 safetensors, and is every command's default."""

import json

import pytest
import torch
from safetensors import safe_open

from emojidiff.models.backbone import Backbone
from emojidiff.packaged import DEFAULT_BACKBONE, PACKAGED_BACKBONES, resolve_backbone

FOLDER = PACKAGED_BACKBONES["tiny-sd15"]


def test_packaged_base_loads_with_its_recorded_parameter_counts():
    record = json.loads((FOLDER / "base_record.json").read_text())
    backbone = Backbone.from_folder(DEFAULT_BACKBONE)
    assert backbone.kind == "sd15" and backbone.default_image_size == 64
    assert set(record["parameters"]) == {"unet", "vae", "text_encoder"}
    for name, count in record["parameters"].items():
        assert sum(p.numel() for p in getattr(backbone, name).parameters()) == count, name
    assert backbone.unet.dtype == backbone.text_encoder.dtype == torch.float32  # stored fp16, upcast on load
    assert backbone.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    assert (
        record["dtype"] == "float16"
        and record["pretrain"]["command"] == "python -m lightning_modules.pretrain_base"
    )


def test_packaged_weights_are_fp16_safetensors_of_a_few_megabytes():
    files = sorted(FOLDER.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    for f in files:
        with safe_open(str(f), "pt") as weights:
            dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
        assert dtypes <= {"F16", "I64"}, (f, dtypes)
    assert sum(f.stat().st_size for f in files) < 12 * 2**20


def test_packaged_names_resolve_and_unknown_names_are_listed(tmp_path):
    assert resolve_backbone("emojidiff:tiny-sd15") == FOLDER
    assert resolve_backbone(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="emojidiff:tiny-sd15"):
        resolve_backbone("emojidiff:no-such-base")
