"""The diffusers export: plain diffusers loads it and draws what EmojiDiffPipeline draws.

The reference computations are diffusers' own: its IP-Adapter image projections built by its
loader from the exported state, its `IPAdapterAttnProcessor2_0`, its `StableDiffusionPipeline`.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from emojidiff.cli import main as cli
from emojidiff.images import to_tensor
from emojidiff.models.adapter import EAdapter, EAdapterConfig
from emojidiff.models.bundle import fresh_model, load_model
from emojidiff.models.diffusers_export import (
    EXPRESSION_FILE,
    IDENTITY_FILE,
    RECORD_FILE,
    NotExportableError,
    branch_layouts,
    export_diffusers,
    image_embeds,
    ip_adapter_image_embeds,
    ip_adapter_scales,
    ip_adapter_state,
)
from emojidiff.models.lora import add_unet_lora
from emojidiff.packaged import resolve_backbone
from emojidiff.world import Expression, Identity, render_batch
from emojidiff.world.masks import world_prior_mask

PACKAGED = "emojidiff:emojidiff-world"
STEPS = 12
# Measured: 30 DDIM steps of the packaged model differ by at most 1 (of 255) in one pixel channel,
# mean 8e-5 (the two guidance formulas round differently); 12 steps likewise.
MAX_PIXEL_DIFF = 2


@pytest.fixture(scope="module")
def packaged():
    return load_model(PACKAGED)


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray]:
    out = render_batch(
        [Identity.sample(900_001), Identity.sample(900_002)],
        [Expression.sample(11), Expression.sample(12)],
        "shaded",
        size=64,
        seeds=[5, 6],
    )
    return out.images[0].numpy(), out.images[1].numpy()


def plain_pipeline(backbone: str | Path, export: Path, lora: bool = False) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_backbone(str(backbone)),
        torch_dtype=torch.float32,  # the packaged base is stored in fp16
        local_files_only=True,
        use_safetensors=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(export),
        subfolder="",
        weight_name=[IDENTITY_FILE, EXPRESSION_FILE],
        image_encoder_folder=None,
        local_files_only=True,
    )
    if lora:
        pipe.load_lora_weights(str(export), weight_name="pytorch_lora_weights.safetensors")
    pipe.set_ip_adapter_scale(json.loads((export / RECORD_FILE).read_text())["ip_adapter_scales"])
    return pipe


def both_outputs(model, export: Path, ref: np.ndarray, tmpl: np.ndarray, lora: bool = False):
    """(EmojiDiffPipeline's uint8 image, plain diffusers' uint8 image) for one pair, seed 0."""
    mask = torch.from_numpy(world_prior_mask(64))[None, None]
    ours = model.pipeline(
        to_tensor(tmpl[None]),
        id_image=to_tensor(ref[None]),
        expr_mask=mask,
        prompt=model.spec.default_prompt,
        guidance_scale=5.0,
        num_inference_steps=STEPS,
        seed=0,
    ).images[0]
    embeds = image_embeds(model, ref, tmpl)  # masks as the model's mask_from ("world") says
    pipe = plain_pipeline(model.spec.backbone, export, lora)
    theirs = pipe(
        model.spec.default_prompt,
        ip_adapter_image_embeds=embeds,
        guidance_scale=5.0,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    return ours, (theirs * 255).round().astype(np.uint8)


def test_plain_diffusers_draws_what_emojidiff_draws(packaged, inputs, tmp_path):
    export_diffusers(packaged, tmp_path / "export")
    ours, theirs = both_outputs(packaged, tmp_path / "export", *inputs)
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= MAX_PIXEL_DIFF
    # and the adapters matter: without them the same seed draws something else
    pipe = plain_pipeline(packaged.spec.backbone, tmp_path / "export")
    pipe.set_ip_adapter_scale([0.0, 0.0])
    plain = pipe(
        packaged.spec.default_prompt,
        ip_adapter_image_embeds=image_embeds(packaged, *inputs),
        guidance_scale=5.0,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert np.abs((plain * 255).round() - ours).mean() > 5


def test_lora_travels_in_diffusers_layout(inputs, tmp_path):
    model = fresh_model(seed=3)
    unet = model.pipeline.backbone.unet
    add_unet_lora(unet, {"rank": 4})
    torch.manual_seed(1)
    with torch.no_grad():  # a LoRA starts at B = 0: give it weights that change the output
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    folder = model.save(tmp_path / "model")
    model = load_model(folder)
    record = export_diffusers(model, tmp_path / "export")
    assert "pytorch_lora_weights.safetensors" in record["files"]
    ours, theirs = both_outputs(model, tmp_path / "export", *inputs, lora=True)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= MAX_PIXEL_DIFF
    _, without_lora = both_outputs(model, tmp_path / "export", *inputs, lora=False)
    assert np.abs(ours.astype(int) - without_lora.astype(int)).mean() > 1  # the LoRA mattered


def _diffusers_tokens(unet, state: dict[str, torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
    """Diffusers' image projection, built by its own loader from the exported keys, on `embeds`
    (B, images, channels) -> (B, tokens, C), as its attention processors read them."""
    proj = unet._convert_ip_adapter_image_proj_to_diffusers(
        {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
    )
    b, n = embeds.shape[:2]
    out = proj(embeds.reshape(b * n, -1))
    return out.reshape(b, -1, out.shape[-1])


@pytest.mark.parametrize(
    ("depth", "id_hidden", "tolerance"),
    [(0, None, 0.0), (-1, None, 0.0), (2, None, 2e-5), (0, 200, 0.0)],
    ids=["pooled-mlp", "per-token", "resampler", "odd-hidden-width"],
)
def test_each_projection_layout_gives_the_adapters_tokens(depth, id_hidden, tolerance):
    backbone = fresh_model(seed=0).pipeline.backbone
    config = EAdapterConfig(
        id_embed_dim=128,
        expr_feature_dim=48,
        num_expr_tokens=6,
        expr_resampler_depth=depth,
        id_hidden_dim=id_hidden,
    )
    torch.manual_seed(0)
    adapter = EAdapter(config, backbone.unet)
    with torch.no_grad():
        for p in adapter.parameters():  # LayerNorms and biases away from their initial values too
            p.add_(torch.randn_like(p) * 0.1)
    id_embeds = torch.nn.functional.normalize(torch.randn(3, 128), dim=-1)
    feats = torch.randn(3, 6, 48)
    tokens = adapter.encode_conditions(id_embeds, feats)
    n_id = config.num_id_tokens
    embeds = ip_adapter_image_embeds(adapter, id_embeds, feats, guidance=False)
    unet = backbone.unet
    for branch, got, want in (
        ("identity", embeds[0], tokens[:, :n_id]),
        ("expression", embeds[1], tokens[:, n_id:]),
    ):
        theirs = _diffusers_tokens(unet, ip_adapter_state(adapter, branch), got)
        torch.testing.assert_close(theirs, want, atol=tolerance + 1e-6, rtol=0)
    layout = branch_layouts(adapter)
    assert layout["identity"].layout == ("embedding" if id_hidden is None else "first_linear")
    assert layout["expression"].layout == ("tokens" if depth > 0 else "first_linear")


def test_block_scales_are_zero_outside_the_expression_layers(packaged, tmp_path):
    adapter = packaged.pipeline.adapter
    scales = ip_adapter_scales(adapter, expr_scale=0.7)
    assert scales[0] == 1.0  # identity: every layer
    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_backbone(packaged.spec.backbone),
        local_files_only=True,
        safety_checker=None,
        torch_dtype=torch.float32,
    )
    export_diffusers(packaged, tmp_path)
    pipe.load_ip_adapter(
        str(tmp_path), subfolder="", weight_name=[IDENTITY_FILE, EXPRESSION_FILE], image_encoder_folder=None
    )
    pipe.set_ip_adapter_scale(scales)
    expression_layers = set(adapter.expression_layers())
    cross = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]
    assert {n for n in cross if pipe.unet.attn_processors[n].scale[1] == 0.7} == expression_layers
    assert all(pipe.unet.attn_processors[n].scale[1] == 0.0 for n in cross if n not in expression_layers)
    # a layer without the branch also gets zero K/V, so even a uniform scale adds nothing there
    state = ip_adapter_state(adapter, "expression")
    for i, name in enumerate(adapter.processors()):
        if name not in expression_layers:
            assert not state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"].any()


def test_spatial_identity_tokens_are_refused_before_writing(tmp_path):
    model = fresh_model(adapter_config={"num_id_feature_tokens": 16, "id_feature_dim": 128})
    with pytest.raises(NotExportableError, match="spatial feature tokens"):
        export_diffusers(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def export_cli(out: Path, *extra: str) -> int:
    return cli(["export", "--format", "diffusers", "--model", PACKAGED, "--out", str(out), *extra])


def test_the_model_cards_code_runs_as_written(packaged, tmp_path, monkeypatch):
    out = tmp_path / "export"
    assert export_cli(out, "--results", "docs/results/table.csv", "--method", "emojidiff") == 0
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "diffusers" and front["base_model"] == "emojidiff:tiny-sd15"
    with open("docs/results/table.csv", newline="") as f:  # the card's cell, from the table itself
        row = next(
            r
            for r in csv.DictReader(f)
            if (r["style"], r["method"], r["metric"]) == ("all", "emojidiff", "identity_similarity")
        )
    mean, low, high = (float(row[k]) for k in ("mean", "ci_low", "ci_high"))
    assert f"| identity similarity | {mean:.3f} | [{low:.3f}, {high:.3f}] | 144 | higher |" in card
    blocks = card.split("```python\n")[1:]
    assert len(blocks) == 1
    code = blocks[0].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    image = np.asarray(Image.open(tmp_path / "emojidiff_diffusers.png"))
    assert image.shape == (64, 64, 3) and image.std() > 10


def test_export_options_name_what_is_missing(tmp_path, capsys):
    assert cli(["export", "--out", str(tmp_path)]) == 2  # the default format exports a checkpoint
    assert "--ckpt" in capsys.readouterr().err
    assert cli(["export", "--format", "diffusers", "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    assert export_cli(tmp_path, "--results", "x.csv") == 2
    assert "--results and --method" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
