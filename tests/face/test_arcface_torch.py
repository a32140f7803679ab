"""PyTorch IResNet ArcFace encoder: insightface layout, strict loading, preprocessing, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import emojidiff.face as face
from emojidiff.errors import MissingWeightsError
from emojidiff.face.arcface_torch import ArcFaceTorchEncoder, build_iresnet


def random_state(arch: str = "iresnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised backbone state with non-trivial BN statistics."""
    torch.manual_seed(seed)
    net = build_iresnet(arch)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    state = random_state()
    path = tmp_path_factory.mktemp("arcface") / "backbone.pth"
    torch.save(state, path)
    return str(path), state


def test_layout_matches_insightface_iresnet():
    """Parameter counts and key names of insightface's arcface_torch backbones."""
    counts = {"iresnet18": 24.03e6, "iresnet50": 43.59e6, "iresnet100": 65.16e6}
    for arch, expected in counts.items():
        net = build_iresnet(arch)
        assert abs(sum(p.numel() for p in net.parameters()) - expected) < 0.01e6
    keys = build_iresnet("iresnet50").state_dict()
    for key in (
        "conv1.weight",
        "prelu.weight",
        "layer1.0.downsample.0.weight",
        "layer3.13.bn3.running_var",
        "bn2.weight",
        "features.running_mean",
    ):
        assert key in keys
    assert keys["fc.weight"].shape == (512, 512 * 7 * 7)
    assert "layer3.14.bn1.weight" not in keys


def test_loads_and_matches_manual_preprocessing(r18_file):
    path, state = r18_file
    enc = face.build_identity_encoder(
        {"name": "arcface-torch", "init_args": {"weights": path, "arch": "iresnet18"}}
    )
    assert (enc.embedding_dim, enc.input_size, enc.aligner_name, enc.differentiable) == (
        512,
        112,
        "arcface-112",
        True,
    )
    x = torch.rand(3, 3, 112, 112)
    emb = enc(x)
    assert emb.shape == (3, 512) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    ref_net = build_iresnet("iresnet18")
    ref_net.load_state_dict(state)
    ref_net.eval()
    with torch.no_grad():
        ref = F.normalize(ref_net((x - 0.5) / 0.5), dim=1)
    torch.testing.assert_close(emb.detach(), ref, atol=1e-5, rtol=1e-4)
    # a different normalisation would not match
    with torch.no_grad():
        wrong = F.normalize(ref_net(x), dim=1)
    assert (emb.detach() - wrong).abs().max() > 1e-3


def test_gradients_reach_the_pixels_but_not_the_frozen_net(r18_file):
    enc = ArcFaceTorchEncoder(weights=r18_file[0], arch="iresnet18")
    enc.train()  # as inside a LightningModule in training mode
    assert not enc.net.training
    x = torch.rand(2, 3, 128, 128, requires_grad=True)  # resized to 112 inside
    target = F.normalize(torch.randn(2, 512), dim=1)
    loss = (1 - enc.similarity(enc(x), target)).mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())
    # eval-mode BN: the embedding of one image does not depend on the rest of the batch
    with torch.no_grad():
        torch.testing.assert_close(enc(x[:1]), enc(x)[:1], atol=1e-5, rtol=1e-4)


def test_safetensors_and_ddp_prefixed_weights(tmp_path, r18_file):
    _, state = r18_file
    save_file(state, str(tmp_path / "r18.safetensors"))
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    x = torch.rand(1, 3, 112, 112)
    a = ArcFaceTorchEncoder(tmp_path / "r18.safetensors", arch="iresnet18")(x)
    b = ArcFaceTorchEncoder(tmp_path / "ddp.pth", arch="iresnet18")(x)
    torch.testing.assert_close(a, b)


def test_strict_key_check_names_the_problem(r18_file, tmp_path):
    with pytest.raises(ValueError, match=r"look like 'iresnet18'.*missing keys"):
        ArcFaceTorchEncoder(r18_file[0], arch="iresnet34")
    partial = dict(r18_file[1])
    partial.pop("fc.weight")
    partial["head.kernel"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(
        ValueError, match=r"missing keys \(1\): fc.weight.*unexpected keys \(1\): head.kernel"
    ):
        ArcFaceTorchEncoder(tmp_path / "partial.pth", arch="iresnet18")


def test_missing_weights_name_the_key(tmp_path):
    with pytest.raises(MissingWeightsError, match="`weights` is not set") as info:
        face.build_identity_encoder("arcface-torch")
    assert info.value.key == "weights"
    with pytest.raises(MissingWeightsError, match="glint360k_r50.pth"):
        ArcFaceTorchEncoder(tmp_path / "glint360k_r50.pth")
    with pytest.raises(KeyError, match="unknown IResNet arch"):
        build_iresnet("iresnet7")
