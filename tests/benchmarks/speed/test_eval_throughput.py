"""The evaluation throughput benchmark runs at toy size and reports every part (no timing asserted)."""

from benchmarks.speed.eval_throughput import main


def test_eval_throughput_reports_every_method_and_metric(tmp_path):
    result = main(["--rows", "4", "--steps", "2", "--threads", "1", "--out", str(tmp_path / "b.json")])
    assert set(result["generation_rows_per_s"]) == {
        "ground-truth",
        "vae-oracle",
        "emojidiff",
        "identity-only",
    }
    assert set(result["metric_rows_per_s"]) >= {"identity_similarity", "expression_error", "fid", "world_fd"}
    assert all(v > 0 for v in result["metric_rows_per_s"].values())
