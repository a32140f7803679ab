"""The training stages one step at a time: what trains, what stays frozen, what a checkpoint holds,
non-finite losses, the ICA terms and its adaptive timestep range, a module built from objects."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from data_gen.world_triplets import write_world_triplets  # noqa: E402
from datamodules.triplets import stored_batches  # noqa: E402
from emojidiff.models.bundle import FreshModel, build_expression_analyser, build_identity_encoder  # noqa: E402
from lightning_modules.adapter_training import NonFiniteLossError  # noqa: E402
from lightning_modules.decoupled import DecoupledModule  # noqa: E402
from lightning_modules.ica import ICAModule  # noqa: E402

SMALL = {"ema_decay": 0.9, "val_steps": 2}


def small_model() -> FreshModel:
    """A fresh small adapter on the packaged tiny backbone, world-id and tiny_conv (the factory's defaults)."""
    return FreshModel(adapter={"num_id_tokens": 2, "num_expr_tokens": 4})


def decoupled(**kwargs) -> DecoupledModule:
    return DecoupledModule(small_model(), **SMALL, **kwargs)


def ica(**kwargs) -> ICAModule:
    """ICA on a fresh small model, world-expr as the training expression analyser."""
    kwargs.setdefault("expression_analyser", build_expression_analyser("world-expr"))
    return ICAModule(small_model(), **SMALL, **kwargs)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    shards = write_world_triplets(tmp_path_factory.mktemp("triplets"), n=8, shards=1)
    return next(stored_batches(shards, 4))


def one_batch_loader(batch) -> DataLoader:
    return DataLoader([batch], batch_size=None, collate_fn=lambda b: b)


def fit_one_step(module, batch, tmp_path) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=one_batch_loader(batch))
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stage", ["decoupled", "ica"])
def test_one_step_changes_only_the_trainable_weights(stage, batch, tmp_path):
    module = (
        decoupled(export_dir=str(tmp_path / "model"))
        if stage == "decoupled"
        else ica(export_dir=str(tmp_path / "model"), t_max_floor=200, t_max=400)
    )
    before = snapshot(module)
    fit_one_step(module, batch, tmp_path)
    after = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = ("adapter.", "expression_encoder.", "ema.")
    assert any(k.startswith("adapter.") for k in changed)
    assert any(k.startswith("expression_encoder.") for k in changed)  # tiny_conv trains on the world
    frozen_changed = sorted(k for k in changed if not k.startswith(trainable))
    assert frozen_changed == [], frozen_changed  # backbone, identity encoder, analysers bit-identical
    # one name per weight: the processors run inside the UNet but belong to the adapter alone
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    assert [n for n in names.values() if len(n) > 1] == []
    adapter_params = {id(p) for p in module.adapter.parameters()}
    assert all(not p.requires_grad for p in module.backbone.parameters() if id(p) not in adapter_params)
    assert (tmp_path / "model" / "emojidiff_model.json").is_file()  # on_fit_end exported the EMA model


def test_a_checkpoint_holds_trainable_state_ema_and_the_export_record_only(tmp_path):
    module = decoupled()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith(("adapter.", "expression_encoder.", "ema.")) for k in keys)
    assert any(k.startswith("ema.module.adapter.") for k in keys)
    assert not any("unet" in k or "vae" in k for k in keys)
    record = ckpt["emojidiff"]
    assert record["stage"] == "decoupled" and record["adapter"]["config"]["num_id_tokens"] == 2
    module.on_load_checkpoint(ckpt)  # round trip accepted
    del ckpt["state_dict"][next(k for k in keys if k.startswith("adapter."))]
    with pytest.raises(KeyError, match="lacks 1 trainable weights"):
        module.on_load_checkpoint(ckpt)


