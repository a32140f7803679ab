"""Spatial identity tokens: the identity encoder's feature map beside its pooled embedding."""

from __future__ import annotations

import pytest
import torch

from emojidiff.models.bundle import build_identity_encoder, fresh_model, load_model
from emojidiff.world import Expression, Identity, render_batch

ADAPTER = {"num_id_tokens": 2, "num_expr_tokens": 4, "num_id_feature_tokens": 16}
EXPR = {"name": "tiny-conv", "init_args": {"feature_dim": 32, "width": 16}}
CALL = dict(prompt="a portrait", num_inference_steps=2, seed=5)


def _portraits(identities: list[int]) -> torch.Tensor:
    out = render_batch(
        [Identity.sample(i) for i in identities], [Expression.sample(0)] * len(identities), "shaded", 64, 0
    )
    return out.images.permute(0, 3, 1, 2).float() / 255


def test_token_features_are_the_last_stage_map_cell_by_cell():
    enc = build_identity_encoder("world-id")
    x = _portraits([1, 2])
    feats = enc.token_features(x)
    fmap = enc.net.features(enc.net.prepare(x))  # by hand: the conv trunk's output, (B, C, 4, 4)
    assert feats.shape == (2, enc.num_token_features, enc.token_feature_dim) == (2, 16, 128)
    torch.testing.assert_close(feats[:, 5], fmap[:, :, 1, 1])  # row-major: cell (1, 1) is token 1 * 4 + 1


@pytest.fixture(scope="module")
def model():
    m = fresh_model("emojidiff:tiny-sd15", "world-id", EXPR, ADAPTER, seed=0)
    with torch.no_grad():  # a fresh LayerNorm'd projection: make the feature tokens matter visibly
        m.pipeline.adapter.id_feature_proj.proj[2].weight.mul_(20)
    return m


def test_the_adapter_takes_n_global_plus_l_spatial_identity_tokens(model):
    ad = model.pipeline.adapter
    enc = model.pipeline.identity_encoder
    x = _portraits([1, 2])
    emb, feats = enc(x), enc.token_features(x)
    tokens = ad.encode_conditions(emb, torch.zeros(2, 1, 32), id_features=feats)
    assert tokens.shape == (2, 2 + 16 + 4, ad.config.cross_attention_dim)
    swapped = ad.encode_conditions(emb, torch.zeros(2, 1, 32), id_features=feats.flip(0))
    assert torch.equal(tokens[:, :2], swapped[:, :2]) and not torch.allclose(
        tokens[:, 2:18], swapped[:, 2:18]
    )
    null = ad.encode_conditions(emb, torch.zeros(2, 1, 32), drop_id=True, id_features=feats)
    torch.testing.assert_close(null[:, 2:18], ad.encode_conditions(None, torch.zeros(2, 1, 32))[:, 2:18])


def test_the_pipeline_reads_the_reference_image_and_asks_for_it_by_name(model, tmp_path):
    pipe = model.pipeline
    refs, tmpl = _portraits([1, 2]), _portraits([3])
    emb = pipe.identity_encoder(refs[:1])
    a = pipe(tmpl, id_embeds=emb, id_image=refs[:1], **CALL).images
    b = pipe(tmpl, id_embeds=emb, id_image=refs[1:], **CALL).images  # same embedding, other reference image
    assert abs(a.astype(int) - b.astype(int)).mean() > 0.5
    with pytest.raises(ValueError, match="pass id_image"):
        pipe(tmpl, id_embeds=emb, **CALL)
    again = (
        load_model(model.save(tmp_path / "m")).pipeline(tmpl, id_embeds=emb, id_image=refs[:1], **CALL).images
    )
    assert (again == a).all()
