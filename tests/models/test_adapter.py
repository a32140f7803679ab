"""EAdapter: layer selection, frozen backbone, scale-0 equivalence, save/load, CFG null tokens."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file

from emojidiff.errors import MissingWeightsError
from emojidiff.models import (
    AdapterLoadError,
    EAdapter,
    EAdapterConfig,
    EmojiDiffAttnProcessor,
    cross_attention_layers,
)
from emojidiff.models.tiny import LATENT_CHANNELS, build_tiny_backbone

B, D_ID, F_EXPR = 2, 16, 24
EXPR_PATTERN = "up_blocks.1.attentions.*.transformer_blocks.*.attn2.processor"


def _config(**kw) -> EAdapterConfig:
    base = dict(
        id_embed_dim=D_ID,
        num_id_tokens=2,
        num_expr_tokens=3,
        expr_feature_dim=F_EXPR,
        expr_layers=[EXPR_PATTERN],
    )
    return EAdapterConfig(**{**base, **kw})


def _inputs(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = bb.encode_prompt(["a smiling man", "a sad woman"], 32, 32)
    return dict(
        lat=torch.randn(B, LATENT_CHANNELS, 8, 8, generator=g),
        t=torch.tensor([10, 700]),
        text=cond["encoder_hidden_states"],
        added=cond["added_cond_kwargs"],
        id_embeds=torch.randn(B, D_ID, generator=g),
        expr=torch.randn(B, 5, F_EXPR, generator=g),
    )


def _run(bb, adapter, x, **kw):
    tokens = adapter.encode_conditions(x["id_embeds"], x["expr"], **kw)
    ehs = adapter.build_encoder_hidden_states(x["text"], tokens)
    return bb.unet(x["lat"], x["t"], encoder_hidden_states=ehs, added_cond_kwargs=x["added"]).sample


def _plain(bb, x):
    return bb.unet(x["lat"], x["t"], encoder_hidden_states=x["text"], added_cond_kwargs=x["added"]).sample


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_backbone("sd15", seed=0)


def test_expression_branch_exactly_in_configured_layers(sd15):
    unet = sd15.unet
    adapter = EAdapter(_config(), unet).attach(unet)
    try:
        cross = list(cross_attention_layers(unet))
        expected_expr = [n for n in cross if n.startswith("up_blocks.1.")]
        assert len(expected_expr) == 2 and adapter.expression_layers() == expected_expr
        assert adapter.identity_layers() == cross  # id branch: all cross-attention layers by default
        for name, proc in unet.attn_processors.items():
            if name in cross:
                assert isinstance(proc, EmojiDiffAttnProcessor)
                assert proc.has_expr == (name in expected_expr) == hasattr(proc, "to_k_expr")
                assert proc.has_id and hasattr(proc, "to_k_id")
            else:  # self-attention keeps the plain processor
                assert name.endswith("attn1.processor") and isinstance(proc, AttnProcessor2_0)
        assert not any(
            "_expr" in k and "up_blocks__1" not in k for k in adapter.state_dict() if k.startswith("layers.")
        )
    finally:
        adapter.detach(unet)


def test_layer_selection_by_short_names_and_id_subset(sd15):
    cfg = _config(
        expr_layers=["mid_block.attentions.0.transformer_blocks.0.attn2"], id_layers=["down_blocks.*"]
    )
    adapter = EAdapter(cfg, sd15.unet)
    assert adapter.expression_layers() == ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    assert all(n.startswith("down_blocks.") for n in adapter.identity_layers())
    assert len(adapter.identity_layers()) == 2


@pytest.mark.parametrize(
    "pattern", ["up_blocks.9.*", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"]
)
def test_pattern_matching_nothing_lists_available_layers(sd15, pattern):
    with pytest.raises(ValueError) as err:
        EAdapter(_config(expr_layers=[pattern]), sd15.unet)
    assert pattern in str(err.value)
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor" in str(err.value)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_zero_scales_reproduce_plain_unet_and_detach_restores(kind):
    bb = build_tiny_backbone(kind, seed=1)
    x = _inputs(bb)
    with torch.no_grad():
        plain = _plain(bb, x)
        adapter = EAdapter(_config(expr_layers="all"), bb.unet).attach(bb.unet)
        adapted = _run(bb, adapter, x)
        adapter.set_scales(id_scale=0.0, expr_scale=0.0)
        zero = _run(bb, adapter, x)
        adapter.set_scales(id_scale=0.0, expr_scale=1.0)
        expr_only = _run(bb, adapter, x)
        adapter.detach(bb.unet)
        after = _plain(bb, x)
    assert torch.allclose(zero, plain, atol=1e-6, rtol=0)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    assert not torch.allclose(expr_only, plain, atol=1e-3)
    assert torch.equal(after, plain)
    assert {type(p) for p in bb.unet.attn_processors.values()} == {AttnProcessor2_0}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_gradients_reach_only_adapter_and_backbone_stays_bit_identical(kind):
    bb = build_tiny_backbone(kind, seed=2)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    adapter = EAdapter(_config(), bb.unet).attach(bb.unet)
    params = adapter.trainable_parameters()
    assert params and len(params) == len(list(adapter.parameters()))
    adapter_before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = _inputs(bb)
    loss = _run(bb, adapter, x).square().mean()
    loss.backward()
    opt.step()

    adapter_ids = {id(p) for p in adapter.parameters()}
    for name, p in bb.named_parameters():
        if id(p) in adapter_ids:
            continue
        assert p.grad is None and not p.requires_grad, name
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(not torch.equal(p, b) for p, b in zip(params, adapter_before, strict=True))
    adapter.detach(bb.unet)
    after = bb.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_gradient_checkpointing_keeps_adapter_gradients():
    bb = build_tiny_backbone("sd15", seed=4)
    adapter = EAdapter(_config(), bb.unet).attach(bb.unet)
    x = _inputs(bb)
    grads = []
    for ckpt in (False, True):
        if ckpt:
            bb.unet.enable_gradient_checkpointing()
        adapter.zero_grad()
        _run(bb, adapter, x).square().mean().backward()
        grads.append([p.grad.clone() for p in adapter.trainable_parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_save_load_identical_outputs(sd15, tmp_path):
    adapter = EAdapter(_config(id_scale=0.8, expr_scale=1.5), sd15.unet)
    torch.manual_seed(0)
    for p in adapter.parameters():  # move away from the init so a fresh adapter would differ
        p.data.add_(torch.randn_like(p) * 0.05)
    x = _inputs(sd15)
    adapter.attach(sd15.unet)
    with torch.no_grad():
        ref = _run(sd15, adapter, x)
    adapter.detach(sd15.unet)
    folder = adapter.save(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert all(
        k.startswith(("id_proj.", "expr_proj.", "layers.")) for k in load_file(folder / "adapter.safetensors")
    )

    fresh_unet = build_tiny_backbone("sd15", seed=0)
    loaded = EAdapter.load(folder, unet=fresh_unet.unet)
    assert loaded.is_attached(fresh_unet.unet)
    assert loaded.expression_layers() == adapter.expression_layers()
    assert (loaded.config.id_scale, loaded.config.expr_scale) == (0.8, 1.5)
    with torch.no_grad():
        out = _run(fresh_unet, loaded, x)
    assert torch.equal(out, ref)


def test_load_errors_name_keys_and_layers(sd15, tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        EAdapter.load(tmp_path / "none")
    assert "model.adapter.path" in str(err.value) and "adapter.safetensors" in str(err.value)

    folder = EAdapter(_config(), sd15.unet).save(tmp_path / "a")
    state = load_file(folder / "adapter.safetensors")
    bad_key = "layers.up_blocks__1__attentions__0__transformer_blocks__0__attn2__processor.to_k_expr.weight"
    state["bogus.weight"] = state.pop(bad_key)
    shape_key = "id_proj.norm.weight"
    state[shape_key] = torch.zeros(3)
    save_file(state, folder / "adapter.safetensors")
    with pytest.raises(AdapterLoadError) as err:
        EAdapter.load(folder)
    msg = str(err.value)
    assert f"missing: {bad_key}" in msg and "unexpected: bogus.weight" in msg and f"shape: {shape_key}" in msg

    # an adapter for the sd15 UNet does not fit the sdxl UNet
    folder = EAdapter(_config(expr_layers="all"), sd15.unet).save(tmp_path / "b")
    xl = build_tiny_backbone("sdxl")
    with pytest.raises(AdapterLoadError) as err:
        EAdapter.load(folder, unet=xl.unet)
    assert (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor: not a cross-attention layer"
        in str(err.value)
    )
    assert "cross_attention_dim" in str(err.value)
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["config"]["cross_attention_dim"] == 64


def test_null_conditions_are_zero_inputs(sd15):
    adapter = EAdapter(_config(), sd15.unet)
    x = _inputs(sd15)
    tokens = adapter.encode_conditions(x["id_embeds"], x["expr"])
    assert tokens.shape == (B, 2 + 3, 64)
    drop = torch.tensor([True, False])
    dropped = adapter.encode_conditions(x["id_embeds"], x["expr"], drop_id=drop, drop_expr=True)
    null = adapter.encode_conditions(torch.zeros(B, D_ID), torch.zeros_like(x["expr"]))
    assert torch.equal(dropped[0, :2], null[0, :2]) and torch.equal(dropped[1, :2], tokens[1, :2])
    assert torch.allclose(dropped[:, 2:], null[:, 2:])
    assert torch.allclose(adapter.encode_conditions(None, x["expr"])[:, :2], null[:, :2])  # None = null id
    pooled = adapter.encode_conditions(x["id_embeds"], x["expr"].mean(1))  # (B, F) features work too
    assert pooled.shape == tokens.shape
    ehs = adapter.build_encoder_hidden_states(x["text"][:1], tokens)
    assert ehs.shape == (B, x["text"].shape[1] + 5, 64)


def test_per_token_expression_projection_keeps_each_token_its_own():
    """depth=-1: token i of the output depends on feature token i only (a spatial grid keeps its layout)."""
    from emojidiff.models.projections import ExpressionProjection

    proj = ExpressionProjection(feature_dim=8, cross_attention_dim=16, num_tokens=4, depth=-1)
    x = torch.randn(2, 4, 8)
    y = x.clone()
    y[:, 2] += 1.0
    a, b = proj(x), proj(y)
    assert a.shape == (2, 4, 16)
    changed = (a - b).abs().amax(dim=(0, 2))
    assert changed[2] > 1e-3 and torch.all(changed[[0, 1, 3]] == 0)
    with pytest.raises(ValueError, match="3 feature tokens, 4 expected"):
        proj(torch.randn(2, 3, 8))


def test_attached_processors_belong_to_the_adapter_alone(sd15):
    """The UNet calls the adapter's processors, but their weights have one name: the adapter's (FSDP's
    units and state dicts need that); detaching restores diffusers' layout."""
    unet = sd15.unet
    before = set(unet.state_dict())
    adapter = EAdapter(_config(), unet).attach(unet)
    try:
        assert set(unet.state_dict()) == before  # no adapter weight under the UNet's names
        unet_params = {id(p) for p in unet.parameters()}
        assert not any(id(p) in unet_params for p in adapter.parameters())
        assert {id(p) for p in unet.attn_processors.values()} >= {id(p) for p in adapter.layers.values()}
        with pytest.raises(RuntimeError, match="detach it first"):
            sd15.set_attention("eager")
    finally:
        adapter.detach(unet)
    assert not any(isinstance(p, EmojiDiffAttnProcessor) for p in unet.attn_processors.values())
    sd15.set_attention("sdpa")  # allowed again once detached
