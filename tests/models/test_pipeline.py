"""EmojiDiffPipeline (determinism, expression sensitivity, compositional CFG) and expression encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from emojidiff.errors import MissingWeightsError
from emojidiff.models import (
    EXPRESSION_ENCODERS,
    ClipVisionExpressionEncoder,
    EAdapter,
    EAdapterConfig,
    EmojiDiffPipeline,
    TinyConvExpressionEncoder,
)
from emojidiff.models.tiny import LATENT_CHANNELS, build_tiny_backbone

D_ID, F_EXPR = 16, 32
CALL = dict(prompt="a smiling woman", num_inference_steps=2, height=32, width=32)


def _pipeline(kind: str) -> EmojiDiffPipeline:
    bb = build_tiny_backbone(kind, seed=0)
    cfg = EAdapterConfig(
        id_embed_dim=D_ID,
        num_id_tokens=2,
        num_expr_tokens=4,
        expr_feature_dim=F_EXPR,
        expr_layers=["up_blocks.*"],
        expr_scale=2.0,
    )
    torch.manual_seed(0)
    adapter = EAdapter(cfg, bb.unet)
    return EmojiDiffPipeline(bb, adapter, TinyConvExpressionEncoder(F_EXPR, width=16).eval())


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    return _pipeline(request.param)


def _templates(seed: int, b: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


ID = torch.randn(2, D_ID, generator=torch.Generator().manual_seed(7))


def test_deterministic_with_seed(pipe):
    a = pipe(_templates(0), id_embeds=ID, seed=3, **CALL)
    b = pipe(_templates(0), id_embeds=ID, seed=3, **CALL)
    c = pipe(_templates(0), id_embeds=ID, seed=4, **CALL)
    assert a.images.shape == (2, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.latents.shape == (2, LATENT_CHANNELS, 8, 8)
    assert np.array_equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)


def test_expression_template_changes_output(pipe):
    a = pipe(_templates(0), id_embeds=ID, seed=3, **CALL)
    b = pipe(_templates(1), id_embeds=ID, seed=3, **CALL)
    assert (a.latents - b.latents).abs().max() > 1e-3
    # with the expression branch switched off the template no longer matters
    a0 = pipe(_templates(0), id_embeds=ID, seed=3, expr_scale=0.0, **CALL)
    b0 = pipe(_templates(1), id_embeds=ID, seed=3, expr_scale=0.0, **CALL)
    assert torch.equal(a0.latents, b0.latents)
    assert pipe.adapter.config.expr_scale == 2.0  # per-call scale restored


def test_mask_reaches_the_encoder(pipe):
    zero_mask = torch.zeros(2, 1, 32, 32)
    masked = pipe(_templates(0), id_embeds=ID, expr_mask=zero_mask, seed=3, **CALL)
    black = pipe(torch.zeros(2, 3, 32, 32), id_embeds=ID, seed=3, **CALL)
    assert torch.equal(masked.latents, black.latents)


@pytest.mark.parametrize("scheduler", ["dpm++", "euler"])
def test_schedulers_and_numpy_input(scheduler):
    pipe = _pipeline("sd15")
    uint8 = (_templates(0).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    out = pipe(uint8, id_embeds=ID, scheduler=scheduler, seed=0, **CALL)
    again = pipe(uint8, id_embeds=ID, scheduler=scheduler, seed=0, **CALL)
    assert out.images.shape == (2, 32, 32, 3) and torch.isfinite(out.latents).all()
    assert torch.equal(out.latents, again.latents)


def test_compositional_guidance_runs_only_needed_passes():
    pipe = _pipeline("sd15")
    batches: list[int] = []
    hook = pipe.backbone.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        x = _templates(0)
        pipe(x, id_embeds=ID, guidance_scale=3.0, **CALL)  # plain CFG: 2 conditions
        pipe(x, id_embeds=ID, guidance_scale=1.0, **CALL)  # g = 1: the conditional pass alone
        pipe(x, id_embeds=ID, guidance_scale=3.0, id_guidance=2.0, expr_guidance=4.0, **CALL)  # all 4
    finally:
        hook.remove()
    assert batches == [4, 4, 2, 2, 8, 8]
    with pytest.raises(ValueError, match="id_embeds"):
        pipe(x, **CALL)


def test_compositional_guidance_matches_the_formula_on_direct_unet_predictions():
    """One DDIM step is linear in eps: the pipeline's latents equal a DDIM step on the module
    docstring's 4-term combination of UNet predictions built here from the adapter's tokens
    directly, so a pipeline that drops the wrong branch in a term does not pass."""
    pipe = _pipeline("sd15")
    bb, ad = pipe.backbone, pipe.adapter
    x, seed = _templates(0), 5
    g_t, g_i, g_e = 3.0, 2.0, 4.0
    out = pipe(
        x,
        id_embeds=ID,
        guidance_scale=g_t,
        id_guidance=g_i,
        expr_guidance=g_e,
        **dict(CALL, num_inference_steps=1, seed=seed),
    ).latents

    sched = DDIMScheduler.from_config(bb.noise_scheduler.config)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
    with torch.no_grad():
        feats = pipe.expression_encoder(x, None)
        text = bb.encode_prompt([CALL["prompt"]] * 2)["encoder_hidden_states"]
        negative = bb.encode_prompt([""] * 2)["encoder_hidden_states"]

        def eps(states, drop_id: bool, drop_expr: bool) -> torch.Tensor:
            tokens = ad.encode_conditions(ID, feats, drop_id=drop_id, drop_expr=drop_expr)
            ehs = torch.cat([states, tokens], dim=1)
            return bb.unet(sched.scale_model_input(noise, t), t, encoder_hidden_states=ehs).sample

        null, text_only = eps(negative, True, True), eps(text, True, True)
        text_id, full = eps(text, False, True), eps(text, False, False)
        text_expr = eps(text, True, False)
    combined = null + g_t * (text_only - null) + g_i * (text_id - text_only) + g_e * (full - text_id)
    ref = sched.step(combined, t, noise).prev_sample
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the branches matter: dropping identity instead of expression in the middle term is visible
    swapped = null + g_t * (text_only - null) + g_i * (text_expr - text_only) + g_e * (full - text_expr)
    assert (sched.step(swapped, t, noise).prev_sample - ref).abs().max() > 1e-3


def test_id_image_with_identity_encoder():
    pipe = _pipeline("sd15")
    pipe.identity_encoder = lambda images: images.mean(dim=(2, 3)).repeat(1, D_ID // 3 + 1)[:, :D_ID]
    out = pipe(_templates(0), id_image=_templates(9), seed=1, **CALL)
    assert out.images.shape == (2, 32, 32, 3)


def test_tiny_conv_encoder_shapes_and_trainable_flag():
    enc = TinyConvExpressionEncoder(feature_dim=F_EXPR, width=16)
    feats = enc(torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, 16, F_EXPR) and enc.trainable
    assert all(p.requires_grad for p in enc.parameters())
    assert enc(torch.rand(1, 3, 40, 40)).shape == (1, 16, F_EXPR)  # resized to 64 first
    frozen = EXPRESSION_ENCODERS.build(
        {"name": "tiny_conv", "init_args": {"feature_dim": 8, "trainable": False}}
    )
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training


def test_clip_vision_encoder_from_local_folder(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        ClipVisionExpressionEncoder(tmp_path / "missing")
    assert "model.expression_encoder.path" in str(err.value) and "config.json" in str(err.value)

    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    enc = ClipVisionExpressionEncoder(tmp_path / "clip")
    x = torch.rand(2, 3, 48, 48)
    feats = enc(x, mask=torch.ones(2, 1, 48, 48))
    assert feats.shape == (2, 17, 32) and enc.num_tokens == 17 and enc.feature_dim == 32
    assert not any(p.requires_grad for p in enc.parameters())
    ref = enc.model(
        pixel_values=(
            torch.nn.functional.interpolate(x, size=32, mode="bicubic", antialias=True).clamp(0, 1) - enc.mean
        )
        / enc.std,
        output_hidden_states=True,
    ).hidden_states[-2]
    torch.testing.assert_close(feats, ref)
    half = torch.ones(2, 1, 48, 48)
    half[..., 24:] = 0
    assert not torch.allclose(enc(x, mask=half), feats)


def test_init_image_strength_and_mask(pipe):
    """SDEdit start: a low strength stays near the init image's latents; with a mask, the latents
    outside it end exactly at the init image's."""
    init = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    init_latents = pipe.backbone.encode_images(init * 2 - 1, sample=False)
    free = pipe(_templates(0), id_embeds=ID, seed=3, **CALL)
    low = pipe(_templates(0), id_embeds=ID, seed=3, init_image=init, strength=0.2, **CALL)
    assert (low.latents - init_latents).abs().mean() < (free.latents - init_latents).abs().mean()
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    masked = pipe(_templates(0), id_embeds=ID, seed=3, init_image=init, strength=0.8, init_mask=mask, **CALL)
    keep = torch.nn.functional.interpolate(mask, size=init_latents.shape[-2:], mode="area") == 0
    keep = keep.expand_as(init_latents)
    assert torch.allclose(masked.latents[keep], init_latents[keep], atol=1e-5)
    assert not torch.allclose(masked.latents[~keep], init_latents[~keep], atol=1e-2)
    with pytest.raises(ValueError, match="strength"):
        pipe(_templates(0), id_embeds=ID, seed=3, init_image=init, strength=0.0, **CALL)
