"""The packaged trained model (`emojidiff:emojidiff-world`, `make package`): fp16 safetensors that
match their record, load by name, carry the expression they were trained to transfer, and
`emojidiff package` writes such a copy of any model folder."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from emojidiff.commands.package import package_model
from emojidiff.face import build_expression_analyser, build_identity_encoder
from emojidiff.face.analyse import describe_expressions, embed_identities
from emojidiff.images import to_tensor
from emojidiff.models.bundle import fresh_model, load_model, save_model
from emojidiff.packaged import DEFAULT_MODEL, PACKAGED_MODELS, resolve_model
from emojidiff.splits import HELD_OUT_SEED_OFFSET, TEST_IDENTITIES
from emojidiff.world import Expression, Identity, render_batch

FOLDER = PACKAGED_MODELS["emojidiff-world"]


def test_packaged_model_files_are_fp16_and_match_their_record():
    record = json.loads((FOLDER / "package_record.json").read_text())
    files = sorted(str(p.relative_to(FOLDER)) for p in FOLDER.rglob("*.safetensors"))
    assert files == sorted(record["files"]) and files
    for rel in files:
        path = FOLDER / rel
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["files"][rel]["sha256"], rel
        with safe_open(str(path), "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} <= {"F16", "I64"}, rel
    assert sum((FOLDER / f).stat().st_size for f in files) < 4 * 2**20
    spec = json.loads((FOLDER / "emojidiff_model.json").read_text())
    assert spec["backbone"].startswith("emojidiff:")  # no path outside the package


def test_packaged_model_loads_by_name_and_beats_a_fresh_adapter_on_identity_and_expression():
    """The trained model, not a fresh adapter: on held-out people, outputs look more like the
    reference person (evaluation identity encoder, cosine; strangers ~0.08) and wear the template's
    expression closer (training analyser; unrelated ~0.4) than a fresh adapter's outputs do."""
    assert resolve_model(DEFAULT_MODEL) == FOLDER
    model = load_model(DEFAULT_MODEL)
    assert not model.untrained and model.pipeline.adapter.expression_layers()
    n = 8
    exprs = [Expression.sample(HELD_OUT_SEED_OFFSET + k) for k in range(n)]
    tmpl = render_batch(
        [Identity.sample(TEST_IDENTITIES[0] + 900_000 + k) for k in range(n)],
        exprs,
        "shaded",
        64,
        [HELD_OUT_SEED_OFFSET + k for k in range(n)],
    )
    refs = render_batch(
        [Identity.sample(TEST_IDENTITIES[0] + 900_100 + k) for k in range(n)],
        [Expression.preset("neutral")] * n,
        "shaded",
        64,
        [HELD_OUT_SEED_OFFSET + 50 + k for k in range(n)],
    )
    analyser = build_expression_analyser("world-expr")
    id_encoder = build_identity_encoder("world-id-eval")
    target = describe_expressions(analyser, list(tmpl.images.numpy()), [f"t{k}" for k in range(n)])
    ref_emb = F.normalize(
        embed_identities(id_encoder, list(refs.images.numpy()), [f"r{k}" for k in range(n)]), dim=-1
    )

    def scores(m) -> tuple[float, float]:
        out = m.pipeline(
            to_tensor(tmpl.images.numpy()),
            id_image=to_tensor(refs.images.numpy()),
            expr_mask=tmpl.masks[:, None].float(),
            prompt="a portrait, realistic style",
            num_inference_steps=20,
            generator=[torch.Generator().manual_seed(k) for k in range(n)],
        ).images
        assert out.shape == (n, 64, 64, 3) and out.dtype == np.uint8
        names = [f"o{k}" for k in range(n)]
        desc = describe_expressions(analyser, list(out), names)
        emb = F.normalize(embed_identities(id_encoder, list(out), names), dim=-1)
        return float((emb * ref_emb).sum(-1).mean()), float(analyser.distance(desc, target).mean())

    fresh = fresh_model(model.spec.backbone, model.spec.identity_encoder, model.spec.expression_encoder)
    (trained_id, trained_ex), (fresh_id, fresh_ex) = scores(model), scores(fresh)
    print(
        f"packaged: identity {trained_id:.3f} expression error {trained_ex:.3f}; fresh adapter: {fresh_id:.3f} {fresh_ex:.3f}"
    )
    assert trained_id > fresh_id + 0.1, (trained_id, fresh_id)
    assert trained_ex < fresh_ex - 0.05, (trained_ex, fresh_ex)


def test_package_writes_an_fp16_copy_that_generates_like_the_source(tmp_path):
    src = fresh_model("emojidiff:tiny-sd15", "world-id", "tiny_conv", seed=3)
    save_model(
        tmp_path / "src",
        backbone_path="emojidiff:tiny-sd15",
        adapter=src.pipeline.adapter,
        expression_encoder=src.pipeline.expression_encoder,
        expression_encoder_spec="tiny_conv",
        identity_encoder_spec="world-id",
        image_size=64,
    )
    out = package_model(tmp_path / "src", tmp_path / "copy")
    record = json.loads((out / "package_record.json").read_text())
    assert set(record["files"]) == {"adapter/adapter.safetensors", "expression_encoder.safetensors"}
    assert all(set(f["source_dtypes"]) == {"torch.float32"} for f in record["files"].values())
    a, b = load_model(tmp_path / "src"), load_model(out)
    x = torch.rand(2, 3, 64, 64)
    ea, eb = a.pipeline.expression_encoder(x), b.pipeline.expression_encoder(x)
    torch.testing.assert_close(eb, ea, atol=2e-2, rtol=2e-2)
    for (ka, va), (kb, vb) in zip(
        a.pipeline.adapter.state_dict().items(), b.pipeline.adapter.state_dict().items(), strict=True
    ):
        assert ka == kb and vb.dtype == torch.float32
        torch.testing.assert_close(vb, va.half().float())


def test_package_refuses_a_model_on_a_backbone_outside_the_package(tmp_path):
    src = fresh_model("emojidiff:tiny-sd15", "world-id", "world_expr_features")
    save_model(
        tmp_path / "m",
        backbone_path=tmp_path / "some-sd15",
        adapter=src.pipeline.adapter,
        expression_encoder=src.pipeline.expression_encoder,
        expression_encoder_spec="world_expr_features",
        identity_encoder_spec="world-id",
    )
    with pytest.raises(ValueError, match="not a packaged backbone"):
        package_model(tmp_path / "m", tmp_path / "copy")
    with pytest.raises(ValueError, match="emojidiff:emojidiff-world"):
        resolve_model("emojidiff:nope")
