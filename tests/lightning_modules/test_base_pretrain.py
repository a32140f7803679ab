"""Pretraining modules of the tiny backbone: what trains, what stays frozen, that loss falls; the
`make base` configs run end to end at tiny step counts."""

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from datamodules.world_portraits import WorldPortraitStream
from emojidiff.models.pipeline import load_sd_pipeline
from emojidiff.models.tiny import build_tiny_backbone
from lightning_modules.base_pretraining import TinyUNetPretrain, TinyVAEPretrain

ROOT = Path(__file__).resolve().parents[2]


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
    module = TinyVAEPretrain(build_tiny_backbone("sd15"))
    monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
    batch = WorldPortraitStream(batch_size=4, size=32).batch(0)
    losses = _steps(module, batch, 25)
    assert losses[-1] < 0.6 * losses[0]


def test_vae_perceptual_term_trains_the_vae_and_never_the_analyser(monkeypatch):
    from emojidiff.face.world_models import WorldExpressionRegressor, WorldIdentityEncoder

    torch.manual_seed(0)
    analyser, encoder = WorldExpressionRegressor(), WorldIdentityEncoder()
    frozen = {k: v.clone() for k, v in analyser.state_dict().items()}
    module = TinyVAEPretrain(
        build_tiny_backbone("sd15"),
        perceptual={"expr": analyser, "id": encoder},
        perceptual_weights={"expr": 1.0, "id": 0.5},
    )
    logged = {}
    monkeypatch.setattr(module, "log_dict", lambda values, **k: logged.update(values))
    module.train()
    assert not analyser.training and not analyser.net.training
    batch = WorldPortraitStream(batch_size=4, size=64).batch(0)
    losses = _steps(module, batch, 3)
    assert {"train/loss", "train/l1", "train/perceptual_expr", "train/perceptual_id"} <= set(logged)
    expr, ident = float(logged["train/perceptual_expr"]), float(logged["train/perceptual_id"])
    assert expr > 0 and ident > 0
    assert float(logged["train/loss"]) >= float(logged["train/l1"]) + expr + 0.5 * ident  # + KL
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, analyser.state_dict()[k]) for k, v in frozen.items())  # BatchNorm stats too
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    with torch.no_grad():
        module.validation_step(batch, 1)
    error = float(
        module.val_expr_error.compute()
    )  # the analyser's reading of reconstructions vs ground truth
    assert 0 < error < 2
    with pytest.raises(ValueError, match="same terms"):
        TinyVAEPretrain(build_tiny_backbone("sd15"), perceptual_weights={"expr": 1.0})


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


def test_unet_pretrain_accepts_cached_posteriors(monkeypatch):
    from datamodules.latent_portraits import encode_portraits, vae_posterior

    torch.manual_seed(0)
    backbone = build_tiny_backbone("sd15")
    module = TinyUNetPretrain(backbone)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    data = encode_portraits(vae_posterior(backbone.vae), WorldPortraitStream(batch_size=4, size=64), 4)
    batch = {"latent_mean": data.latent_mean, "latent_std": data.latent_std, "prompts": data.prompts}
    # a posterior sample: mean + std * noise, scaled like Backbone.encode_images
    torch.manual_seed(1)
    latents = module._latents(batch)
    torch.manual_seed(1)
    expected = (
        data.latent_mean + data.latent_std * torch.randn_like(data.latent_mean)
    ) * backbone.vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)
    losses = _steps(module, batch, 2)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_min_snr_weighting():
    torch.manual_seed(0)
    backbone = build_tiny_backbone("sd15")
    batch = WorldPortraitStream(batch_size=32, size=32).batch(2)  # t < ~170 (snr > 5) drawn

    def loss(gamma, weighted=True):
        torch.manual_seed(5)
        return float(
            TinyUNetPretrain(backbone, snr_gamma=gamma)._loss(batch, drop_captions=False, weighted=weighted)
        )

    plain = loss(None)
    assert loss(1e12) == pytest.approx(plain, rel=1e-5)  # min(snr, inf) / snr == 1
    assert loss(5.0, weighted=False) == pytest.approx(plain, rel=1e-6)
    assert loss(5.0) < plain  # weights min(snr, 5) / snr <= 1, < 1 at low noise
    assert loss(0.5) < loss(5.0)


