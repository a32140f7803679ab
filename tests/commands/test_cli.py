"""The `emojidiff` entry point: subcommands, LightningCLI forwarding, the layering rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from emojidiff.cli import LIGHTNING_COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when it gets `args` while sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["emojidiff"])


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("generate", "probe-layers", "world-sample", *LIGHTNING_COMMANDS):
        assert name in out


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["demo", "--print_config"]])
def test_module_entry_point_runs_without_importing_higher_layers(argv):
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['emojidiff', *{argv!r}]\n"
        "try:\n    runpy.run_module('emojidiff.cli', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('datamodules', 'lightning_modules', 'data_gen', 'benchmarks')]\n"
        "assert not bad, bad\n"
        "assert 'torch' not in sys.modules, 'help should not import torch'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert {"--help": "probe-layers", "generate": "--mask_from", "demo": "batch_size: 16"}[
        argv[0]
    ] in res.stdout


def test_command_options_from_a_config_file_and_the_command_line(tmp_path, capsys):
    cfg = tmp_path / "generate.yaml"
    cfg.write_text(
        "steps: 3\nmask_from: world\nidentity_encoder: {name: world-id, init_args: {weights: null}}\n"
    )
    with pytest.raises(SystemExit) as exc:
        main(["generate", "-c", str(cfg), "--steps", "4", "--out_dir", "out", "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert (
        "steps: 4" in out and "mask_from: world" in out and "out_dir: out" in out and "weights: null" in out
    )
    assert "batch_size: 8" in out and "scheduler: ddim" in out  # the dataclasses' defaults filled in


@pytest.mark.parametrize(
    "argv",
    [
        ["world-sample", "--out-dir", "x"],
        ["generate", "--scheduler", "nope"],
        ["demo", "--styles", "[cel, oil]"],
        ["export", "--out", "x", "--format", "onnx"],
    ],
)
def test_unknown_options_and_bad_values_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_inconsistent_options_are_one_line_user_errors(capsys):
    assert main(["generate", "--backbone", "emojidiff:tiny-sd15", "--model", "some/model"]) == 2
    assert (
        capsys.readouterr().err.strip() == "emojidiff generate: error: give --model or --backbone, not both"
    )
    assert main(["generate", "--identity_encoder", "dlib"]) == 2
    assert "apply to --backbone" in capsys.readouterr().err
    assert main(["generate", "--expr_mask", "m.png", "--mask_from", "world"]) == 2
    assert "give --expr_mask or --mask_from, not both" in capsys.readouterr().err


def test_fit_help_is_lightning_cli(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--model" in out and "--data" in out and "--trainer" in out


def test_config_resolves_class_paths(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model:\n  class_path: lightning.pytorch.demos.boring_classes.BoringModel\n"
        "data:\n  class_path: datamodules.world_portraits.WorldPortraitDataModule\n"
        "  init_args:\n    batch_size: 4\n    size: 32\n"
    )
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(cfg), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: datamodules.world_portraits.WorldPortraitDataModule" in out
    assert "batch_size: 4" in out and "steps_per_epoch: 500" in out  # defaults of the class filled in
    assert "seed_everything: 0" in out


def test_fit_runs_a_lightning_module(tmp_path):
    boring = "lightning.pytorch.demos.boring_classes"
    assert (
        main(
            [
                "fit",
                "--model",
                f"{boring}.BoringModel",
                "--data",
                f"{boring}.BoringDataModule",
                "--trainer.fast_dev_run=1",
                "--trainer.accelerator=cpu",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
        == 0
    )
