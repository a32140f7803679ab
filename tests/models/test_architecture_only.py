"""Architecture-only networks: the published shapes (parameter counts of the real checkpoints), seeded
random weights that every process rebuilds identically, and narrow copies that keep the wiring."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
)

from emojidiff.models.architecture_only import read_marker, shrink_architecture
from emojidiff.models.backbone import Backbone
from emojidiff.models.bundle import build_identity_encoder
from emojidiff.models.expression_encoder import ClipVisionExpressionEncoder
from emojidiff.packaged import PACKAGED_BACKBONES, PACKAGED_ENCODERS, is_architecture_only

SD15, SDXL = PACKAGED_BACKBONES["sd15-arch"], PACKAGED_BACKBONES["sdxl-arch"]
CLIP_H, ARCFACE = PACKAGED_ENCODERS["clip-vit-h-14-arch"], PACKAGED_ENCODERS["arcface-r100-arch"]


def _count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _config(path) -> dict:
    return json.loads(path.read_text())


# The parameter counts of the released checkpoints (diffusers / transformers report these for
# runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0 and laion CLIP-ViT-H-14).
@pytest.mark.parametrize(
    ("part", "expected"),
    [
        ("sd15/unet", 859_520_964),
        ("sd15/vae", 83_653_863),
        ("sd15/text_encoder", 123_060_480),
        ("sdxl/unet", 2_567_463_684),
        ("sdxl/text_encoder_2", 694_659_840),
        ("clip_vision", 632_076_800),
    ],
)
def test_the_configs_are_the_published_networks(part, expected):
    if part == "clip_vision":
        cfg = {k: v for k, v in _config(CLIP_H / "config.json").items() if k != "architectures"}
        from transformers import CLIPVisionModelWithProjection

        assert _count(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))) == expected
        return
    kind, sub = part.split("/")
    folder = SD15 if kind == "sd15" else SDXL
    cfg = _config(folder / sub / "config.json")
    build = {
        "unet": lambda: UNet2DConditionModel.from_config(cfg),
        "vae": lambda: AutoencoderKL.from_config(cfg),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
    }[sub]
    assert _count(build) == expected


def test_every_packaged_architecture_says_it_is_for_speed_and_wiring_only():
    for folder in (SD15, SDXL, CLIP_H, ARCFACE):
        assert is_architecture_only(folder)
        marker = read_marker(folder)
        assert marker["architecture_only"] is True and "never for images" in marker["purpose"]


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    root = tmp_path_factory.mktemp("narrow")
    return {
        name: shrink_architecture(src, root / name)
        for name, src in {"sd15": SD15, "sdxl": SDXL, "clip": CLIP_H, "arcface": ARCFACE}.items()
    }


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_narrow_backbone_keeps_the_wiring_and_is_the_same_in_every_build(kind, narrow):
    a = Backbone.from_folder(narrow[kind])
    b = Backbone.from_folder(narrow[kind])
    assert a.kind == kind and a.vae_scale_factor == 8
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not any(p.requires_grad for p in a.parameters())
    text = a.encode_prompt(["a portrait", "a smiling face"], height=64, width=64)
    cross = a.unet.config.cross_attention_dim
    assert text["encoder_hidden_states"].shape == (2, 77, cross)
    if kind == "sdxl":  # pooled embeds + 6 time ids feed the text_time embedding
        assert text["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    latents = a.encode_images(torch.zeros(2, 3, 64, 64))
    assert latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        out = a.unet(
            latents,
            torch.tensor([10, 500]),
            text["encoder_hidden_states"],
            added_cond_kwargs=text["added_cond_kwargs"],
        ).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_another_seed_gives_other_weights(narrow, tmp_path):
    other = shutil.copytree(narrow["sd15"], tmp_path / "seed1")
    marker = read_marker(other)
    (other / "architecture_only.json").write_text(json.dumps({**marker, "seed": 1}))
    a, b = Backbone.from_folder(narrow["sd15"]), Backbone.from_folder(other)
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)


def test_the_clip_and_arcface_stand_ins_give_the_shapes_the_adapter_reads(narrow):
    clip = ClipVisionExpressionEncoder(str(narrow["clip"]))
    feats = clip(torch.rand(2, 3, 64, 64), torch.ones(2, 1, 64, 64))
    assert feats.shape == (2, 257, clip.feature_dim) and clip.num_tokens == 257  # 224 / 14 = 16, + CLS
    assert not any(p.requires_grad for p in clip.parameters())
    spec = {"name": "arcface-torch", "init_args": {"weights": str(ARCFACE), "arch": "iresnet100"}}
    encoder = build_identity_encoder(spec)
    emb = encoder(torch.rand(3, 3, 64, 64))
    assert emb.shape == (3, 512) and torch.isfinite(emb).all()  # eval mode stays finite over 100 layers
    torch.manual_seed(5)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(build_identity_encoder(spec)(x), encoder(x))
