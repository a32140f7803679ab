"""The IDI job on a folder of real photos (packaged photos, dlib analysers, a random inswapper-layout ONNX)."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from data_gen.idi import main
from data_gen.shards import read_manifest
from emojidiff.triplet import parse_sample_key

ROOT = Path(__file__).resolve().parents[2]


def test_real_photo_folder_skips_and_names_bad_files_and_writes_the_rest(
    tmp_path, caplog, onnx_models, photo
):
    root = tmp_path / "photos"
    for rel, image in (
        ("astronaut/a.png", data.astronaut()),
        ("astronaut/b.png", np.ascontiguousarray(data.astronaut()[:, ::-1])),
        ("hanks/tom.png", photo("Tom_Hanks_54745.png")),
        ("crowd/t1.png", photo("t1.jpg")),
        ("coffee.png", data.coffee()),
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / rel)
    (root / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    out = tmp_path / "idi"
    args = [
        "--out_dir",
        str(out),
        "--split",
        "real",
        "--round",
        "1",
        "--self_pairs",
        "true",
        "--block_size",
        "3",
        "--num_workers",
        "0",
        "--progress",
        "false",
        "--source",
        json.dumps({"name": "folder", "init_args": {"root": str(root), "size": 128}}),
        "--alterers",
        json.dumps(
            [
                {
                    "name": "onnx-swapper",
                    "init_args": {
                        "model_path": str(onnx_models["swapper"]),
                        "identity_encoder": onnx_models["encoder"],
                    },
                }
            ]
        ),
        "--identity_encoder",
        "dlib",
        "--expression_analyser",
        "dlib-lms",
        "--aligner",
        "dlib-chip",
        "--filters",
        json.dumps({"max_identity_similarity": 1.0, "max_expression_distance": 10.0}),
    ]
    with caplog.at_level(logging.WARNING):
        report = main(args)
    assert str(root / "coffee.png") in caplog.text and str(root / "broken.jpg") in caplog.text
    assert report["skipped_targets"]["count"] == 2
    assert {Path(name).name for _, name, _ in report["skipped_targets"]["first"]} == {
        "coffee.png",
        "broken.jpg",
    }
    keys = []
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    r0 = [k for k in keys if parse_sample_key(k)["round"] == 0]
    assert len(r0) == 4  # every photo with a face has its self pair
    assert len(keys) - len(r0) == report["summary"]["all"]["accepted"]
    assert sum(r["targets"] for r in read_manifest(out, "real", 1)) == 4
    assert "filter_quality" in report["summary"]["all"] and not report["summary"]["all"]["filter_quality"]


def test_photo_config_parses_and_names_what_is_missing(tmp_path):
    from data_gen.idi import config_from_namespace, make_parser
    from data_gen.job import build_job

    parser = make_parser()
    cfg = parser.parse_args(["-c", str(ROOT / "configs/data/photos.yaml"), "--out_dir", str(tmp_path)])
    assert cfg.source["name"] == "folder" and cfg.alterers[0]["name"] == "onnx-swapper"
    config = config_from_namespace(parser, cfg)
    assert config.filters.max_identity_similarity == 0.4
    try:
        build_job(config)
    except FileNotFoundError as err:  # the placeholder paths: the first missing one is named
        assert "/path/to/" in str(err)
    else:
        raise AssertionError("the placeholder paths of configs/data/photos.yaml must fail clearly")


def test_round_two_config_names_the_missing_stage_one_model(tmp_path):
    from data_gen.idi import config_from_namespace, make_parser
    from data_gen.job import build_job
    from emojidiff.errors import MissingWeightsError

    parser = make_parser()
    cfg = parser.parse_args(["-c", str(ROOT / "configs/data/world_r2.yaml"), "--out_dir", str(tmp_path)])
    assert cfg.round == 2 and [a["name"] for a in cfg.alterers] == ["adapter"]
    config = config_from_namespace(parser, cfg)
    config.alterers[0]["init_args"]["model"] = str(tmp_path / "no-model")
    with pytest.raises(MissingWeightsError, match="model"):
        build_job(config)