def _stage_overlay(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.slow
def test_make_base_end_to_end(tmp_path):
    """`make base`'s three commands (the VAE fit, the UNet fit, the release) on tiny step counts."""

    from emojidiff.cli import main as cli
    from lightning_modules.base_release import main as release

    folder = tmp_path / "base"
    logger = f"{{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {{save_dir: {tmp_path / 'logs'}}}}}"
    vae_stage = _stage_overlay(
        tmp_path,
        "vae",
        f"""
trainer: {{max_steps: 4, val_check_interval: 4, logger: {logger}}}
model: {{init_args: {{export_dir: {folder}}}}}
data: {{init_args: {{batch_size: 4, size: 64, steps_per_epoch: 4}}}}
""",
    )

    def unet_stage(vae_from: Path, out: Path) -> str:
        return _stage_overlay(
            tmp_path,
            f"unet_{out.name}",
            f"""
trainer: {{max_steps: 4, val_check_interval: 4, logger: {logger}}}
model: {{init_args: {{backbone: {{init_args: {{vae_from: {vae_from}}}}}, export_dir: {out}}}}}
data: {{init_args: {{vae_from: {vae_from}, count: 16, batch_size: 4, size: 64}}}}
""",
        )

    assert cli(["fit", "-c", str(ROOT / "configs/base/vae.yaml"), "-c", vae_stage]) == 0
    assert cli(["fit", "-c", str(ROOT / "configs/base/unet.yaml"), "-c", unet_stage(folder, folder)]) == 0
    record = release(
        ["-c", str(ROOT / "configs/base/release.yaml"), "--folder", str(folder), "--sample_steps", "2"]
    )
    assert (folder / "samples.png").exists() and (
        folder / "unet" / "diffusion_pytorch_model.safetensors"
    ).exists()
    saved = json.loads((folder / "pretrain_config.json").read_text())
    assert (
        saved["vae"]["config"]["trainer"]["max_steps"] == 4
        and saved["vae"]["scaling_factor"] == record["vae"]["scaling_factor"]
    )
    # the record names the commands that made it, each with its resolved config
    assert (
        saved["vae"]["command"]
        == f"python -m emojidiff.cli fit -c {ROOT / 'configs/base/vae.yaml'} -c {vae_stage}"
    )
    assert (
        saved["unet"]["command"].startswith("python -m emojidiff.cli fit -c")
        and saved["unet"]["global_step"] == 4
    )
    assert saved["release"]["command"].startswith("python -m lightning_modules.base_release -c")
    assert saved["unet"]["config"]["data"]["init_args"]["count"] == 16 and "latent_cache_seconds" in saved
    pipe = load_sd_pipeline(folder)
    assert pipe.vae.config.scaling_factor == pytest.approx(record["vae"]["scaling_factor"])

    # the UNet stage alone on that folder's VAE recomputes the full run's UNet exactly (the stage seeds itself)
    assert (
        cli(
            [
                "fit",
                "-c",
                str(ROOT / "configs/base/unet.yaml"),
                "-c",
                unet_stage(folder, tmp_path / "unet_only"),
            ]
        )
        == 0
    )
    full, rerun = (
        load_file(str(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors"))
        for d in ("base", "unet_only")
    )
    assert full.keys() == rerun.keys() and all(torch.equal(full[k], rerun[k]) for k in full)
    assert json.loads((tmp_path / "unet_only" / "pretrain_config.json").read_text())["vae"]["from"] == str(
        folder
    )

    # installing writes the fp16 diffusers folder with its record, loadable as a backbone
    from emojidiff.models.backbone import Backbone
    from lightning_modules.base_release import install_backbone

    installed = install_backbone(folder, tmp_path / "pkg" / "tiny-sd15", record=record)
    loaded = Backbone.from_folder(tmp_path / "pkg" / "tiny-sd15")
    assert installed["parameters"]["unet"] == sum(p.numel() for p in loaded.unet.parameters())
    fp16 = load_file(str(tmp_path / "pkg" / "tiny-sd15" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in fp16.values())
    base_record = json.loads((tmp_path / "pkg" / "tiny-sd15" / "base_record.json").read_text())
    assert base_record["pretrain"]["vae"]["config"]["trainer"]["max_steps"] == 4


def test_vae_from_reuses_a_saved_vae_and_names_a_missing_one(tmp_path):
    from emojidiff.models.tiny import build_world_backbone, load_vae, save_backbone

    backbone = build_tiny_backbone("sd15", seed=3)
    backbone.vae.register_to_config(scaling_factor=0.5)
    save_backbone(backbone, tmp_path / "bb")
    vae = load_vae(tmp_path / "bb")
    assert vae.config.scaling_factor == 0.5 and not any(p.requires_grad for p in vae.parameters())
    assert all(torch.equal(v, backbone.vae.state_dict()[k]) for k, v in vae.state_dict().items())
    with pytest.raises(FileNotFoundError, match="vae_from .*vae/config.json"):
        load_vae(tmp_path / "nothing")
    # the UNet stage's backbone: the VAE stage's (same seed: same UNet and text encoder) with that VAE
    world = build_world_backbone("sd15", seed=3, vae_from=tmp_path / "bb")
    fresh = build_world_backbone("sd15", seed=3)
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in world.vae.state_dict().items())
    assert all(torch.equal(v, fresh.unet.state_dict()[k]) for k, v in world.unet.state_dict().items())
    # ... whose tokenizer knows the world's caption words as single tokens, as the default one does not
    assert len(world.tokenizer.tokenize("ginger")) == 1 < len(backbone.tokenizer.tokenize("ginger"))
