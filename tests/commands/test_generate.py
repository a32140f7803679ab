"""`emojidiff generate` (and `world-sample`, which makes its demo inputs) on a random tiny backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emojidiff.cli import main
from emojidiff.errors import FaceNotFoundError
from emojidiff.models.tiny import build_tiny_backbone, save_backbone

#: world-id without weights: a random (seeded) network, enough for plumbing.
RANDOM_ID = '{"name": "world-id", "init_args": {"weights": null}}'
FAST = ["--steps", "2", "--size", "32", "--quiet=true"]


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    return save_backbone(build_tiny_backbone("sd15", seed=0), tmp_path_factory.mktemp("bb") / "tiny")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["world-sample", "--out_dir", str(out), "--n", "2", "--size", "32"]) == 0
    return out


def _model(backbone_dir: Path) -> list[str]:
    return ["--backbone", str(backbone_dir), "--identity_encoder", RANDOM_ID]


def _single(backbone_dir, demo, out: Path, *extra: str) -> np.ndarray:
    argv = [
        "generate",
        *_model(backbone_dir),
        "--id",
        str(demo / "ids/id_00.png"),
        "--expr",
        str(demo / "templates/expr_01.png"),
        "--out",
        str(out),
        *FAST,
        *extra,
    ]
    assert main(argv) == 0
    return np.asarray(Image.open(out))


def test_world_sample_writes_demo_inputs(demo):
    assert sorted(p.name for p in (demo / "ids").iterdir()) == ["id_00.png", "id_01.png"]
    assert Image.open(demo / "templates/expr_00.png").size == (32, 32)
    mask = np.asarray(Image.open(demo / "masks/expr_00.png"))
    assert mask.ndim == 2 and 0 < (mask > 127).mean() < 1
    with (demo / "pairs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4


def test_single_image_size_config_and_determinism(backbone_dir, demo, tmp_path):
    a = _single(backbone_dir, demo, tmp_path / "a.png", "--seed", "3")
    b = _single(backbone_dir, demo, tmp_path / "b" / "b.png", "--seed", "3")
    c = _single(backbone_dir, demo, tmp_path / "c.png", "--seed", "4")
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    cfg = json.loads((tmp_path / "generate_config.json").read_text())
    assert (
        cfg["command"] == "generate" and cfg["resolved"]["size"] == 32 and cfg["model"]["untrained"] is True
    )
    assert [item["seed"] for item in cfg["items"]] == [4] and cfg["items"][0]["out"] == str(
        tmp_path / "c.png"
    )
    assert cfg["resolved"]["mask_from"] == "world"  # the fresh model's default for world templates
    # the record's arguments are a config of the command: the same run again, from it
    (tmp_path / "c.json").write_text(json.dumps(cfg["arguments"]))
    assert (
        cfg["argv"][0] == "generate" and cfg["arguments"]["seed"] == 4 and cfg["arguments"]["quiet"] is True
    )
    assert main(["generate", "-c", str(tmp_path / "c.json"), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), c)


def test_masks_change_the_output(backbone_dir, demo, tmp_path):
    world = _single(backbone_dir, demo, tmp_path / "w.png", "--mask_from", "world")
    none = _single(backbone_dir, demo, tmp_path / "n.png", "--mask_from", "none")
    exact = _single(backbone_dir, demo, tmp_path / "e.png", "--expr_mask", str(demo / "masks/expr_01.png"))
    assert not np.array_equal(world, none) and not np.array_equal(exact, none)


def test_csv_batch_writes_one_file_per_row(backbone_dir, demo, tmp_path):
    single = _single(backbone_dir, demo, tmp_path / "single.png", "--seed", "9", "--prompt", "a portrait")
    rows = [
        ["id", "expr", "prompt", "out", "seed"],
        ["ids/id_00.png", "templates/expr_01.png", "a portrait", "x/first.png", "9"],
        ["ids/id_01.png", "templates/expr_00.png", "", "", ""],
        ["ids/id_01.png", "templates/expr_01.png", "a portrait", "", "11"],
    ]
    with (demo / "custom.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "batch"
    argv = [
        "generate",
        *_model(backbone_dir),
        "--pairs",
        str(demo / "custom.csv"),
        "--out_dir",
        str(out),
        "--seed",
        "100",
        "--mask_from",
        "world",
        "--batch_size",
        "2",
        *FAST,
    ]
    assert main(argv) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["0001_id_01__expr_00.png", "0002_id_01__expr_01.png", "x/first.png"]
    cfg = json.loads((out / "generate_config.json").read_text())
    assert [i["seed"] for i in cfg["items"]] == [9, 101, 11]
    # same seed, inputs and prompt as the single run: the same image, whatever the batch
    diff = np.abs(np.asarray(Image.open(out / "x/first.png")).astype(int) - single.astype(int))
    assert diff.max() <= 1


def test_folder_forms_product_and_zip(backbone_dir, demo, tmp_path):
    common = [
        "generate",
        *_model(backbone_dir),
        "--id_dir",
        str(demo / "ids"),
        "--expr_dir",
        str(demo / "templates"),
        "--mask_dir",
        str(demo / "masks"),
        *FAST,
    ]
    assert main([*common, "--out_dir", str(tmp_path / "p")]) == 0
    assert len(list((tmp_path / "p").glob("*.png"))) == 4
    assert main([*common, "--pairing", "zip", "--out_dir", str(tmp_path / "z")]) == 0
    assert sorted(p.name for p in (tmp_path / "z").glob("*.png")) == [
        "id_00__expr_00.png",
        "id_01__expr_01.png",
    ]


def test_bad_paths_name_the_file(backbone_dir, demo, tmp_path, capsys):
    def generate(ref: Path, tmpl: Path) -> int:
        out = str(tmp_path / "o.png")
        return main(
            ["generate", *_model(backbone_dir), "--id", str(ref), "--expr", str(tmpl), "--out", out, *FAST]
        )

    assert generate(tmp_path / "missing_ref.png", demo / "templates/expr_00.png") == 2
    assert "missing_ref.png" in capsys.readouterr().err
    (tmp_path / "broken.png").write_text("not an image")
    assert generate(demo / "ids/id_00.png", tmp_path / "broken.png") == 2
    assert "broken.png cannot be read" in capsys.readouterr().err
    (tmp_path / "p.csv").write_text(f"id,expr\n{demo / 'ids/id_00.png'},nope.png\n")
    assert (
        main(
            [
                "generate",
                *_model(backbone_dir),
                "--pairs",
                str(tmp_path / "p.csv"),
                "--out_dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "nope.png" in capsys.readouterr().err
    assert (
        main(["generate", *_model(backbone_dir), "--id", str(demo / "ids/id_00.png"), "--out", "x.png"]) == 2
    )
    assert "missing --expr" in capsys.readouterr().err


def test_no_face_for_an_aligner_based_encoder_names_the_image(backbone_dir, tmp_path, monkeypatch):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "blank_ref.png")
    argv = [
        "generate",
        "--backbone",
        str(backbone_dir),
        "--identity_encoder",
        "dlib",
        "--id",
        str(tmp_path / "blank_ref.png"),
        "--expr",
        str(tmp_path / "blank_ref.png"),
        "--out",
        str(tmp_path / "o.png"),
        "--mask_from",
        "none",
        *FAST,
    ]
    monkeypatch.setenv("EMOJIDIFF_TRACEBACK", "1")
    with pytest.raises(FaceNotFoundError, match="blank_ref.png"):
        main(argv)


def test_default_identity_encoder_and_native_size(backbone_dir, demo, tmp_path):
    argv = [
        "generate",
        "--backbone",
        str(backbone_dir),
        "--id",
        str(demo / "ids/id_00.png"),
        "--expr",
        str(demo / "templates/expr_00.png"),
        "--out",
        str(tmp_path / "o.png"),
        "--steps",
        "2",
        "--quiet=true",
    ]
    assert main(argv) == 0
    assert Image.open(tmp_path / "o.png").size == (64, 64)


def test_fresh_clone_path_world_sample_then_generate_on_the_packaged_trained_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing built here: no cache/, no `make base`
    assert main(["world-sample", "--out_dir", "inputs", "--n", "1"]) == 0
    assert (
        main(
            [
                "generate",
                "--id",
                "inputs/ids/id_00.png",
                "--expr",
                "inputs/templates/expr_00.png",
                "--out",
                "out.png",
                "--steps",
                "2",
                "--quiet=true",
            ]
        )
        == 0
    )
    image = np.asarray(Image.open("out.png"))
    assert image.shape == (64, 64, 3) and image.std() > 5  # a picture, not a flat field
    cfg = json.loads(Path("generate_config.json").read_text())
    assert cfg["model"]["source"] == "emojidiff:emojidiff-world" and cfg["model"]["untrained"] is False


def test_threads_option(backbone_dir, demo, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        _single(backbone_dir, demo, tmp_path / "t.png", "--threads", "2")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert (
        main(
            [
                "generate",
                *_model(backbone_dir),
                "--id",
                str(demo / "ids/id_00.png"),
                "--expr",
                str(demo / "templates/expr_00.png"),
                "--out",
                str(tmp_path / "o.png"),
                *FAST,
                "--threads",
                "0",
            ]
        )
        == 2
    )
    assert "--threads must be >= 1" in capsys.readouterr().err
