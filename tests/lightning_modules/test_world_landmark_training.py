"""lightning_modules.world_landmark_training: the world-lms detector's fit and its exported weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from emojidiff.cli import main as cli
from emojidiff.face.world_landmarks import WorldLandmarkDetector
from emojidiff.images import to_tensor
from emojidiff.world import Expression, Identity, render_batch
from emojidiff.world.landmarks import landmarks68

ROOT = Path(__file__).resolve().parents[2]


def _error_px(detector: WorldLandmarkDetector) -> float:
    """Mean point error (pixels of a 64 px portrait) on renders of unseen people, against the geometry."""
    ids = [Identity.sample(900_000 + k) for k in range(16)]
    exprs = [Expression.sample(910_000 + k) for k in range(16)]
    seeds = list(range(920_000, 920_016))
    images = to_tensor(render_batch(ids, exprs, "shaded", 64, seeds).images)
    with torch.no_grad():
        return float((detector(images) - landmarks68(ids, exprs, "shaded", 64, seeds)).norm(dim=-1).mean())


def test_a_short_fit_learns_the_landmarks_and_exports_weights_that_load(tmp_path) -> None:
    out = tmp_path / "landmarker"
    args = ["fit", "-c", str(ROOT / "configs/analysers/landmarker.yaml"), "--trainer.max_steps", "20"]
    args += ["--trainer.val_check_interval", "20", "--data.init_args.batch_size", "16"]
    args += ["--model.init_args.export_dir", str(out), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    assert cli(args) == 0
    trained = WorldLandmarkDetector(weights=out / "world_lms.safetensors")
    untrained = WorldLandmarkDetector(weights=None)
    assert not any(p.requires_grad for p in trained.parameters())  # packaged weights load frozen
    assert _error_px(trained) < 0.5 * _error_px(untrained)
    record = json.loads((out / "train_record.json").read_text())
    assert record["global_step"] == 20 and record["steps"] == 20
    assert {"val/lms_px", "val/lms_nme", "val/lms_px_jaw"} <= set(record["final_metrics"])
