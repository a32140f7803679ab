"""Pretraining modules of the tiny backbone: what trains, what stays frozen, that loss falls."""

import copy
import json

import lightning as L
import pytest
import torch

from datamodules.world_portraits import WorldPortraitStream
from emojidiff.models.tiny import build_tiny_backbone
from lightning_modules.base_pretrain import TinyUNetPretrain, TinyVAEPretrain


def _steps(module: L.LightningModule, batch: dict, n: int) -> list[float]:
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(n):
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_vae_pretrain_fits_a_batch(monkeypatch):
    torch.manual_seed(0)
    module = TinyVAEPretrain(build_tiny_backbone("sd15").vae)
    monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
    batch = WorldPortraitStream(batch_size=4, size=32).batch(0)
    losses = _steps(module, batch, 25)
    assert losses[-1] < 0.6 * losses[0]


def test_unet_pretrain_trains_unet_and_text_encoder_only(monkeypatch):
    torch.manual_seed(0)
    backbone = build_tiny_backbone("sd15")
    vae_before = copy.deepcopy(backbone.vae.state_dict())
    unet_before = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in backbone.text_encoder.state_dict().items()}
    module = TinyUNetPretrain(backbone, ema_decay=0.5)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    batch = WorldPortraitStream(batch_size=4, size=32).batch(1)
    module.train()
    assert not backbone.vae.training
    for _ in range(2):  # the first EMA update copies the weights, the second one averages
        _steps(module, batch, 1)
        module.on_train_batch_end(None, batch, 0)
    assert all(torch.equal(v, backbone.vae.state_dict()[k]) for k, v in vae_before.items())
    assert any(not torch.equal(v, backbone.unet.state_dict()[k]) for k, v in unet_before.items())
    assert any(not torch.equal(v, backbone.text_encoder.state_dict()[k]) for k, v in text_before.items())
    ema = module.ema_state_dict()
    assert ema.keys() == backbone.unet.state_dict().keys()
    w = "conv_in.weight"
    assert not torch.equal(ema[w], backbone.unet.state_dict()[w]) and not torch.equal(ema[w], unet_before[w])


@pytest.mark.slow
def test_pretrain_base_end_to_end(tmp_path):
    from diffusers import StableDiffusionPipeline

    from lightning_modules.pretrain_base import main

    record = main(["--out", str(tmp_path / "base"), "--vae-steps", "4", "--unet-steps", "4", "--vae-batch", "4",
                   "--unet-batch", "4", "--size", "64", "--sample-steps", "2"])
    folder = tmp_path / "base"
    assert (folder / "samples.png").exists() and (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    saved = json.loads((folder / "pretrain_config.json").read_text())
    assert saved["args"]["vae_steps"] == 4 and saved["vae"]["scaling_factor"] == record["vae"]["scaling_factor"]
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    assert pipe.vae.config.scaling_factor == pytest.approx(record["vae"]["scaling_factor"])