def test_a_non_finite_loss_stops_the_run_naming_the_term_and_step(batch, tmp_path):
    bad = dict(batch)
    bad["tgt"] = torch.full_like(batch["tgt"], float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss term 'diffusion' is nan at global step 0"):
        fit_one_step(decoupled(), bad, tmp_path)


def test_the_same_step_seed_draws_the_same_noise_whatever_the_global_rng(batch):
    module = decoupled()
    torch.manual_seed(1)
    a = module.noised(batch, generator=module.step_generator(0))
    torch.manual_seed(2)
    b = module.noised(batch, generator=module.step_generator(0))
    c = module.noised(batch, generator=module.step_generator(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


def test_ica_computes_every_weighted_term_and_skips_the_off_pass_without_alignment(batch):
    module = ica()
    terms = module.compute_losses(batch, module.step_generator(0))
    assert set(terms) == {
        "diffusion",
        "identity",
        "expression",
        "align_identity",
        "align_semantic",
        "align_layout",
    }
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in terms.values())
    calls = []
    module.backbone.unet.register_forward_hook(lambda *a: calls.append(1))
    no_align = ica(weights={"align_identity": 0, "align_semantic": 0, "align_layout": 0})
    no_align.backbone.unet.register_forward_hook(lambda *a: calls.append(2))
    assert set(no_align.compute_losses(batch, no_align.step_generator(0))) == {
        "diffusion",
        "identity",
        "expression",
    }
    assert calls.count(2) == 1  # one UNet pass: the expression-off pass only runs for alignment


def test_ica_identity_gradient_reaches_the_adapter_through_the_vae_decode(batch):
    module = ica(
        weights={"diffusion": 0, "expression": 0, "align_identity": 0, "align_semantic": 0, "align_layout": 0}
    )
    terms = module.compute_losses(batch, module.step_generator(0))
    terms["identity"].mean().backward()
    grads = [p.grad for p in module.adapter.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in module.backbone.vae.parameters())


def test_the_timestep_range_shrinks_when_x0_is_unrecognisable_and_widens_when_easy():
    module = ica(
        t_max=600,
        t_max_floor=200,
        t_max_cap=800,
        recognise_threshold=0.5,
        adapt_margin=0.1,
        adapt_factor=0.5,
        adapt_every=2,
    )
    module.adapt(0.1)
    assert module.t_max == 600  # not yet adapt_every steps
    module.adapt(0.2)
    assert module.t_max == 300
    for _ in range(4):
        module.adapt(0.0)
    assert module.t_max == 200  # clipped at the floor
    for _ in range(6):
        module.adapt(0.9)
    assert module.t_max == 800  # clipped at the cap
    state = module.stage_state()
    other = ica()
    other.load_stage_state(state)
    assert other.t_max == 800


def test_ica_refuses_a_non_differentiable_loss_network():
    with pytest.raises(ValueError, match="loss_identity_encoder .*not differentiable"):
        ica(loss_identity_encoder=build_identity_encoder("dlib"))
    with pytest.raises(ValueError, match="unknown ICA loss terms"):
        ica(weights={"identiy": 1.0})
    with pytest.raises(ValueError, match="expression_analyser is null but weights.expression > 0"):
        ica(expression_analyser=None)


def test_one_step_with_a_unet_lora_trains_the_lora_and_nothing_else_of_the_unet(batch, tmp_path):
    from emojidiff.models.lora import lora_modules

    module = decoupled(unet_lora={"rank": 2}, unet_lr=5e-3, export_dir=str(tmp_path / "model"))
    lora = lora_modules(module.backbone.unet)
    assert all(
        float(m.weight.abs().max()) == 0 for k, m in lora.items() if "lora_B" in k
    )  # B = 0: a no-op at start
    groups = module.parameter_groups()
    assert (
        "lr" not in groups[0] and groups[1]["lr"] == 5e-3
    )  # the adapter at the optimizer's rate, the LoRA at unet_lr
    optimizer = module.configure_optimizers()["optimizer"]  # the default: AdamW at 1e-4, no warm-up
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 5e-3]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in lora.parameters()}
    before = snapshot(module.backbone.unet)
    fit_one_step(module, batch, tmp_path)
    after = snapshot(module.backbone.unet)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".lora_B." in k for k in changed)
    assert all(".lora_" in k or ".processor." in k for k in changed), sorted(changed)[
        :5
    ]  # base weights untouched
    assert "unet_lora" in module.ema.module  # the EMA averages the LoRA too
    assert (tmp_path / "model" / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()


def test_identity_from_noise_is_a_hand_written_ddim_chain_with_gradients_through_its_last_step(batch):
    module = ica(sample_steps=3, sample_grad_steps=1, sample_guidance=2.0)
    ehs, added = module.condition(batch, dropout=False)
    x0 = module.sample_from_noise(batch, ehs, added, torch.Generator().manual_seed(7))

    # by hand: DDIM (eta 0) with CFG against the null text and null tokens, at the scheduler's timesteps
    from diffusers import DDIMScheduler

    timesteps = DDIMScheduler.from_config(module.scheduler.config)
    timesteps.set_timesteps(3)
    ts = [int(t) for t in timesteps.timesteps]
    abar = module.alphas_cumprod
    b = ehs.shape[0]
    null_tokens = module.adapter.encode_conditions(
        torch.zeros(b, module.adapter.config.id_embed_dim), None, drop_id=True, drop_expr=True
    )
    null = module.adapter.build_encoder_hidden_states(
        module.text_states([""] * b)["encoder_hidden_states"], null_tokens
    )
    z = torch.randn(
        b, module.backbone.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(7)
    )
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((b,), t)
            cond = module.backbone.unet(z, tt, encoder_hidden_states=ehs).sample
            eps = cond + 1.0 * (cond - module.backbone.unet(z, tt, encoder_hidden_states=null).sample)
            x0_hand = (z - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
            if i + 1 < len(ts):
                z = abar[ts[i + 1]].sqrt() * x0_hand + (1 - abar[ts[i + 1]]).sqrt() * eps
    torch.testing.assert_close(x0.detach(), x0_hand, rtol=1e-4, atol=1e-4)
    x0.sum().backward()
    grads = [p.grad for p in module.adapter.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_ica_refuses_more_gradient_steps_than_sampler_steps():
    with pytest.raises(ValueError, match="sample_grad_steps"):
        ica(sample_steps=2, sample_grad_steps=3)


def test_identity_from_noise_on_a_sub_batch_keeps_the_other_terms_on_the_whole_batch(batch):
    module = ica(sample_steps=2, sample_rows=2)
    terms = module.compute_losses(batch, module.step_generator(0))
    assert terms["identity"].shape == terms["expression"].shape == (2,)
    assert terms["diffusion"].shape == terms["align_identity"].shape == terms["align_semantic"].shape == (4,)


def test_a_module_built_from_objects_trains_only_the_adapter_and_expression_encoder(batch, tmp_path):
    """No registry name anywhere: a tiny backbone, a fresh adapter, a random world CNN as identity encoder,
    a tiny conv expression encoder, and the optimizer as a callable, all handed in as objects."""
    from emojidiff.face.world_models import WorldIdentityEncoder
    from emojidiff.models.adapter import EAdapter, EAdapterConfig
    from emojidiff.models.bundle import EmojiDiffModel
    from emojidiff.models.expression_encoder import TinyConvExpressionEncoder
    from emojidiff.models.pipeline import EmojiDiffPipeline
    from emojidiff.models.tiny import build_tiny_backbone

    torch.manual_seed(0)
    backbone = build_tiny_backbone()
    identity, expression = (
        WorldIdentityEncoder(weights=None),
        TinyConvExpressionEncoder(feature_dim=32, width=16),
    )
    adapter = EAdapter(
        EAdapterConfig(
            num_id_tokens=2,
            num_expr_tokens=4,
            id_embed_dim=identity.embedding_dim,
            expr_feature_dim=expression.feature_dim,
        ),
        backbone.unet,
    )
    model = EmojiDiffModel(EmojiDiffPipeline(backbone, adapter, expression, identity))
    assert model.spec is None and model.source == "objects"
    seen = []

    def sgd(params):
        seen.append(params)
        return torch.optim.SGD(params, lr=0.1)

    module = DecoupledModule(
        model,
        optimizer=sgd,
        lr_scheduler=None,
        id_source="encoder",
        ema_decay=None,
        export_dir=str(tmp_path / "model"),
    )
    assert module.backbone is backbone and module.adapter is adapter and module.identity_encoder is identity
    before = snapshot(module)
    trainer = fit_one_step(module, batch, tmp_path)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    optimized = {id(p) for group in seen[0] for p in group["params"]}
    assert optimized == {
        id(p) for p in [*adapter.parameters(), *expression.parameters()]
    }  # exactly the trainable weights
    after = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("adapter.") for k in changed) and any(
        k.startswith("expression_encoder.") for k in changed
    )
    trained = {
        v.data_ptr()
        for k, v in module.state_dict().items()
        if k.startswith(("adapter.", "expression_encoder."))
    }
    others = sorted(k for k in changed if module.state_dict()[k].data_ptr() not in trained)
    assert others == [], (
        others
    )  # backbone and identity encoder bit-identical (the adapter's processors alias its weights)
    assert not (tmp_path / "model").exists()  # no ModelSpec: trained, not exported
    with pytest.raises(ValueError, match="without a ModelSpec"):
        module.export(tmp_path / "model")
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["emojidiff"]["model"] is None and ckpt["emojidiff"]["stage"] == "decoupled"
    torch.save(ckpt, tmp_path / "objects.ckpt")
    from emojidiff.commands.export import export_checkpoint

    with pytest.raises(ValueError, match="without a ModelSpec"):
        export_checkpoint(tmp_path / "objects.ckpt", tmp_path / "exported")


def _loss_and_grads(module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.train()
    terms = module.compute_losses(batch, torch.Generator().manual_seed(3))
    loss = torch.stack([v.mean() for v in terms.values()]).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.adapter.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("stage", ["decoupled", "ica"])
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_step(stage, batch):
    """ICA changes the processors' state between its two UNet passes (recording, expression off) and
    back-propagates after both: the recomputed blocks must run in the forward's state."""

    def build(checkpointing: bool):
        extra = {"t_max_floor": 200, "t_max": 400} if stage == "ica" else {}
        return (ica if stage == "ica" else decoupled)(gradient_checkpointing=checkpointing, **extra)

    loss_plain, grads_plain = _loss_and_grads(build(False), batch)
    checkpointed = build(True)
    assert checkpointed.backbone.unet.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) > 10
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)
