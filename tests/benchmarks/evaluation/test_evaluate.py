"""The evaluation run end to end at toy size: protocol, methods, cache, failures, tables and figures."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.evaluation.all_methods import METHODS
from benchmarks.evaluation.evaluate import EvalConfig, run
from benchmarks.evaluation.methods import Generated, GroundTruth, world_inputs
from benchmarks.evaluation.protocol import ProtocolRow, read_protocol, world_protocol, write_protocol
from emojidiff.splits import get_split
from emojidiff.world import Expression, Identity, render


@METHODS.register("test-fails-on-row-1")
class FailsOnRowOne(GroundTruth):
    """The ground truth, except that row 1 fails: the table must report it, not drop it."""

    name = "test-fails-on-row-1"

    def generate(self, inputs):
        out = super().generate(inputs)
        ok = np.array([r.row_id != 1 for r in inputs.rows])
        return Generated(out.images, ok, ["" if k else "deliberate failure" for k in ok])


def test_world_protocol_is_held_out_cross_identity_and_round_trips(tmp_path):
    rows = world_protocol(3, 2)
    assert len(rows) == 3 * 2 * 3 and {r.style for r in rows} == {"shaded", "cel", "brush"}
    test = get_split("test")
    for r in rows:
        assert (
            r.ref_identity != r.tmpl_identity and test.has_identity(r.ref_identity) and test.has_seed(r.seed)
        )
    assert read_protocol(write_protocol(rows, tmp_path / "p.csv")) == rows


def test_a_missing_image_path_is_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    row = ProtocolRow(
        row_id=0, kind="files", style="photo", prompt="p", seed=1, ref_path="a.png", tmpl_path="nope.png"
    )
    write_protocol([row], tmp_path / "real.csv")
    with pytest.raises(FileNotFoundError, match=r"row 0 .*tmpl_path .*nope\.png"):
        read_protocol(tmp_path / "real.csv")


def test_ground_truth_is_the_reference_identity_wearing_the_template_expression():
    row = world_protocol(1, 1, styles=("cel",))[0]
    inputs = world_inputs([row], 64)
    expected, _ = render(
        Identity.sample(row.ref_identity), Expression.sample(row.tmpl_expression_seed), "cel", 64, row.seed
    )
    np.testing.assert_array_equal(inputs.ground_truth[0], expected)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    protocol = write_protocol(world_protocol(2, 2, styles=("shaded", "cel")), out / "protocol.csv")
    config = EvalConfig(
        protocol=str(protocol),
        out_dir=str(out / "run"),
        fid=True,
        world_fd=True,
        grid_rows=3,
        bootstrap=200,
        methods={"ground-truth": "ground-truth", "flaky": "test-fails-on-row-1", "vae-oracle": "vae-oracle"},
    )
    return config, run(config, dump="seed: 0\n")


def test_tables_and_figures_are_written(evaluation):
    config, report = evaluation
    out = Path(config.out_dir)
    for name in (
        "table.md",
        "table.csv",
        "table.tex",
        "table_shaded.md",
        "table_cel.md",
        "grid.png",
        "tradeoff.png",
        "report.json",
        "scores.json",
        "eval_config.yaml",
    ):
        assert (out / name).is_file(), name
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"ground-truth", "flaky", "vae-oracle"}
    gt = report["summary"]["overall"]["ground-truth"]
    assert (
        gt["identity_similarity"]["low"]
        <= gt["identity_similarity"]["mean"]
        <= gt["identity_similarity"]["high"]
    )
    assert gt["identity_similarity"]["mean"] > 0.85 and gt["expression_error_gt"]["mean"] < 0.15
    assert gt["world_fd_expr"] < 1e-6  # the ground truth against itself


def test_fid_and_kid_are_reported_per_style(evaluation):
    config, report = evaluation
    for style in ("shaded", "cel"):
        cells = {
            label: report["summary"]["by_style"][style][label] for label in ("ground-truth", "vae-oracle")
        }
        assert abs(cells["ground-truth"]["fid"]) < 1e-3  # the ground truth against itself
        assert cells["vae-oracle"]["fid"] > cells["ground-truth"]["fid"] + 1.0
        assert np.isfinite(cells["vae-oracle"]["kid"])
        assert "FID" in (Path(config.out_dir) / f"table_{style}.md").read_text()


def test_a_failing_row_is_reported_not_dropped(evaluation):
    config, report = evaluation
    assert report["summary"]["failures"]["flaky"]["count"] == 1
    assert report["summary"]["failures"]["flaky"]["rows"] == {1: "deliberate failure"}
    assert report["summary"]["overall"]["flaky"]["identity_similarity"]["n"] == 7
    assert "1 / 8" in (Path(config.out_dir) / "table.md").read_text()


def test_a_second_run_reuses_the_generations(evaluation):
    config, _ = evaluation
    report = run(config)
    assert all(t["generated"] == 0 and t["cached"] == 8 for t in report["timings"]["generation"].values())
    scores = json.loads((Path(config.out_dir) / "scores.json").read_text())
    assert len(scores["scores"]["ground-truth"]["identity_similarity"]) == 8


def test_real_photo_protocol_with_dlib_backends(tmp_path):
    """File rows (photos shipped in packages) scored by dlib: the real-data path runs, and outputs
    dlib cannot find a face in are counted as failures, not dropped."""
    import importlib.util

    from PIL import Image
    from skimage import data

    from benchmarks.evaluation.protocol import files_protocol

    ids, tmpls = tmp_path / "ids", tmp_path / "templates"
    ids.mkdir()
    tmpls.mkdir()
    folder = (
        Path(next(iter(importlib.util.find_spec("insightface").submodule_search_locations)))
        / "data"
        / "images"
    )
    Image.fromarray(data.astronaut()).save(ids / "astronaut.png")
    Image.open(folder / "Tom_Hanks_54745.png").convert("RGB").save(tmpls / "hanks.png")
    rows = files_protocol(ids, tmpls, tmp_path)
    protocol = write_protocol(rows, tmp_path / "real.csv")
    config = EvalConfig(
        protocol=str(protocol),
        out_dir=str(tmp_path / "run"),
        image_size=128,
        fid=False,
        world_fd=False,
        identity_encoder="dlib",
        expression_analyser="dlib-lms",
        aligner="dlib-chip",
        bootstrap=50,
        grid_rows=1,
        methods={"identity-only": {"name": "identity-only", "init_args": {"steps": 2}}},
    )
    report = run(config)
    overall = report["summary"]["overall"]["identity-only"]
    assert set(overall) >= {"identity_similarity", "identity_leakage", "expression_error", "detected"}
    assert "expression_error_gt" not in overall  # no ground truth for photos
    found = overall["detected"]["mean"]
    assert report["summary"]["failures"]["identity-only"]["count"] == (0 if found == 1.0 else 1)


def test_two_gloo_processes_give_the_single_process_scores(evaluation, tmp_path):
    """The same rows generated and scored by two DDP processes (each rank its rows, metrics synced)."""
    import subprocess
    import sys

    config, report = evaluation
    root = Path(__file__).resolve().parents[3]
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.evaluation.evaluate",
        "--protocol",
        config.protocol,
        "--out_dir",
        str(tmp_path / "ddp"),
        "--fid",
        "false",
        "--world_fd",
        "false",
        "--bootstrap",
        "200",
        "--grid_rows",
        "2",
        "--methods",
        json.dumps({"ground-truth": "ground-truth", "vae-oracle": "vae-oracle"}),
        "--devices",
        "2",
        "--strategy",
        "ddp",
    ]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "report.json").read_text())["summary"]["overall"]
    for label in ("ground-truth", "vae-oracle"):
        for metric in ("identity_similarity", "expression_error", "expression_error_gt", "identity_leakage"):
            assert ddp[label][metric]["n"] == report["summary"]["overall"][label][metric]["n"] == 8
            assert ddp[label][metric]["mean"] == pytest.approx(
                report["summary"]["overall"][label][metric]["mean"], abs=1e-5
            )


def test_two_stage_keeps_the_first_image_outside_the_face_and_changes_the_face():
    from benchmarks.evaluation.methods import TwoStage
    from emojidiff.world.masks import world_prior_mask

    rows = world_protocol(1, 2, styles=("shaded",))
    inputs = world_inputs(rows, 64)
    method = TwoStage(strength=0.6, steps=6)
    first = method._generate(inputs, expr_scale=0.0)
    out = method.generate(inputs)
    assert out.ok.all() and out.images.shape == first.images.shape
    import cv2

    face = world_prior_mask(64) > 0.5
    far = cv2.dilate(face.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0  # beyond the feathered paste-back
    diff = np.abs(out.images.astype(int) - first.images.astype(int)).mean(-1)
    assert diff[:, far].max() == 0 and diff[:, face].mean() > 2.0


def test_the_study_config_evaluates_every_training_run_and_names_a_missing_model_folder(tmp_path):
    """configs/eval/world.yaml (`make eval`) has a row for the export of every run `make train`
    trains (Makefile TRAIN_RUNS), and a model folder that is missing fails naming itself."""
    import re
    import subprocess

    import yaml
    from jsonargparse import Namespace

    from benchmarks.evaluation.all_methods import METHODS
    from benchmarks.evaluation.evaluate import make_parser
    from emojidiff.errors import MissingWeightsError

    root = Path(__file__).resolve().parents[3]
    config = make_parser().parse_args(["-c", str(root / "configs/eval/world.yaml")])
    assert config.identity_encoder == "world-id-eval" and config.expression_analyser == "world-expr-eval"
    specs = {k: (v.as_dict() if isinstance(v, Namespace) else v) for k, v in config.methods.items()}
    evaluated = {
        s["init_args"]["model"]
        for s in specs.values()
        if isinstance(s, dict) and s.get("init_args", {}).get("model")
    }
    plan = subprocess.run(
        ["make", "-s", "--no-print-directory", "train-plan"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    exports = set()
    for line in plan:
        name, run_dir, args = re.match(r"(\S+) \[(\S+)\]: (.*)", line).groups()
        export = None
        for c in re.findall(r"-c (\S+\.yaml)", args):  # the last config that sets it wins, as in LightningCLI
            export = (
                yaml.safe_load((root / c).read_text())["model"]["init_args"].get("export_dir")
            ) or export
        override = re.search(r"--model\.init_args\.export_dir (\S+)", args)
        exports.add(override.group(1) if override else export)
        assert (override.group(1) if override else export) == f"{run_dir}/model", (
            line
        )  # make train's skip marker
        if seed := re.search(r"--seed_everything (\d+)", args):  # a seed run seeds the model and the data too
            assert (
                f"--model.init_args.seed {seed.group(1)}" in args
                and f"--data.init_args.seed {seed.group(1)}" in args
            ), line
            if name.startswith("ica_seed"):
                assert (
                    f"--model.init_args.model.init_args.folder outputs/train/decoupled_seed{seed.group(1)}/model"
                    in args
                ), line
            else:  # stage 1's fresh adapter too
                assert f"--model.init_args.model.init_args.seed {seed.group(1)}" in args, line
    assert evaluated == exports, evaluated ^ exports
    assert specs["identity-only"]["init_args"]["model"] == specs["stage1"]["init_args"]["model"]
    spec = {
        **specs["emojidiff"],
        "init_args": {**specs["emojidiff"]["init_args"], "model": str(tmp_path / "missing")},
    }
    with pytest.raises(MissingWeightsError, match="missing"):
        METHODS.build(spec)


def test_the_photo_study_config_parses_and_each_placeholder_fails_naming_its_key():
    from jsonargparse import Namespace

    from benchmarks.evaluation.all_methods import METHODS
    from benchmarks.evaluation.evaluate import make_parser
    from emojidiff.errors import MissingWeightsError

    root = Path(__file__).resolve().parents[3]
    config = make_parser().parse_args(["-c", str(root / "configs/eval/photos.yaml")])
    assert config.expression_analyser == "dlib-lms" and config.aligner == "dlib-chip"
    specs = {k: (v.as_dict() if isinstance(v, Namespace) else v) for k, v in config.methods.items()}
    assert set(specs) == {"emojidiff", "stage1", "identity-only", "two-stage", "ip-adapter-faceid"}
    for label in ("emojidiff", "stage1"):  # before `make train` on SD1.5 the model folders do not exist
        with pytest.raises(MissingWeightsError, match=specs[label]["init_args"]["model"]):
            METHODS.build(specs[label])
    with pytest.raises(MissingWeightsError) as err:
        METHODS.build(specs["ip-adapter-faceid"])
    assert err.value.key.endswith("init_args.sd_folder")


def test_a_model_retrained_at_the_same_path_is_generated_again(tmp_path):
    """The generation cache is keyed on the model folder's weights, not only its path: a model
    saved again at the same path with other weights starts its generations afresh."""
    from benchmarks.evaluation.all_methods import METHODS
    from benchmarks.evaluation.generate import METHOD_FILE, done_rows
    from emojidiff.models.bundle import fresh_model

    folder = tmp_path / "model"
    spec = {"name": "emojidiff", "init_args": {"model": str(folder), "steps": 2}}
    fresh_model("emojidiff:tiny-sd15", seed=0).save(folder)
    first = METHODS.build(spec).describe()
    assert METHODS.build(spec).describe() == first  # the same weights: the same key
    cache = tmp_path / "generations"
    cache.mkdir()
    (cache / METHOD_FILE).write_text(json.dumps({"method": first, "protocol": "p"}, indent=2, sort_keys=True))
    (cache / "0.png").write_bytes(b"")
    fresh_model("emojidiff:tiny-sd15", seed=1).save(folder)  # retrained in place
    second = METHODS.build(spec).describe()
    assert second["model"] == first["model"] and second["weights"] != first["weights"]
    assert done_rows(cache, {"method": first, "protocol": "p"}) and not done_rows(
        cache, {"method": second, "protocol": "p"}
    )


def test_methods_scored_in_separate_runs_merge_into_the_one_run_record(evaluation, tmp_path):
    """Two runs scoring disjoint methods, merged, give every number the run over all methods gave."""
    from benchmarks.evaluation.merge import merge

    config, whole = evaluation
    parts = []
    for name, only in (("a", ["ground-truth", "flaky"]), ("b", ["vae-oracle"])):
        part = EvalConfig(**{**vars(config), "out_dir": str(tmp_path / name), "only": only})
        run(part, dump=yaml.safe_dump(dataclasses.asdict(part)))
        parts.append(tmp_path / name)
    merged = merge(parts, tmp_path / "merged")
    for section in ("overall", "shaded", "cel"):
        got = merged["summary"]["overall"] if section == "overall" else merged["summary"]["by_style"][section]
        want = whole["summary"]["overall"] if section == "overall" else whole["summary"]["by_style"][section]
        assert set(got) == set(want)
        for label, cells in want.items():
            for metric, value in cells.items():
                if isinstance(value, dict):
                    for key in ("mean", "low", "high", "n"):
                        assert got[label][metric][key] == pytest.approx(value[key], abs=1e-6, nan_ok=True), (
                            section,
                            label,
                            metric,
                            key,
                        )
                else:
                    assert got[label][metric] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (
                        section,
                        label,
                        metric,
                    )
    assert merged["summary"]["failures"]["flaky"]["count"] == 1
    whole_scores = json.loads((Path(config.out_dir) / "scores.json").read_text())["scores"]
    assert json.loads((tmp_path / "merged" / "scores.json").read_text())["scores"] == whole_scores
    for name in ("table.md", "table.csv", "tradeoff.png", "grid.png", "eval_config.yaml"):
        assert (tmp_path / "merged" / name).is_file(), name


def test_runs_that_do_not_share_their_protocol_settings_or_a_method_spec_are_not_merged(evaluation, tmp_path):
    from benchmarks.evaluation.merge import merge

    config, _ = evaluation
    other = tmp_path / "other"
    shutil.copytree(config.out_dir, other, ignore=shutil.ignore_patterns("generations"))
    cfg = (other / "eval_config.yaml").read_text()
    (other / "eval_config.yaml").write_text(
        cfg + "bootstrap: 50\n"
    )  # the fixture's record names no bootstrap
    with pytest.raises(ValueError, match=r"other/eval_config.yaml: bootstrap is 50"):
        merge([Path(config.out_dir), other], tmp_path / "merged")
    (other / "eval_config.yaml").write_text(cfg)
    report = json.loads((other / "report.json").read_text())
    report["methods"]["vae-oracle"] = {"name": "vae-oracle", "init_args": {"backbone": "elsewhere"}}
    (other / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"method 'vae-oracle'"):
        merge([Path(config.out_dir), other], tmp_path / "merged")
    # a superseded method dropped from every part no longer conflicts, and is nowhere in the union
    for folder in (Path(config.out_dir), other):  # a whole record (the fixture's names only its seed)
        (folder / "eval_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config)))
    merged = merge([Path(config.out_dir), other], tmp_path / "merged", drop=["vae-oracle"])
    assert "vae-oracle" not in merged["methods"] and "vae-oracle" not in merged["summary"]["overall"]
    assert "ground-truth" in merged["summary"]["overall"]
    scores = json.loads((tmp_path / "merged" / "scores.json").read_text())["scores"]
    assert "vae-oracle" not in scores and "ground-truth" in scores
    assert "--drop+=vae-oracle" in (tmp_path / "merged" / "eval_config.yaml").read_text()


def test_only_names_a_label_that_is_not_a_method(tmp_path):
    config = EvalConfig(
        out_dir=str(tmp_path), methods={"ground-truth": "ground-truth"}, only=["ground-truth", "nope"]
    )
    with pytest.raises(ValueError, match=r"only: \['nope'\] not in methods \(ground-truth\)"):
        run(config)


def test_make_eval_without_training_stops_before_any_work_with_one_line_per_missing_model(
    tmp_path, monkeypatch, capsys
):
    """`make eval` on a fresh clone: exit 2, no traceback, nothing written, and one line per method
    whose model folder is missing, naming its config key, the path and the make command that trains it."""
    from benchmarks.evaluation.evaluate import main

    root = Path(__file__).resolve().parents[3]
    study = yaml.safe_load((root / "configs/eval/world.yaml").read_text())
    trained = {
        label: spec["init_args"]["model"]
        for label, spec in study["methods"].items()
        if isinstance(spec, dict) and (spec.get("init_args") or {}).get("model")
    }
    monkeypatch.chdir(tmp_path)  # a clone without outputs/
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "-c",
                str(root / "configs/eval/world.yaml"),
                "--protocol",
                str(root / study["protocol"]),
                "--out_dir",
                str(tmp_path / "results"),
            ]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "results").exists()
    model_lines = [line for line in err if ".init_args.model = " in line]
    assert len(model_lines) == len(trained) >= 10
    for line, (label, path) in zip(model_lines, trained.items(), strict=True):
        run_name = path.split("/")[-2]
        assert line == (
            f"methods.{label}.init_args.model = {path!r}: no trained model there; "
            f"make it with `make train TRAIN_RUNS={run_name}`"
        )
    assert "EVAL_CONFIG=configs/eval/untrained.yaml" in err[-1]


def test_the_photo_study_names_every_local_path_to_set_before_any_work():
    """configs/eval/photos.yaml on a machine without the real weights: one line per /path/to/...
    placeholder of the file (read here from the YAML itself), each naming its config key."""
    from benchmarks.evaluation.evaluate import EvalConfig, make_parser, missing_inputs

    root = Path(__file__).resolve().parents[3]

    def values(node):
        if isinstance(node, dict):
            return [v for x in node.values() for v in values(x)]
        if isinstance(node, list):
            return [v for x in node for v in values(x)]
        return [node]

    study = yaml.safe_load((root / "configs/eval/photos.yaml").read_text())
    placeholders = {v for v in values(study) if isinstance(v, str) and v.startswith("/path/to/")}
    assert len(placeholders) >= 5
    ns = make_parser().parse_args(["-c", str(root / "configs/eval/photos.yaml")])
    init = make_parser().instantiate_classes(ns)
    config = EvalConfig(**{k: v for k, v in vars(init).items() if k != "config" and not k.startswith("_")})
    lines = missing_inputs(config)
    named = {p for p in placeholders for line in lines if repr(p) in line}
    assert named == placeholders, placeholders - named
    assert any(
        line.startswith("methods.ip-adapter-faceid.init_args.identity_encoder.init_args.model_dir = ")
        for line in lines
    )
