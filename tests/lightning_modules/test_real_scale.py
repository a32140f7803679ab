"""Both stages at SD1.5 size on the CPU, through the real configs (`configs/sd15/` with the
architecture-only overlays of `configs/scale/`), and the cluster configs' data- and fully-sharded
parallel steps at that size over gloo. Slow (minutes, up to ~20 GB): `make test-all`."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_training_runs import (  # noqa: E402
    assert_ranks_trained_alike,
    cpu_cluster,
    fsdp_args,
    ok,
    run_cli,
    weights_probe,
)

from benchmarks.speed.scale import SCALE_IDENTITY  # noqa: E402
from data_gen.world_triplets import write_world_triplets  # noqa: E402
from emojidiff.models.bundle import read_spec  # noqa: E402

pytestmark = pytest.mark.slow

SD15 = ["-c", "configs/sd15/decoupled.yaml", "-c", "configs/scale/decoupled.yaml"]
SD15_ICA = ["-c", "configs/sd15/ica.yaml", "-c", "configs/scale/ica.yaml"]


def cpu_run(out: Path, shards: str, px: int, steps: int = 1) -> list[str]:
    """The overrides a CPU run needs: its data (one-triplet batches at `px`), no validation, one process."""
    return [
        f"--data.init_args.train_shards={shards}",
        "--data.init_args.val_shards=null",
        f"--data.init_args.image_size={px}",
        "--data.init_args.batch_size=1",
        "--data.init_args.num_workers=0",
        f"--data.init_args.samples_per_epoch={steps}",
        "--data.init_args.shuffle_buffer=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out / 'logs'}",
        f"--model.init_args.export_dir={out / 'model'}",
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """World triplets with 512-d identity embeddings (what photo shards carry) at 64 px; the loader upscales."""
    folder = tmp_path_factory.mktemp("scale-shards")
    write_world_triplets(folder, n=4, shards=1, identity_encoder=SCALE_IDENTITY)
    return str(folder / "train-r1-*.tar")


def children_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def test_both_stages_run_at_sd15_size_through_the_real_configs(shards, tmp_path):
    stage1 = tmp_path / "stage1"
    ok(run_cli(["fit", *SD15, *cpu_run(stage1, shards, 256)], timeout=900))
    spec = read_spec(stage1 / "model")
    assert spec.backbone == "emojidiff:sd15-arch" and spec.expression_encoder["name"] == "clip"
    adapter = load_file(str(stage1 / "model" / "adapter" / "adapter.safetensors"))
    assert (
        sum(t.numel() for t in adapter.values()) > 50_000_000
    )  # 16 resampled tokens of ViT-H features, all layers
    ica = tmp_path / "ica"
    ok(
        run_cli(
            [
                "fit",
                *SD15_ICA,
                f"--model.init_args.model.init_args.folder={stage1 / 'model'}",
                *cpu_run(ica, shards, 256),
            ],
            timeout=900,
        )
    )
    record = json.loads((ica / "model" / "train_record.json").read_text())
    assert record["global_step"] == 1 and record["hparams"]["gradient_checkpointing"] is True
    assert read_spec(ica / "model").backbone == "emojidiff:sd15-arch"
    assert children_peak_gib() < 20  # one process of either stage fits this 24 GB machine


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_train_alike_at_sd15_size(shards, tmp_path, strategy):
    out = tmp_path / strategy
    # FSDP (torch's FSDP1) shards a model after each rank has built it whole in float32: two ranks of the
    # full stack (~9 GB each) plus the flattening overflow this 24 GB machine, so under FSDP the
    # 630M-parameter CLIP ViT-H expression encoder gives way to the small trainable tiny_conv; the
    # SD1.5 UNet, text encoder, VAE and ArcFace stay.
    cluster = (
        cpu_cluster("ddp")
        if strategy == "ddp"
        else [
            *fsdp_args(shard_backbone=True),
            "--model.init_args.model.init_args.expression_encoder=tiny_conv",
        ]
    )
    args = ["fit", *SD15, *cpu_run(out, shards, 128, steps=1), *cluster]
    args += ["--trainer.callbacks+", json.dumps(weights_probe(out / "w"))]
    ok(run_cli(args, timeout=1500))
    assert_ranks_trained_alike(out / "w")
    assert (out / "model" / "adapter" / "adapter.safetensors").is_file()
    if strategy == "fsdp":
        units = json.loads((out / "w" / "rank0.units.json").read_text())
        blocks = [u for u in units if u["module"].endswith(("Block2D", "Block2DCrossAttn"))]
        assert len(blocks) == 4 + 1 + 4 and all(u["strategy"] == "FULL_SHARD" for u in blocks)
        clip_layers = [u for u in units if u["module"] == "CLIPEncoderLayer"]
        assert len(clip_layers) == 12  # the text encoder's layers
        assert (
            torch.tensor([u["local"] for u in blocks]).sum() * 2
            <= torch.tensor([u["full"] for u in blocks]).sum() + 9
        )
