"""benchmarks.evaluation.results_page: docs/results.md from an evaluation run, with verdicts from paired CIs."""

import json

import numpy as np
import pytest

from benchmarks.evaluation import results_page as page
from benchmarks.evaluation.results_page import (
    BEGIN,
    END,
    Ablation,
    Claim,
    PageSpec,
    main,
    verdict,
    write_page,
)
from benchmarks.evaluation.tables import summarise


@pytest.mark.parametrize(
    "expect, low, high, margin, want",
    [
        ("lower", -0.2, -0.1, 0, "holds"),
        ("lower", -0.1, 0.1, 0, "not resolved"),
        ("lower", 0.1, 0.2, 0, "does not hold"),
        ("higher", 0.1, 0.2, 0, "holds"),
        ("higher", -0.2, -0.1, 0, "does not hold"),
        ("not_higher", -0.01, 0.005, 0.01, "holds"),
        ("not_higher", 0.0, 0.02, 0.01, "not resolved"),
        ("not_higher", 0.02, 0.03, 0.01, "does not hold"),
        ("not_lower", -0.005, 0.01, 0.01, "holds"),
        ("lower", float("nan"), 0.1, 0, "not measured"),
    ],
)
def test_verdict_follows_the_confidence_interval(expect, low, high, margin, want):
    assert verdict(expect, low, high, margin) == want


