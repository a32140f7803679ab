"""`make train` resumes the study run by run: a finished run is skipped, an interrupted one continues
from its newest last.ckpt, a new one starts fresh, and TRAIN_FORCE=1 starts every listed run afresh.

The Makefile runs from a scratch folder with PY set to a script that records its arguments, so no
training happens; the folders it looks at are the ones the real runs write."""

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def study(tmp_path):
    """A scratch study folder: `decoupled` finished, `ica` interrupted three times (three versions
    with checkpoints, version_1's the newest file: neither the first nor the last by name),
    `self_pairs` never started."""
    (tmp_path / "data/idi").mkdir(parents=True)
    (tmp_path / "data/idi/train-r1-000-000000.tar").write_bytes(b"")
    done = tmp_path / "outputs/train/decoupled/model"
    done.mkdir(parents=True)
    (done / "train_record.json").write_text("{}")
    for version in ("version_0", "version_2", "version_1"):  # written in this order
        ckpt = tmp_path / f"outputs/train/ica/{version}/checkpoints"
        ckpt.mkdir(parents=True)
        (ckpt / "last.ckpt").write_bytes(b"")
        time.sleep(0.02)
        os.utime(ckpt / "last.ckpt")
    log = tmp_path / "fits.log"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    return tmp_path, fake, log


def _make(folder: Path, fake: Path, *variables: str) -> list[str]:
    for prerequisite in (
        "pyproject.toml",
        "Makefile",
    ):  # the install stamp's, older than the stamp: no install
        (folder / prerequisite).touch()
    stamp = folder / "installed"
    time.sleep(0.02)
    stamp.touch()
    subprocess.run(
        [
            "make",
            "-s",
            "--no-print-directory",
            "-f",
            str(ROOT / "Makefile"),
            "train",
            f"PY={fake}",
            f"STAMP={stamp}",
            "TRAIN_RUNS=decoupled ica self_pairs",
            *variables,
        ],
        cwd=folder,
        check=True,
        capture_output=True,
        text=True,
    )
    log = folder / "fits.log"
    return log.read_text().splitlines() if log.exists() else []


def test_make_train_skips_finished_runs_and_resumes_interrupted_ones(study):
    folder, fake, log = study
    fits = _make(folder, fake)
    assert len(fits) == 2, fits  # decoupled is done: not run
    ica, self_pairs = fits
    assert ica.startswith("-m emojidiff.cli fit -c configs/ica.yaml")
    assert ica.endswith("--ckpt_path outputs/train/ica/version_1/checkpoints/last.ckpt")
    assert "-c configs/ablations/self_pairs.yaml" in self_pairs and "--ckpt_path" not in self_pairs


def test_train_force_starts_every_listed_run_afresh(study):
    folder, fake, log = study
    fits = _make(folder, fake, "TRAIN_FORCE=1")
    assert len(fits) == 3 and not any("--ckpt_path" in f for f in fits), fits
    assert fits[0].startswith("-m emojidiff.cli fit -c configs/decoupled.yaml")


def test_each_real_scale_run_folder_is_where_its_config_exports():
    """The skip marker of make train is RUN_DIR/model/train_record.json: for the SD1.5/SDXL runs,
    whose folders are not outputs/train/RUN, RUN_DIR/model must be the config's export_dir."""
    import re

    import yaml

    plan = subprocess.run(
        ["make", "-s", "--no-print-directory", "train-plan", "TRAIN_RUNS=sd15 sd15_ica sdxl sdxl_ica"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(plan) == 4
    for line in plan:
        name, run_dir, args = re.match(r"(\S+) \[(\S+)\]: (.*)", line).groups()
        export = None
        for c in re.findall(r"-c (\S+\.yaml)", args):  # the last config of the stack that sets it wins
            export = yaml.safe_load((ROOT / c).read_text())["model"]["init_args"].get("export_dir") or export
        assert export == f"{run_dir}/model", line


def test_parallel_jobs_wait_for_the_run_they_continue_from(tmp_path):
    """TRAIN_JOBS=2: a run starts only after the run whose export it continues from has ended, an
    unrelated run trains beside it, and each job gets the cores split between the jobs."""
    (tmp_path / "data/idi").mkdir(parents=True)
    (tmp_path / "data/idi/train-r1-000-000000.tar").write_bytes(b"")
    log = tmp_path / "events.log"
    fake = tmp_path / "fake_python"
    # the run's name is its -c config stack; each fit lasts 0.6 s
    fake.write_text(
        f'#!/bin/sh\nrun="$*"\necho "start $OMP_NUM_THREADS $run" >> {log}\nsleep 0.6\necho "end $run" >> {log}\n'
    )
    fake.chmod(0o755)
    _make(tmp_path, fake, "TRAIN_JOBS=2")
    events = [
        line.split(" -m emojidiff.cli fit ")[0] + " " + _run_of(line) for line in log.read_text().splitlines()
    ]
    order = [e.split()[0] + " " + e.split()[-1] for e in events]
    assert sorted(order) == sorted(
        f"{kind} {run}" for kind in ("start", "end") for run in ("decoupled", "ica", "self_pairs")
    )
    assert order.index("start ica") > order.index("end decoupled"), order
    assert order.index("start self_pairs") < order.index("end decoupled"), order  # side by side
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert all(e.split()[1] == str(threads) for e in events if e.startswith("start")), events


def _run_of(line: str) -> str:
    """The study run a recorded fit is, from its config stack."""
    if "ablations/self_pairs.yaml" in line:
        return "self_pairs"
    return "ica" if "configs/ica.yaml" in line else "decoupled"
