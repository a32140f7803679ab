"""The IP-Adapter-FaceID baseline, loaded by diffusers from weight files in the released layout.

The files are built here at the packaged tiny backbone's size (cross-attention dim 64): an
SD1.5 folder (the packaged one) and FaceID weights with the key layout of
ip-adapter-faceid_sd15.bin (image_proj.proj.0/proj.2/norm; ip_adapter.{k}.to_{k,v}_ip.weight
numbered over the UNet's attention processors, cross-attention ones odd).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
from diffusers.utils import USE_PEFT_BACKEND
from jsonargparse import Namespace
from safetensors.torch import save_file

from benchmarks.evaluation.all_methods import METHODS
from benchmarks.evaluation.baselines.ip_adapter_faceid import IPAdapterFaceID, weight_keys
from benchmarks.evaluation.methods import EvalInputs, world_inputs
from benchmarks.evaluation.protocol import world_protocol
from emojidiff.errors import MissingWeightsError
from emojidiff.models.pipeline import load_sd_pipeline
from emojidiff.packaged import resolve_backbone

SD = resolve_backbone("emojidiff:tiny-sd15")
REPO = Path(__file__).resolve().parents[3]
IP_TYPES = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)
SAMPLING = {"steps": 2, "guidance": 3.0, "batch_size": 2}


def faceid_state(id_dim: int, seed: int = 0, lora: bool = False) -> dict[str, torch.Tensor]:
    """FaceID weights for the tiny UNet: image_proj (id_dim -> 2*id_dim -> 4 tokens x 64) and
    to_k_ip / to_v_ip of each cross-attention processor k (its index among all processors, the
    original IP-Adapter numbering), shaped like that layer's own to_k / to_v. `lora` adds the
    FaceID LoRA keys the released .bin carries (rank 4 on every processor)."""
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD / "unet"))
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def rand(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    state = {
        "image_proj.proj.0.weight": rand(2 * id_dim, id_dim),
        "image_proj.proj.0.bias": rand(2 * id_dim),
        "image_proj.proj.2.weight": rand(4 * cross, 2 * id_dim),
        "image_proj.proj.2.bias": rand(4 * cross),
        "image_proj.norm.weight": 1 + rand(cross),
        "image_proj.norm.bias": rand(cross),
    }
    for k, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            state[f"ip_adapter.{k}.to_k_ip.weight"] = rand(*attn.to_k.weight.shape, std=0.3)
            state[f"ip_adapter.{k}.to_v_ip.weight"] = rand(*attn.to_v.weight.shape, std=0.3)
        if lora:
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                layer = attn.to_out[0] if proj == "to_out" else getattr(attn, proj)
                state[f"ip_adapter.{k}.{proj}_lora.down.weight"] = rand(4, layer.in_features)
                state[f"ip_adapter.{k}.{proj}_lora.up.weight"] = rand(layer.out_features, 4)
    return state


def save_bin(state: dict[str, torch.Tensor], path: Path) -> Path:
    """The released .bin form: {"image_proj": {...}, "ip_adapter": {...}} saved by torch."""
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        part, rest = key.split(".", 1)
        nested[part][rest] = value
    torch.save(nested, path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("IP-Adapter-FaceID")
    state = faceid_state(id_dim=128)  # the packaged "world-id" encoder's embedding size
    save_file(state, folder / "faceid.safetensors")
    save_bin(state, folder / "faceid.bin")
    return folder, state


def build(folder: Path, **kwargs) -> IPAdapterFaceID:
    args = {
        "sd_folder": str(SD),
        "ip_adapter_folder": str(folder),
        "weight_name": "faceid.safetensors",
        "identity_encoder": "world-id",
        **SAMPLING,
        **kwargs,
    }
    return METHODS.build({"name": "ip-adapter-faceid", "init_args": args})


@pytest.fixture(scope="module")
def method(weights) -> IPAdapterFaceID:
    return build(weights[0])


@pytest.fixture(scope="module")
def inputs() -> EvalInputs:
    """Four rows: two references (A, A, B, B), each with two templates."""
    return world_inputs(world_protocol(2, 2, styles=("cel",)), 64)


def test_every_cross_attention_gets_the_files_ip_weights(method, weights):
    _, state = weights
    procs = method.pipe.unet.attn_processors
    cross = [(k, n) for k, n in enumerate(procs) if n.endswith("attn2.processor")]
    assert len(cross) == 7 and all(
        not isinstance(procs[n], IP_TYPES) for n in procs if n.endswith("attn1.processor")
    )
    for k, name in cross:
        proc = procs[name]
        assert isinstance(proc, IP_TYPES) and proc.scale == [1.0] and proc.num_tokens == [4]
        torch.testing.assert_close(
            proc.to_k_ip[0].weight, state[f"ip_adapter.{k}.to_k_ip.weight"], rtol=0, atol=0
        )
        torch.testing.assert_close(
            proc.to_v_ip[0].weight, state[f"ip_adapter.{k}.to_v_ip.weight"], rtol=0, atol=0
        )


def test_the_id_projection_is_the_faceid_mlp(method, weights):
    """Four tokens = LayerNorm(W2 gelu(W1 e + b1) + b2), reshaped (4, 64): FaceID's MLPProjModel."""
    _, s = weights
    e = F.normalize(torch.randn(3, 128, generator=torch.Generator().manual_seed(1)), dim=-1)
    h = F.gelu(e @ s["image_proj.proj.0.weight"].T + s["image_proj.proj.0.bias"])
    tokens = (h @ s["image_proj.proj.2.weight"].T + s["image_proj.proj.2.bias"]).reshape(3, 4, 64)
    expected = F.layer_norm(tokens, (64,), s["image_proj.norm.weight"], s["image_proj.norm.bias"])
    got = method.pipe.unet.encoder_hid_proj([e[:, None]])[0]  # (B, 1 image, 4 tokens, 64)
    torch.testing.assert_close(got[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_cfg_embeds_put_the_zero_identity_first(method):
    e = torch.randn(1, 128)
    (embeds,) = method.id_embeds(e)
    assert embeds.shape == (2, 1, 128) and not embeds[0].any() and torch.equal(embeds[1], e)
    with pytest.raises(ValueError, match="one identity per pipeline call"):
        method.id_embeds(torch.randn(2, 128))


def subset(inputs: EvalInputs, rows: list[int]) -> EvalInputs:
    return dataclasses.replace(
        inputs, rows=[inputs.rows[i] for i in rows], references=inputs.references[rows]
    )


def test_a_rows_image_depends_on_its_own_reference_prompt_and_seed_only(method, inputs):
    """Same inputs: the same images; a row alone or beside another identity: its image in the full
    run (diffusers repeats one call's id embeds for every prompt: mixing identities in a call
    would blend them, so the method must not)."""
    out = method.generate(inputs)
    assert out.images.shape == (4, 64, 64, 3) and out.images.dtype == np.uint8
    assert out.ok.all() and out.errors == [""] * 4 and out.images.std() > 5
    np.testing.assert_array_equal(method.generate(inputs).images, out.images)
    for rows in ([1], [1, 2], [3, 0]):
        part = method.generate(subset(inputs, rows)).images.astype(int)
        assert np.abs(part - out.images[rows]).max() <= 1, rows


def test_the_identity_embedding_drives_the_output(method, weights, inputs):
    """Scale 1: another reference changes the image. Scale 0 (from the .bin): it changes nothing,
    and the image is the plain SD pipeline's, so the adapter is the only way the identity enters."""
    swapped = dataclasses.replace(
        inputs, references=np.roll(inputs.references, 2, axis=0)
    )  # A A B B -> B B A A
    base = method.generate(inputs).images.astype(int)
    assert np.abs(method.generate(swapped).images - base).mean() > 2
    off = build(weights[0], weight_name="faceid.bin", scale=0.0)
    off_images = off.generate(inputs).images
    np.testing.assert_array_equal(off.generate(swapped).images, off_images)
    assert np.abs(off_images - base).mean() > 2
    pipe = load_sd_pipeline(SD, "ddim", torch.float32)
    plain = pipe(
        prompt=[r.prompt for r in inputs.rows],
        negative_prompt=[""] * 4,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="np",
        generator=[torch.Generator().manual_seed(r.seed) for r in inputs.rows],
    ).images
    assert np.abs((np.clip(plain, 0, 1) * 255).round() - off_images).max() <= 1


def test_a_reference_without_a_face_fails_its_row(tmp_path, tiny_recognition_onnx, inputs):
    """The real route: a 512-d ArcFace ONNX on arcface-112 crops. A photo's face is embedded;
    a world render at 64 px has no face dlib finds: that row fails with the reason, not dropped."""
    from PIL import Image
    from skimage.data import astronaut

    (tmp_path / "buffalo_l").mkdir()
    tiny_recognition_onnx(tmp_path / "buffalo_l" / "w600k_r50.onnx")
    save_file(faceid_state(id_dim=512, seed=2), tmp_path / "faceid512.safetensors")
    photo = np.asarray(
        Image.fromarray(astronaut()[73:181, 169:277]).resize((64, 64), Image.Resampling.LANCZOS)
    )
    two = dataclasses.replace(
        inputs, rows=inputs.rows[:2], references=np.stack([photo, inputs.references[1]])
    )
    method = build(
        tmp_path,
        weight_name="faceid512.safetensors",
        guidance=1.0,
        identity_encoder={
            "name": "insightface-arcface",
            "init_args": {"model_dir": str(tmp_path / "buffalo_l")},
        },
    )
    out = method.generate(two)
    assert out.ok.tolist() == [True, False] and out.errors == ["", "no face in the identity reference"]
    assert out.images[0].std() > 5 and not out.images[1].any()


def test_missing_weights_name_the_config_key(tmp_path, weights):
    folder, _ = weights
    key = "methods.<label>.init_args."
    cases = [
        ({"sd_folder": str(tmp_path / "nope")}, "sd_folder", "unet/diffusion_pytorch_model.safetensors"),
        ({"ip_adapter_folder": str(tmp_path)}, "ip_adapter_folder", "faceid.safetensors"),
        ({"subfolder": "models"}, "ip_adapter_folder", "models/faceid.safetensors"),
        ({"lora_weight_name": "lora.safetensors"}, "lora_weight_name", "lora.safetensors"),
        (
            {"identity_encoder": "insightface-arcface"},
            "identity_encoder.init_args.model_dir",
            "w600k_r50.onnx",
        ),
    ]
    for override, arg, expected in cases:
        with pytest.raises(MissingWeightsError) as err:
            build(folder, **override)
        assert err.value.key == key + arg and expected in err.value.expected, override


def test_an_adapter_file_that_is_not_faceid_is_refused(tmp_path):
    state = {
        "image_proj.proj.weight": torch.zeros(256, 32),
        "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 64),
    }
    save_file(state, tmp_path / "ip-adapter_sd15.safetensors")
    with pytest.raises(ValueError, match="not an IP-Adapter-FaceID file"):
        build(tmp_path, weight_name="ip-adapter_sd15.safetensors")


def test_bin_and_safetensors_hold_the_same_keys(weights):
    folder, state = weights
    assert weight_keys(folder / "faceid.bin") == weight_keys(folder / "faceid.safetensors") == set(state)


@pytest.mark.skipif(USE_PEFT_BACKEND, reason="peft is installed: the LoRA loads")
def test_a_lora_without_peft_is_an_error_naming_its_key(tmp_path, weights):
    save_file(faceid_state(id_dim=128, lora=True), tmp_path / "faceid_lora_inside.safetensors")
    with pytest.raises(RuntimeError, match=r"`methods\.<label>\.init_args\.weight_name`.*peft"):
        build(tmp_path, weight_name="faceid_lora_inside.safetensors")
    save_file(weights[1], tmp_path / "faceid.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, tmp_path / "lora.safetensors")
    with pytest.raises(RuntimeError, match=r"`methods\.<label>\.init_args\.lora_weight_name`.*peft"):
        build(tmp_path, lora_weight_name="lora.safetensors")
    with pytest.raises(ValueError, match="apply it twice"):
        build(tmp_path, weight_name="faceid_lora_inside.safetensors", lora_weight_name="lora.safetensors")
    skipped = build(tmp_path, weight_name="faceid_lora_inside.safetensors", require_lora=False)
    assert skipped.describe()["lora"] == "skipped (peft not installed)"
    assert isinstance(
        skipped.pipe.unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"],
        IP_TYPES,
    )


def test_the_real_data_example_config_parses_and_names_the_missing_folder():
    from benchmarks.evaluation.evaluate import make_parser

    config = make_parser().parse_args(["-c", str(REPO / "configs/eval/real_faceid.yaml")])
    spec = config.methods["ip-adapter-faceid"]
    spec = spec.as_dict() if isinstance(spec, Namespace) else spec
    assert spec["name"] == "ip-adapter-faceid" and config.sweep == {
        "ip-adapter-faceid": {"scale": [0.5, 0.75]}
    }
    assert not Path(spec["init_args"]["sd_folder"]).exists()  # a placeholder
    with pytest.raises(MissingWeightsError) as err:
        METHODS.build(spec)
    assert err.value.key == "methods.<label>.init_args.sd_folder" and "model_index.json" in err.value.expected
