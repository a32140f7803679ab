"""The IDI throughput benchmark runs end to end at toy size and reports every measurement (no timing asserted)."""

import json

from benchmarks.speed.idi_throughput import main


def test_idi_throughput_reports_generation_loader_and_train_step(tmp_path):
    out = tmp_path / "bench.json"
    result = main(
        [
            "--targets",
            "24",
            "--alterers",
            "[world-swap, world-resynth]",
            "--loader_targets",
            "48",
            "--loader_batches",
            "2",
            "--workers",
            "[0]",
            "--batch",
            "4",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert [g["alterer"] for g in result["generation"]] == ["world-swap", "world-resynth"]
    assert all(
        g["targets"] == 24 and 0 < g["accepted"] <= 24 and g["job_triplets_per_s"] > 0
        for g in result["generation"]
    )
    assert result["loader"][0]["workers"] == 0 and result["loader"][0]["ratio_to_train_step"] > 0
    assert json.loads(out.read_text())["train_step"]["batch"] == 4
