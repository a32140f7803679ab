"""The IDI job end to end on the embedded world: shards, keys, splits, report, resume after SIGKILL, two ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_gen.idi import main
from data_gen.shards import read_manifest
from emojidiff.splits import TEST_IDENTITIES, TEST_SEEDS, TRAIN_SEEDS, VAL_IDENTITIES, VAL_SEEDS, get_split
from emojidiff.triplet import REQUIRED_MEMBERS, decode_member, parse_sample_key, parse_shard_name

ROOT = Path(__file__).resolve().parents[2]


def job_args(out: Path, targets: int = 48, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "--out_dir",
        str(out),
        "--split",
        "train",
        "--round",
        "1",
        "--seed",
        "3",
        "--source",
        json.dumps({"name": "world", "init_args": {"num_targets": targets, "images_per_identity": 4}}),
        "--alterers",
        json.dumps(["world-swap", "world-resynth"]),
        "--templates_per_target",
        "2",
        "--self_pairs",
        "true",
        "--block_size",
        "8",
        "--num_workers",
        "0",
        "--progress",
        "false",
        *extra,
    ]


def shard_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member: bytes} over every shard in `out` (fails on a duplicate key)."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("*.tar")):
        parse_shard_name(path.name)
        seen_here: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                seen_here.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, members in seen_here.items():
            assert key not in samples, f"duplicate key {key} in {path.name}"
            samples[key] = members
    return samples


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("idi_ref")
    report = main(job_args(out))
    return out, report


def test_job_writes_complete_triplets_of_both_rounds(reference_run):
    out, report = reference_run
    samples = shard_samples(out)
    r0 = [k for k in samples if parse_sample_key(k)["round"] == 0]
    r1 = [k for k in samples if parse_sample_key(k)["round"] == 1]
    assert len(r0) == 48  # every target's self pair
    assert 0 < len(r1) <= 96 and len(r1) == report["summary"]["all"]["accepted"]
    for key in r1[:5] + r0[:5]:
        members = samples[key]
        assert set(REQUIRED_MEMBERS) <= set(members)
        meta = decode_member("json", members["json"])
        tgt, tmpl = (
            decode_member("tgt.png", members["tgt.png"]),
            decode_member("tmpl.png", members["tmpl.png"]),
        )
        assert tgt.shape == tmpl.shape == (64, 64, 3) and tgt.dtype == np.uint8
        emb = decode_member("id.npy", members["id.npy"])
        assert emb.dtype == np.float32 and emb.shape == (128,) and abs(np.linalg.norm(emb) - 1) < 1e-3
        assert meta["key"] == key and meta["prompt"].startswith("a portrait")
        gt = meta["ground_truth"]
        assert gt["target"]["identity_params"] == gt["reference"]["identity_params"]
        assert (
            len(gt["reference"]["expression"]) == 10
            and gt["reference"]["expression"] != gt["target"]["expression"]
        )
        if meta["round"] == 1:
            assert (
                meta["alterer"] in ("world-swap", "world-resynth")
                and meta["template"]["donor"] != meta["person"]
            )
            assert meta["scores"]["identity_similarity"] <= report["filters"]["identity_threshold_used"]
            assert meta["scores"]["expression_distance"] <= report["filters"]["max_expression_distance"]
        else:
            assert meta["alterer"] == "self" and gt["template"] == gt["target"]
    assert (out / "idi_config-train-r1.yaml").is_file() and "seed: 3" in (
        out / "idi_config-train-r1.yaml"
    ).read_text()


def test_report_counts_match_the_shards(reference_run):
    out, report = reference_run
    md = (out / "report-train-r1.md").read_text()
    assert "precision" in md and "world-swap" in md and "world-resynth" in md
    s = report["summary"]["all"]
    assert s["candidates"] == s["accepted"] + sum(s["rejected"].values())
    assert s["candidates"] >= 96  # 48 targets x 2 templates, plus re-made rejects
    assert report["samples"] == {"0": 48, "1": s["accepted"]}
    assert set(report["summary"]["by_alterer"]) == {"world-swap", "world-resynth"}
    q = report["summary"]["by_alterer"]["world-swap"]["filter_quality"]["expression"]
    assert q["base_rate"] == 1.0  # a world-swap template wears the target's exact expression
    assert any((out / f).is_file() for f in report["figures"])


def test_no_held_out_identity_or_seed_in_train_shards(reference_run):
    out, _ = reference_run
    train = get_split("train")
    for key, members in shard_samples(out).items():
        meta = json.loads(members["json"])
        src = meta["source"]
        assert (
            train.has_identity(src["identity"])
            and not TEST_IDENTITIES[0] <= src["identity"] < VAL_IDENTITIES[1]
        )
        seeds = [
            src["expression_seed"],
            src["scene_seed"],
            src["reference"]["expression_seed"],
            src["reference"]["scene_seed"],
        ]
        if "scene_seed" in meta["template"]:
            seeds.append(meta["template"]["scene_seed"])
        for s in seeds:
            assert TRAIN_SEEDS[0] <= s < TRAIN_SEEDS[1], (key, s)
            assert not (TEST_SEEDS[0] <= s < TEST_SEEDS[1] or VAL_SEEDS[0] <= s < VAL_SEEDS[1])
        if "donor" in meta["template"]:
            assert train.has_identity(int(meta["template"]["donor"]))


def test_rerun_of_a_finished_job_writes_nothing(reference_run, tmp_path):
    out, _ = reference_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    main(job_args(out))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before


def test_sigkill_then_restart_gives_exactly_the_uninterrupted_keys(reference_run, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "killed"
    out.mkdir()
    cmd = [sys.executable, "-m", "data_gen.idi", *job_args(out)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    manifest = out / "manifest-train-r1-000.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(read_manifest(out, "train", 1))
    assert (out / "idi_config-train-r1.yaml").is_file()  # the resolved config is there before the job ends
    assert 1 <= finished < 6, f"the kill should land mid-run ({finished} of 6 blocks finished)"
    main(job_args(out))
    killed, reference = shard_samples(out), shard_samples(ref_out)
    assert sorted(killed) == sorted(reference)
    assert all(killed[k]["tmpl.png"] == reference[k]["tmpl.png"] for k in reference)
    assert not list(out.glob(".tmp-*"))


def test_two_gloo_processes_write_disjoint_shards(reference_run, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "data_gen.idi",
        *job_args(out, extra=("--devices", "2", "--strategy", "ddp")),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    by_rank: dict[int, set[str]] = {0: set(), 1: set()}
    for path in out.glob("*.tar"):
        with tarfile.open(path) as tar:
            by_rank[parse_shard_name(path.name)["rank"]] |= {
                m.name.split(".", 1)[0] for m in tar.getmembers()
            }
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert sorted(by_rank[0] | by_rank[1]) == sorted(shard_samples(ref_out))
    assert (out / "report-train-r1.md").is_file()