def _eval_dir(tmp_path, n=60, seeds=False):
    """A fake evaluation: "good" has a lower expression error than "bad" on every row, equal identity.
    With `seeds`, "good" again as "good-s1" (lower error by 0.02 more) and "good-s2" (higher than "bad")."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, n)
    scores = {
        "good": {
            "expression_error": dict(enumerate(base - 0.05)),
            "identity_similarity": dict(enumerate(base)),
            "identity_leakage": dict(enumerate(base * 0)),
        },
        "bad": {
            "expression_error": dict(enumerate(base)),
            "identity_similarity": dict(enumerate(base)),
            "identity_leakage": dict(enumerate(base * 0 + rng.normal(0, 0.01, n))),
        },
    }
    fids = {"good": {"all": {"fid": 10.0}}, "bad": {"all": {"fid": 20.0}}}
    if seeds:
        scores["good-s1"] = {**scores["good"], "expression_error": dict(enumerate(base - 0.07))}
        scores["good-s2"] = {**scores["good"], "expression_error": dict(enumerate(base + 0.03))}
        fids |= {"good-s1": {"all": {"fid": 12.0}}, "good-s2": {"all": {"fid": 17.0}}}
    styles = {r: ("shaded", "cel")[r % 2] for r in range(n)}
    summary = summarise(scores, styles, {}, fids, 200)
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "report.json").write_text(json.dumps({"summary": summary, "rows": n, "seed": 0, "timings": {}}))
    as_json = {
        m: {k: {str(r): v for r, v in rows.items()} for k, rows in ms.items()} for m, ms in scores.items()
    }
    (ev / "scores.json").write_text(json.dumps({"scores": as_json, "failures": {}}))
    (ev / "eval_config.yaml").write_text("seed: 0\n")
    return ev


def test_page_has_tables_verdicts_and_keeps_the_prose_around_the_generated_block(tmp_path):
    ev = _eval_dir(tmp_path)
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    out.write_text(f"# Results\n\nProse before.\n\n{BEGIN}\nstale\n{END}\n\nProse after.\n")
    spec = PageSpec(
        eval_dir=ev,
        out=out,
        assets_dir=tmp_path / "docs" / "results",
        main=["good", "bad"],
        ablations=[Ablation("bad", "good", "worse on purpose")],
        claims=[
            Claim("good beats bad on expression", "good", "bad", "expression_error", "lower"),
            Claim("good beats bad on identity", "good", "bad", "identity_similarity", "higher"),
            Claim("bad beats good on expression", "bad", "good", "expression_error", "lower"),
        ],
        commands=["make eval"],
    )
    write_page(spec)
    text = out.read_text()
    assert text.startswith("# Results\n\nProse before.") and text.rstrip().endswith("Prose after.")
    assert "stale" not in text and text.count(BEGIN) == 1
    assert "### Main table (all styles)" in text and "### Style: cel" in text and "| good |" in text
    assert "| **bad**: worse on purpose | good | +0.000 [+0.000, +0.000] | +0.050 [+0.050, +0.050]" in text
    data = json.loads((spec.assets_dir / "results_page.json").read_text())
    assert [c["verdict"] for c in data["claims"]] == ["holds", "not resolved", "does not hold"]
    assert (spec.assets_dir / "eval_config.yaml").is_file()


def test_seed_spread_and_claims_judged_on_each_training_seed(tmp_path):
    ev = _eval_dir(tmp_path, seeds=True)
    spec = PageSpec(
        eval_dir=ev,
        out=tmp_path / "r.md",
        assets_dir=tmp_path / "a",
        main=["good", "bad"],
        claims=[
            Claim("good beats bad on expression", "good", "bad", "expression_error", "lower"),
            Claim("bad is no worse than bad", "bad", "bad", "expression_error", "not_higher", 0.01),
        ],
        seed_groups=[page.SeedGroup(["good", "good-s1", "good-s2"], [0, 1, 2])],
    )
    write_page(spec)
    data = json.loads((spec.assets_dir / "results_page.json").read_text())
    assert data["claims"][0]["verdict_by_seed"] == {"0": "holds", "1": "holds", "2": "does not hold"}
    assert data["claims"][1]["verdict_by_seed"] == {}  # neither side was trained with seeds
    errors = [
        np.mean(list(json.loads((ev / "scores.json").read_text())["scores"][m]["expression_error"].values()))
        for m in ("good", "good-s1", "good-s2")
    ]
    spread = data["seeds"][0]["spread"]
    assert spread["expression_error"]["sd"] == pytest.approx(np.std(errors, ddof=1), abs=1e-9)
    assert spread["expression_error"]["min"] == pytest.approx(min(errors), abs=1e-9)
    assert spread["fid"]["mean"] == pytest.approx(13.0) and spread["identity_similarity"][
        "sd"
    ] == pytest.approx(0.0, abs=1e-12)
    text = spec.out.read_text()
    assert "### Seed spread" in text and "| good-s2 | 2 |" in text and "**good across 3 seeds**" in text
    assert "0: holds, 1: holds, 2: does not hold" in text
    with pytest.raises(ValueError, match="one method per seed"):
        page.SeedGroup(["good", "good-s1"], [0])


def test_page_names_a_method_the_evaluation_lacks(tmp_path):
    ev = _eval_dir(tmp_path)
    spec = PageSpec(
        eval_dir=ev,
        out=tmp_path / "r.md",
        assets_dir=tmp_path / "a",
        main=["good"],
        claims=[Claim("x", "good", "ica", "expression_error", "lower")],
    )
    with pytest.raises(KeyError, match="ica"):
        write_page(spec)
    with pytest.raises(FileNotFoundError, match="report.json"):
        write_page(PageSpec(eval_dir=tmp_path / "none", out=tmp_path / "r.md", assets_dir=tmp_path / "a"))


def test_the_study_page_config_parses_with_every_claim_a_known_direction(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    with pytest.raises(FileNotFoundError, match="report.json"):
        main(["-c", str(root / "configs/eval/results_page.yaml"), "--eval_dir", str(tmp_path)])


def test_per_parameter_tables_show_each_parameters_error_and_the_paired_differences(tmp_path):
    """ "good" transfers every parameter but gaze_x better than "bad"; "old" has no per-parameter scores."""
    from benchmarks.evaluation.metrics import parameter_metric
    from benchmarks.evaluation.results_page import Contrast, PerParameter
    from emojidiff.world import Expression

    n, rng = 80, np.random.default_rng(1)
    ev = _eval_dir(tmp_path, n)
    scores = json.loads((ev / "scores.json").read_text())
    names = Expression.names()
    for label, level in (("good", 0.1), ("bad", 0.3)):
        per = {name: rng.uniform(0, 2 * level, n) for name in names}
        per["gaze_x"] = rng.uniform(0.4, 0.6, n)  # neither carries gaze
        for metric in ("expression_error", "expression_error_gt"):
            for name in names:
                scores["scores"][label][parameter_metric(metric, name)] = dict(enumerate(per[name].tolist()))
            scores["scores"][label][metric] = dict(enumerate(np.mean([per[x] for x in names], 0).tolist()))
    scores["scores"]["old"] = {"expression_error": scores["scores"]["bad"]["expression_error"]}
    (ev / "scores.json").write_text(json.dumps(scores))
    spec = PageSpec(
        eval_dir=ev,
        out=tmp_path / "r.md",
        assets_dir=tmp_path / "a",
        main=["good", "bad"],
        per_parameter=PerParameter(methods=["good", "bad", "old"], contrasts=[Contrast("good", "bad")]),
    )
    text = write_page(spec).read_text()
    assert (
        "per parameter" in text
        and "Not scored per parameter (records from before per-parameter scoring): old" in text
    )
    rows = {line.split(" | ")[0].strip("| *"): line for line in text.splitlines() if line.startswith("| ")}
    data = json.loads((tmp_path / "a" / "results_page.json").read_text())["per_parameter"]
    smile = data["contrasts"]["good - bad"]["smile"]
    assert smile["high"] < 0 and "**" in rows["smile"].split(" | ")[-1]  # resolved: in bold
    gaze = data["contrasts"]["good - bad"]["gaze_x"]
    assert gaze["low"] < 0 < gaze["high"]
    # the table's mean row is each method's overall error, and each cell the mean over rows
    cells = data["errors"]["expression_error_gt"]
    assert cells["good"]["smile"]["mean"] == pytest.approx(
        np.mean(list(scores["scores"]["good"][parameter_metric("expression_error_gt", "smile")].values()))
    )
    assert cells["bad"]["mean"]["mean"] == pytest.approx(
        np.mean(list(scores["scores"]["bad"]["expression_error_gt"].values()))
    )
