"""EmojiDiffAttnProcessor against a hand-written reference and against AttnProcessor2_0."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from emojidiff.models.attention import EmojiDiffAttnProcessor

HIDDEN, CROSS, HEADS, N_ID, N_EXPR, T = 32, 24, 4, 3, 5, 7


@pytest.fixture()
def attn():
    torch.manual_seed(0)
    return Attention(
        query_dim=HIDDEN, cross_attention_dim=CROSS, heads=HEADS, dim_head=HIDDEN // HEADS
    ).eval()


def _inputs(b=2, length=10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, length, HIDDEN, generator=g)
    text = torch.randn(b, T, CROSS, generator=g)
    ids = torch.randn(b, N_ID, CROSS, generator=g)
    expr = torch.randn(b, N_EXPR, CROSS, generator=g)
    return x, text, ids, expr


def _attend(q, k, v):
    """Plain multi-head softmax attention: (B, L, H*d) x (B, K, H*d) -> (B, L, H*d)."""
    b, lq, _ = q.shape
    d = q.shape[-1] // HEADS
    q, k, v = (t.view(b, -1, HEADS, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, lq, HEADS * d)


def _processor(has_id=True, has_expr=True, **kw):
    proc = EmojiDiffAttnProcessor(HIDDEN, CROSS, N_ID, N_EXPR, has_id=has_id, has_expr=has_expr, **kw)
    torch.manual_seed(2)
    for p in proc.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return proc


@torch.no_grad()
def test_matches_decoupled_formula(attn):
    proc = _processor(id_scale=0.7, expr_scale=1.3)
    attn.set_processor(proc)
    x, text, ids, expr = _inputs()
    out = attn(x, encoder_hidden_states=torch.cat([text, ids, expr], dim=1))
    q = attn.to_q(x)
    ref = (
        _attend(q, attn.to_k(text), attn.to_v(text))
        + 0.7 * _attend(q, proc.to_k_id(ids), proc.to_v_id(ids))
        + 1.3 * _attend(q, proc.to_k_expr(expr), proc.to_v_expr(expr))
    )
    ref = attn.to_out[0](ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("has_id,has_expr", [(True, True), (True, False), (False, False)])
def test_zero_scales_equal_plain_attention(attn, has_id, has_expr):
    x, text, ids, expr = _inputs()
    attn.set_processor(AttnProcessor2_0())
    plain = attn(x, encoder_hidden_states=text)
    attn.set_processor(_processor(has_id, has_expr, id_scale=0.0, expr_scale=0.0))
    out = attn(x, encoder_hidden_states=torch.cat([text, ids, expr], dim=1))
    assert torch.equal(out, plain)
    # a layer without branches ignores the condition tokens whatever the scales
    if not has_id:
        attn.set_processor(_processor(False, False, id_scale=1.0, expr_scale=1.0))
        assert torch.equal(attn(x, encoder_hidden_states=torch.cat([text, ids, expr], dim=1)), plain)


@torch.no_grad()
def test_branch_changes_output_only_when_carried(attn):
    x, text, ids, expr = _inputs()
    attn.set_processor(_processor(has_id=True, has_expr=False))
    a = attn(x, encoder_hidden_states=torch.cat([text, ids, expr], dim=1))
    b = attn(x, encoder_hidden_states=torch.cat([text, ids, expr + 1.0], dim=1))
    c = attn(x, encoder_hidden_states=torch.cat([text, ids + 1.0, expr], dim=1))
    assert torch.equal(a, b)  # expr tokens unused in an id-only layer
    assert not torch.allclose(a, c)


def test_only_carried_branches_have_weights(attn):
    names = set(dict(_processor(has_id=True, has_expr=False).named_parameters()))
    assert names == {"to_k_id.weight", "to_v_id.weight"}
    names = set(dict(_processor(has_id=False, has_expr=True).named_parameters()))
    assert names == {"to_k_expr.weight", "to_v_expr.weight"}
    assert list(_processor(False, False).parameters()) == []


def test_init_from_copies_layer_kv(attn):
    proc = _processor().init_from(attn)
    for new, old in [(proc.to_k_id, attn.to_k), (proc.to_v_id, attn.to_v), (proc.to_k_expr, attn.to_k)]:
        assert torch.equal(new.weight, old.weight)
        assert new.weight.data_ptr() != old.weight.data_ptr()  # a copy, not shared storage
    wrong = EmojiDiffAttnProcessor(HIDDEN, CROSS + 1, N_ID, N_EXPR, True, False)
    with pytest.raises(ValueError, match="shape"):
        wrong.init_from(attn)


def test_too_few_tokens_is_a_clear_error(attn):
    attn.set_processor(_processor())
    x, text, _, _ = _inputs()
    with pytest.raises(ValueError, match="build_encoder_hidden_states"):
        attn(x, encoder_hidden_states=text[:, : N_ID + N_EXPR])


@torch.no_grad()
def test_4d_hidden_states_and_bf16_tokens(attn):
    attn.set_processor(_processor())
    x, text, ids, expr = _inputs(length=16)
    ehs = torch.cat([text, ids, expr], dim=1)
    flat = attn(x, encoder_hidden_states=ehs)
    spatial = attn(x.transpose(1, 2).reshape(2, HIDDEN, 4, 4), encoder_hidden_states=ehs)
    torch.testing.assert_close(spatial.flatten(2).transpose(1, 2), flat)
    for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out):
        layer.to(torch.bfloat16)  # a bf16 UNet layer with fp32 adapter K/V (mixed-precision training)
    assert attn.processor.to_k_id.weight.dtype == torch.float32
    out = attn(x.bfloat16(), encoder_hidden_states=ehs.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), flat, atol=0.1, rtol=0.05)
