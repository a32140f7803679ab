"""The training CLI end to end: `python -m emojidiff.cli fit` in child processes on a few world triplets.

A SIGKILLed run resumed with --ckpt_path reaches the uninterrupted run's weights exactly; two gloo
processes train under DDP (cluster/ddp.yaml) and split the shards; the export loads in a fresh
`generate` process and equals `emojidiff export` of the last checkpoint; ICA starts from stage 1's
export and carries its t_max through a resume; the SD1.5/SDXL configs parse and fail naming the
local path to set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from data_gen.world_triplets import write_world_triplets  # noqa: E402
from emojidiff.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
BATCH, SAMPLES_PER_EPOCH = 4, 8  # 2 steps per epoch on one process


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m emojidiff.cli ARGS` from the repository root, with this folder importable (the
    probes). Its own session, so a hung DDP run loses its rank-1 child too when the timeout kills."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "emojidiff.cli", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"emojidiff {' '.join(args)} ran past {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"rc {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def tiny_config(
    base: str,
    out: Path,
    shards: str,
    epochs: int,
    callbacks: Sequence[dict] = (),
    model: dict | None = None,
    data: dict | None = None,
    trainer: dict | None = None,
) -> Path:
    """configs/<base>.yaml on a few triplets, CPU, no validation, 2 steps per epoch; logs,
    checkpoints (every epoch end) and the export under `out`; `model` / `data` / `trainer` override
    init_args and trainer keys. Writes and returns out/config.yaml."""
    cfg = yaml.safe_load((ROOT / "configs" / f"{base}.yaml").read_text())
    t = cfg["trainer"]
    t.update(
        {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": epochs,
            "limit_val_batches": 0,
            "check_val_every_n_epoch": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            **(trainer or {}),
        }
    )
    t["logger"]["init_args"]["save_dir"] = str(out / "logs")
    (ckpt,) = [c for c in t["callbacks"] if c["class_path"] == CHECKPOINT]
    ckpt["init_args"].update(dirpath=str(out / "ckpt"), every_n_epochs=1)
    t["callbacks"] += list(callbacks)
    cfg["model"]["init_args"].update({"export_dir": str(out / "model"), "val_steps": 2, **(model or {})})
    cfg["data"]["init_args"].update(
        {
            "train_shards": shards,
            "val_shards": None,
            "batch_size": BATCH,
            "num_workers": 0,
            "resampled": True,
            "samples_per_epoch": SAMPLES_PER_EPOCH,
            "shuffle_buffer": 4,
            **(data or {}),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def probe(folder: Path) -> dict:
    return {"class_path": "training_probes.TrainProbe", "init_args": {"folder": str(folder)}}


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {dict(list(differ.items())[:3])}"


def model_files(folder: Path) -> dict[str, Any]:
    """A model folder's weights (every safetensors file) and its emojidiff_model.json."""
    files = {str(p.relative_to(folder)): load_file(str(p)) for p in sorted(folder.rglob("*.safetensors"))}
    return {"weights": files, "spec": json.loads((folder / "emojidiff_model.json").read_text())}


def assert_same_model(a: Path, b: Path) -> None:
    fa, fb = model_files(a), model_files(b)
    assert fa["spec"] == fb["spec"]
    assert fa["weights"].keys() == fb["weights"].keys() and "adapter/adapter.safetensors" in fa["weights"]
    for name in fa["weights"]:
        assert_same_tensors(fa["weights"][name], fb["weights"][name])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("triplets")
    write_world_triplets(folder, n=16, shards=2)
    return str(folder / "train-r1-*.tar")


@pytest.fixture(scope="module")
def stage1(shards, tmp_path_factory) -> Path:
    """Run A: stage 1, uninterrupted, 3 epochs of 2 steps (seed 0)."""
    out = tmp_path_factory.mktemp("run_a")
    ok(
        run_cli(
            [
                "fit",
                "-c",
                str(tiny_config("decoupled", out, shards, epochs=3, callbacks=[probe(out / "probe")])),
            ]
        )
    )
    return out


