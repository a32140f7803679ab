"""Backbone.from_folder: diffusers layout round trip, freezing, text/image encoding, clear errors."""

from __future__ import annotations

import pytest
import torch

from emojidiff.errors import MissingWeightsError
from emojidiff.models import EAdapter, EAdapterConfig
from emojidiff.models.backbone import Backbone
from emojidiff.models.tiny import LATENT_CHANNELS, build_tiny_backbone, save_backbone


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def saved(request, tmp_path_factory):
    bb = build_tiny_backbone(request.param, seed=3)
    folder = save_backbone(bb, tmp_path_factory.mktemp(request.param) / "backbone")
    return bb, folder


def _unet_out(bb: Backbone, prompts=("a smiling man", "a sad woman")) -> torch.Tensor:
    cond = bb.encode_prompt(list(prompts), 32, 32)
    lat = torch.randn(len(prompts), LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    return bb.unet(
        lat,
        torch.tensor([500]),
        encoder_hidden_states=cond["encoder_hidden_states"],
        added_cond_kwargs=cond["added_cond_kwargs"],
    ).sample


def test_round_trip(saved):
    bb, folder = saved
    assert (folder / "model_index.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    loaded = Backbone.from_folder(folder)
    assert loaded.kind == bb.kind
    ref, new = bb.state_dict(), loaded.state_dict()
    assert ref.keys() == new.keys()
    assert all(torch.equal(ref[k], new[k]) for k in ref)
    text = "a smiling woman with zebra glasses"
    assert loaded.tokenizer(text).input_ids == bb.tokenizer(text).input_ids
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"
    with torch.no_grad():
        assert torch.equal(_unet_out(loaded), _unet_out(bb))


def test_loaded_backbone_is_frozen(saved):
    _, folder = saved
    bb = Backbone.from_folder(folder, gradient_checkpointing=True)
    assert all(not p.requires_grad for p in bb.parameters())
    bb.train()
    assert not any(m.training for m in bb.modules() if m is not bb)
    assert bb.unet.is_gradient_checkpointing
    assert {type(p).__name__ for p in bb.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    eager = Backbone.from_folder(folder, attention="eager")
    assert {type(p).__name__ for p in eager.unet.attn_processors.values()} == {"AttnProcessor"}


def test_unfrozen_components_follow_train_mode():
    bb = build_tiny_backbone()
    assert not bb.encode_prompt("a man")["encoder_hidden_states"].requires_grad
    bb.text_encoder.requires_grad_(True)  # as base pretraining does
    bb.train()
    assert bb.text_encoder.training and not bb.vae.training and not bb.unet.training
    assert bb.encode_prompt("a man")["encoder_hidden_states"].requires_grad
    bb.eval()
    assert not bb.text_encoder.training


def test_encode_prompt_shapes(saved):
    bb, _ = saved
    cond = bb.encode_prompt(["a man", "a woman", ""], height=48, width=32)
    hidden = cond["encoder_hidden_states"]
    assert hidden.shape == (3, bb.tokenizer.model_max_length, bb.unet.config.cross_attention_dim)
    assert not torch.allclose(hidden[0], hidden[1])
    if bb.kind == "sdxl":
        added = cond["added_cond_kwargs"]
        assert added["text_embeds"].shape == (3, bb.text_encoder_2.config.projection_dim)
        assert added["time_ids"].tolist()[0] == [48, 32, 0, 0, 48, 32]
    else:
        assert cond["added_cond_kwargs"] is None


def test_decode_is_differentiable(saved):
    bb, _ = saved
    lat = torch.randn(1, LATENT_CHANNELS, 8, 8, requires_grad=True)
    img = bb.decode_latents(lat)
    assert img.shape == (1, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
    img.square().mean().backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.vae.parameters())


def test_latent_scaling_round_trips_and_matches_encode():
    bb = build_tiny_backbone("sd15", seed=3)
    bb.vae.register_to_config(scaling_factor=0.7, shift_factor=0.2)
    raw = torch.randn(2, LATENT_CHANNELS, 8, 8)
    assert torch.allclose(bb.scale_latents(raw), (raw - 0.2) * 0.7)
    assert torch.allclose(bb.unscale_latents(bb.scale_latents(raw)), raw, atol=1e-6)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mode = bb.vae.encode(images).latent_dist.mode()
    assert torch.allclose(bb.encode_images(images, sample=False), bb.scale_latents(mode))


def test_missing_folder_names_key_and_files(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        Backbone.from_folder(tmp_path / "nope")
    msg = str(err.value)
    assert "model.backbone.path" in msg and "model_index.json" in msg and "unet/config.json" in msg
    with pytest.raises(MissingWeightsError, match="model.sd15.path"):
        Backbone.from_folder(None, key="model.sd15.path")


def test_missing_component_files(saved, tmp_path):
    _, folder = saved
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(MissingWeightsError) as err:
        Backbone.from_folder(broken)
    assert err.value.key == "model.backbone.path"
    assert err.value.expected == [
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ]
    (broken / "model_index.json").unlink()
    with pytest.raises(MissingWeightsError, match="model_index.json"):
        Backbone.from_folder(broken)


def test_save_refuses_attached_adapter(tmp_path):
    bb = build_tiny_backbone()
    EAdapter(EAdapterConfig(id_embed_dim=8, expr_feature_dim=8, num_expr_tokens=2), bb.unet).attach(bb.unet)
    with pytest.raises(ValueError, match="detach"):
        save_backbone(bb, tmp_path)