def test_sigkill_then_resume_from_last_reaches_the_uninterrupted_weights(stage1, shards, tmp_path):
    a, b = stage1, tmp_path / "run_b"
    kill = {"class_path": "training_probes.SigkillAtStep", "init_args": {"step": 5}}  # epoch 3's second step
    killed = run_cli(["fit", "-c", str(tiny_config("decoupled", b, shards, epochs=3, callbacks=[kill]))])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (b / "ckpt" / "last.ckpt").is_file() and not (b / "model").exists()
    assert load_ckpt(b / "ckpt" / "last.ckpt")["global_step"] == 4  # written at the end of epoch 2

    config = tiny_config("decoupled", b, shards, epochs=3, callbacks=[probe(b / "probe")])  # no kill
    ok(run_cli(["fit", "-c", str(config), "--ckpt_path", str(b / "ckpt" / "last.ckpt")]))
    start = json.loads((b / "probe" / "rank0.json").read_text())
    assert (start["start_step"], start["start_epoch"]) == (4, 2)
    reference = json.loads((a / "probe" / "rank0.json").read_text())
    assert start["keys"] == reference["keys"][4:]  # epoch 3 replayed with the same batches

    assert_same_model(a / "model", b / "model")  # the EMA exports of on_fit_end
    ckpt_a, ckpt_b = load_ckpt(a / "ckpt" / "last.ckpt"), load_ckpt(b / "ckpt" / "last.ckpt")
    assert ckpt_a["global_step"] == ckpt_b["global_step"] == 6
    assert any(k.startswith("ema.") for k in ckpt_a["state_dict"]) and any(
        k.startswith("adapter.") for k in ckpt_a["state_dict"]
    )
    assert_same_tensors(ckpt_a["state_dict"], ckpt_b["state_dict"])  # live weights and their EMA
    state_a, state_b = ckpt_a["optimizer_states"][0]["state"], ckpt_b["optimizer_states"][0]["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert_same_tensors(state_a[i], state_b[i])  # AdamW moments and step


def test_two_gloo_processes_train_with_the_cluster_ddp_config(shards, tmp_path):
    out = tmp_path / "ddp"
    # not resampled: split_by_rank gives each rank one of the 2 shards (8 samples, 2 batches); validation
    # on: the panel and the export go through Trainer.log_dir, a collective under DDP
    data = {
        "resampled": False,
        "samples_per_epoch": None,
        "val_shards": shards,
        "max_identity_similarity": None,
    }
    config = tiny_config(
        "decoupled",
        out,
        shards,
        epochs=1,
        callbacks=[probe(out / "probe")],
        trainer={"limit_val_batches": 1},
        data=data,
    )
    ok(run_cli(["fit", "-c", str(config), *cpu_cluster("ddp")], timeout=240))
    ranks = [json.loads((out / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    keys = [{k for batch in r["keys"] for k in batch} for r in ranks]
    assert [len(r["keys"]) for r in ranks] == [2, 2]  # 16 samples / (4 per batch x 2 ranks)
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 16  # split_by_rank: one shard each
    assert load_ckpt(out / "ckpt" / "last.ckpt")["global_step"] == 2
    record = json.loads((out / "model" / "train_record.json").read_text())
    assert record["global_step"] == 2 and (out / "model" / "adapter" / "adapter.safetensors").is_file()
    assert list((Path(record["log_dir"]) / "panels").glob("step*.png"))  # validation ran under DDP


def cpu_cluster(name: str) -> list[str]:
    """configs/cluster/<name>.yaml on two CPU processes over gloo, float32."""
    config = f"configs/cluster/{name}.yaml"
    return ["-c", config, "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true"]


def fsdp_args(shard_backbone: bool) -> list[str]:
    """configs/cluster/fsdp.yaml on two CPU processes (training_probes.CpuFSDPStrategy: the same strategy
    with the CPU's differences), the frozen blocks sharded or replicated."""
    return [
        *cpu_cluster("fsdp"),
        "--trainer.strategy.class_path",
        "training_probes.CpuFSDPStrategy",
        "--trainer.strategy.init_args.auto_wrap_policy.init_args.shard_backbone",
        str(shard_backbone).lower(),
    ]


def weights_probe(folder: Path) -> dict:
    return {"class_path": "training_probes.AdapterWeightsProbe", "init_args": {"folder": str(folder)}}


def assert_ranks_trained_alike(folder: Path) -> None:
    """Both ranks end with the same trainable weights, and training changed every one of them."""
    end = [load_file(str(folder / f"rank{r}.safetensors")) for r in (0, 1)]
    start = load_file(str(folder / "rank0.start.safetensors"))
    assert_same_tensors(end[0], end[1])
    unchanged = [k for k in start if torch.equal(start[k], end[0][k])]
    assert len(start) > 10 and unchanged == [], unchanged[:5]


@pytest.mark.parametrize("shard_backbone", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_two_gloo_processes_train_with_the_cluster_fsdp_config(shards, tmp_path, shard_backbone):
    out = tmp_path / "fsdp"
    data = {"resampled": False, "samples_per_epoch": None, "max_identity_similarity": None}
    config = tiny_config("decoupled", out, shards, epochs=1, callbacks=[weights_probe(out / "w")], data=data)
    ok(run_cli(["fit", "-c", str(config), *fsdp_args(shard_backbone)], timeout=300))
    assert_ranks_trained_alike(out / "w")
    units = json.loads((out / "w" / "rank0.units.json").read_text())
    blocks = [u for u in units if u["module"].endswith(("Block2D", "Block2DCrossAttn"))]
    root = units[0]  # the LightningModule: encoders, VAE, text encoder, the adapter, its EMA
    assert len(blocks) == 3 + 1 + 3  # tiny UNet: 3 down, the mid and 3 up blocks
    assert root["module"].endswith("Module") and root["strategy"] == "FULL_SHARD"
    assert root["local"] <= root["full"] // 2 + 1
    for block in blocks:
        if shard_backbone:
            assert block["strategy"] == "FULL_SHARD" and block["local"] <= block["full"] // 2 + 1, block
        else:
            assert block["strategy"] == "NO_SHARD" and block["local"] == block["full"], block
    # the checkpoint is the full, adapter-only state dict that `emojidiff export` reads
    ckpt = load_ckpt(out / "ckpt" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert ckpt["state_dict"] and all(
        k.startswith(("adapter.", "ema.", "expression_encoder.")) for k in ckpt["state_dict"]
    )
    exported = tmp_path / "exported"
    assert main(["export", "--ckpt", str(out / "ckpt" / "last.ckpt"), "--out", str(exported)]) == 0
    assert_same_model(exported, out / "model")  # on_fit_end's export under FSDP: the same EMA weights


def test_the_export_loads_in_a_fresh_generate_process_and_equals_emojidiff_export(stage1, tmp_path):
    exported = tmp_path / "exported"
    assert main(["export", "--ckpt", str(stage1 / "ckpt" / "last.ckpt"), "--out", str(exported)]) == 0
    assert_same_model(stage1 / "model", exported)

    assert main(["world-sample", "--out_dir", str(tmp_path / "inputs"), "--n", "1"]) == 0
    image = tmp_path / "out.png"
    inputs = tmp_path / "inputs"
    ok(
        run_cli(
            [
                "generate",
                "--model",
                str(stage1 / "model"),
                "--id",
                str(inputs / "ids" / "id_00.png"),
                "--expr",
                str(inputs / "templates" / "expr_00.png"),
                "--expr_mask",
                str(inputs / "masks" / "expr_00.png"),
                "--out",
                str(image),
                "--steps",
                "2",
                "--threads",
                "1",
                "--quiet=true",
            ]
        )
    )
    pixels = np.asarray(Image.open(image))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    config = json.loads((tmp_path / "generate_config.json").read_text())
    assert str(stage1 / "model") in json.dumps(config)


def test_ica_from_the_stage1_export_keeps_t_max_across_a_resume(stage1, shards, tmp_path):
    out = tmp_path / "ica"
    # recognise_threshold 1: every step's mean x0 similarity is below it, so t_max shrinks by
    # adapt_factor (0.9) at every step (adapt_every 1): 600 -> 486 after 2 steps, 393.66 after 4
    model = {
        "model": {
            "class_path": "emojidiff.models.bundle.TrainedModel",
            "init_args": {"folder": str(stage1 / "model")},
        },
        "adapt_every": 1,
        "recognise_threshold": 1.0,
    }
    ok(
        run_cli(
            [
                "fit",
                "-c",
                str(
                    tiny_config("ica", out, shards, epochs=1, callbacks=[probe(out / "probe1")], model=model)
                ),
            ]
        )
    )
    first = load_ckpt(out / "ckpt" / "last.ckpt")
    assert first["global_step"] == 2 and first["emojidiff"]["stage"] == "ica"
    assert first["stage_state"]["t_max"] == pytest.approx(600 * 0.9**2)
    assert json.loads((out / "probe1" / "rank0.json").read_text())["start_t_max"] == 600

    config = tiny_config("ica", out, shards, epochs=2, callbacks=[probe(out / "probe2")], model=model)
    ok(run_cli(["fit", "-c", str(config), "--ckpt_path", str(out / "ckpt" / "last.ckpt")]))
    resumed = json.loads((out / "probe2" / "rank0.json").read_text())
    assert resumed["start_step"] == 2 and resumed["start_t_max"] == first["stage_state"]["t_max"]
    assert load_ckpt(out / "ckpt" / "last.ckpt")["stage_state"]["t_max"] == pytest.approx(600 * 0.9**4)
    assert (out / "model" / "adapter" / "adapter.safetensors").is_file()


# each real-weights stack (SDXL is an overlay on SD1.5), the key its first missing path fails on,
# and the sizes the stack ends with
GPU_CONFIGS = {
    ("configs/sd15/decoupled.yaml",): (
        "model.init_args.model.init_args.backbone",
        512,
        "outputs/sd15/decoupled/model",
    ),
    ("configs/sd15/ica.yaml",): ("model.init_args.model.init_args.folder", 512, "outputs/sd15/ica/model"),
    ("configs/sd15/decoupled.yaml", "configs/sdxl/decoupled.yaml"): (
        "model.init_args.model.init_args.backbone",
        1024,
        "outputs/sdxl/decoupled/model",
    ),
    ("configs/sd15/ica.yaml", "configs/sdxl/ica.yaml"): (
        "model.init_args.model.init_args.folder",
        1024,
        "outputs/sdxl/ica/model",
    ),
}


@pytest.mark.parametrize(
    "configs",
    sorted(GPU_CONFIGS),
    ids=lambda c: "+".join(Path(p).parent.name + "/" + Path(p).stem for p in c),
)
def test_gpu_configs_parse_and_fail_naming_the_local_path_to_set(configs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["emojidiff"])  # LightningCLI warns about pytest's own argv otherwise
    monkeypatch.chdir(ROOT)
    key, size, export = GPU_CONFIGS[configs]
    stack_args = [a for c in configs for a in ("-c", c)]
    for cluster in ([], ["-c", "configs/cluster/ddp.yaml"], ["-c", "configs/cluster/fsdp.yaml"]):
        with pytest.raises(SystemExit) as exc:
            main(["fit", *stack_args, *cluster, "--print_config"])
        assert exc.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["class_path"].startswith("lightning_modules.")
        assert (
            printed["data"]["init_args"]["image_size"] == size
            and printed["model"]["init_args"]["export_dir"] == export
        )
        assert (
            printed["trainer"]["logger"]["init_args"]["save_dir"]
            == export.split("/")[0] + "/" + export.split("/")[1]
        )
        if cluster:
            assert printed["trainer"]["strategy"]["class_path"].endswith(("DDPStrategy", "FSDPStrategy"))
    assert main(["fit", *stack_args]) == 2
    err = capsys.readouterr().err
    assert f"emojidiff fit: error: missing weights: config key `{key}`" in err, err


def test_self_pair_ablation_stacks_on_stage_one(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["emojidiff"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                "-c",
                "configs/decoupled.yaml",
                "-c",
                "configs/ablations/self_pairs.yaml",
                "--print_config",
            ]
        )
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["train_shards"] == "data/idi/train-r0-*.tar"
    assert printed["model"]["init_args"]["export_dir"] == "outputs/train/self_pairs/model"
    # everything else is stage 1's: the ablation changes the data only
    assert printed["model"]["init_args"]["model"]["init_args"]["expression_encoder"] == "world_expr_features"
    assert printed["trainer"]["logger"]["init_args"]["name"] == "self_pairs"


@pytest.mark.parametrize(
    "ablation, shards",
    [
        ("idi_round2", ["data/idi/train-r1-*.tar", "data/idi/train-r2-*.tar"]),
        ("round1_continued", "data/idi/train-r1-*.tar"),
    ],
)
def test_round_two_and_its_control_continue_stage_one_for_the_same_steps(
    ablation, shards, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["emojidiff"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "-c",
                "configs/decoupled.yaml",
                "-c",
                f"configs/ablations/{ablation}.yaml",
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["train_shards"] == shards
    assert printed["model"]["init_args"]["model"] == {
        "class_path": "emojidiff.models.bundle.TrainedModel",
        "init_args": {"folder": "outputs/train/decoupled/model"},
    }
    assert printed["model"]["init_args"]["lr_scheduler"]["init_args"]["warmup_steps"] == 20
    assert printed["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 2e-3  # stage 1's
    assert printed["trainer"]["max_epochs"] == 6
    assert printed["model"]["init_args"]["export_dir"] == f"outputs/train/{ablation}/model"


def _print_config(capsys, *configs: str) -> dict:
    with pytest.raises(SystemExit) as exc:
        main(["fit", *(a for c in configs for a in ("-c", c)), "--print_config"])
    assert exc.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    "base, ablation, changed",
    [
        ("decoupled", "parameter_vector", {"model.model.init_args.expression_encoder": "expression_params"}),
        (
            "decoupled",
            "landmarks",
            {
                "model.model.init_args.expression_encoder": None,  # a string becomes a dict: see below
                "model.model.init_args.expression_encoder.name": "landmarks",
                "model.model.init_args.expression_encoder.init_args.detector": "world-lms",
                "model.model.init_args.expression_encoder.init_args.points": 68,
                "model.model.init_args.expression_encoder.init_args.frame": "face",
            },
        ),
        (
            "decoupled",
            "emotion_label",
            {
                "model.model.init_args.expression_encoder": "emotion_label",
                "model.model.init_args.adapter.num_expr_tokens": 1,
            },
        ),
        ("decoupled", "expr_all_layers", {"model.model.init_args.adapter.expr_layers": "all"}),
        (
            "decoupled",
            "no_filters",
            {"data.train_shards": "data/idi-nofilter/train-r1-*.tar", "data.max_identity_similarity": None},
        ),
        (
            "ica",
            "paper_ica",
            {
                "model.model.init_args.folder": "outputs/train/paper_stage1/model",
                "data.max_identity_similarity": None,
            },
        ),
        (
            "ica",
            "ica_no_align",
            {
                "model.weights.align_identity": 0.0,
                "model.weights.align_semantic": 0.0,
                "model.weights.align_layout": 0.0,
            },
        ),
    ],
)
def test_ablation_changes_only_its_factor_and_its_output_folders(
    base, ablation, changed, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["emojidiff"])
    monkeypatch.chdir(ROOT)
    reference = _print_config(capsys, f"configs/{base}.yaml")
    printed = _print_config(capsys, f"configs/{base}.yaml", f"configs/ablations/{ablation}.yaml")

    def flat(cfg: dict) -> dict:
        """{"model.<key>.<sub>...": leaf value} of the model's and data's init_args, nested dicts (the parts'
        class_path/init_args, the adapter config, the optimizer's init_args) walked down to their leaves."""
        out = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}", v)
            else:
                out[prefix] = value

        for section in ("model", "data"):
            for key, value in cfg[section]["init_args"].items():
                walk(f"{section}.{key}", value)
        return out

    ref, abl = flat(reference), flat(printed)
    diff = {k for k in set(ref) | set(abl) if ref.get(k) != abl.get(k)}
    assert diff == set(changed) | {"model.export_dir"}, diff
    assert all(abl.get(k) == v for k, v in changed.items())
    assert abl["model.export_dir"] == f"outputs/train/{ablation}/model"
    assert printed["trainer"]["logger"]["init_args"]["name"] == ablation


def test_paper_stage_one_is_the_recipe_without_its_departures(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["emojidiff"])
    monkeypatch.chdir(ROOT)
    recipe = _print_config(capsys, "configs/decoupled.yaml")
    paper = _print_config(capsys, "configs/decoupled.yaml", "configs/ablations/paper_stage1.yaml")
    assert recipe["model"]["class_path"] == "lightning_modules.ica.ICAModule"
    assert (
        recipe["model"]["init_args"]["sample_steps"] > 0
        and recipe["data"]["init_args"]["max_identity_similarity"] == 0.4
    )
    assert paper["model"]["class_path"] == "lightning_modules.decoupled.DecoupledModule"
    assert "sample_steps" not in paper["model"]["init_args"] and "weights" not in paper["model"]["init_args"]
    assert (
        paper["data"]["init_args"]["max_identity_similarity"] is None and paper["trainer"]["max_epochs"] == 12
    )
    shared = set(paper["model"]["init_args"]) - {"export_dir"}
    assert {k for k in shared if paper["model"]["init_args"][k] != recipe["model"]["init_args"][k]} == set()
    assert paper["model"]["init_args"]["export_dir"] == "outputs/train/paper_stage1/model"


def test_unfiltered_data_config_keeps_every_first_candidate(capsys):
    from data_gen.idi import main as idi_main

    with pytest.raises(SystemExit):
        idi_main(["-c", str(ROOT / "configs/data/world_nofilter.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["attempts"] == 1 and printed["out_dir"] == "data/idi-nofilter"
    assert printed["filters"]["max_expression_distance"] == float("inf")
    assert printed["filters"]["max_identity_similarity"] == float("inf")


CURVE = "benchmarks.diagnostics.learning_curves.LearningCurve"
CURVE_ROWS, CURVE_STEPS = 4, 2


@pytest.fixture(scope="module")
def lora_run(shards, tmp_path_factory) -> Path:
    """Stage 1 with a rank-2 UNet LoRA and the learning-curve callback (every step, 4 rows), 1 epoch of 2 steps."""
    out = tmp_path_factory.mktemp("lora_run")
    curve = {"class_path": CURVE, "init_args": {"every_n_steps": 1, "rows": CURVE_ROWS, "steps": CURVE_STEPS}}
    config = tiny_config(
        "decoupled", out, shards, epochs=1, callbacks=[curve], model={"unet_lora": {"rank": 2}}
    )
    ok(run_cli(["fit", "-c", str(config)]))
    return out


def test_a_lora_run_exports_its_trained_lora_and_emojidiff_export_of_the_checkpoint_equals_it(
    lora_run, tmp_path
):
    model = lora_run / "model"
    lora = load_file(str(model / "unet_lora" / "pytorch_lora_weights.safetensors"))
    ups = [v for k, v in lora.items() if k.endswith("lora.up.weight")]
    assert ups and all(k.startswith("unet.") for k in lora), "diffusers' UNet LoRA layout"
    assert any(float(v.abs().max()) > 0 for v in ups), "B starts at zero: a trained LoRA has moved it"
    assert json.loads((model / "emojidiff_model.json").read_text())["unet_lora"] == "unet_lora"
    exported = tmp_path / "exported"
    assert main(["export", "--ckpt", str(lora_run / "ckpt" / "last.ckpt"), "--out", str(exported)]) == 0
    assert_same_model(model, exported)


def test_the_learning_curve_of_a_two_step_run_matches_a_hand_scored_sample_and_draws_its_table(
    lora_run, tmp_path
):
    import torch.nn.functional as F

    from benchmarks.diagnostics.learning_curves import main as curves_main
    from benchmarks.diagnostics.learning_curves import read_curve, validation_rows
    from benchmarks.evaluation.methods import world_inputs
    from emojidiff.face.analyse import embed_identities
    from emojidiff.models.bundle import build_expression_analyser, build_identity_encoder, load_model

    records = read_curve(lora_run / "logs")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["failed_rows"] == 0 for r in records)
    # the last measurement scored the EMA weights the export holds: generate and score the same rows by hand
    pipe = load_model(lora_run / "model").pipeline
    rows = validation_rows(CURVE_ROWS)
    inputs = world_inputs(rows, 64)
    to_float = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    emb = embed_identities(pipe.identity_encoder, list(inputs.references), [str(r.row_id) for r in rows])
    out = pipe(
        to_float(inputs.templates),
        id_embeds=emb,
        expr_mask=torch.from_numpy(inputs.template_masks)[:, None],
        prompt=[r.prompt for r in rows],
        generator=[torch.Generator().manual_seed(r.seed) for r in rows],
        num_inference_steps=CURVE_STEPS,
        guidance_scale=5.0,
    ).images
    enc, ana = build_identity_encoder("world-id-eval"), build_expression_analyser("world-expr-eval")
    with torch.no_grad():
        sim = F.cosine_similarity(enc(to_float(out)), enc(to_float(inputs.references)), dim=-1).mean()
        err = (ana(to_float(out)) - ana(to_float(inputs.templates))).abs().mean()
    assert records[-1]["eval_identity_similarity"] == pytest.approx(float(sim), abs=1e-5)
    assert records[-1]["eval_expression_error"] == pytest.approx(float(err), abs=1e-5)

    png, md = curves_main([f"lora={lora_run / 'logs'}", "--out", str(tmp_path / "curves")])
    assert png.stat().st_size > 0
    table = md.read_text()
    assert [ln.split("|")[2].strip() for ln in table.splitlines() if ln.startswith("| lora |")][-3:] == [
        "0",
        "1",
        "2",
    ]
