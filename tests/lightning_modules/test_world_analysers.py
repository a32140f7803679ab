"""World analyser training (`lightning_modules.world_analysers`) and its held-out report: a short
fit lowers both losses and stops each network at its step count, the schedule, the report's
torchmetrics figures against hand-written references, the CLI's role presets, a whole tiny run."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import lightning as L
import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryEER

from emojidiff.face.world_models import (
    WorldEvalExpressionRegressor,
    WorldEvalIdentityEncoder,
    WorldIdentityEncoder,
)
from emojidiff.splits import ANALYSER_TRAIN_IDENTITIES, EVAL_ANALYSER_TRAIN_IDENTITIES
from lightning_modules.world_analyser_report import (
    expression_scores,
    pair_scores,
    score_agreement,
    verification,
)
from lightning_modules.world_analysers import (
    ROLES,
    AnalyserConfig,
    build_module,
    config_from_args,
    fit,
    run,
    warmup_cosine,
)

#: Small networks and batches: the recipe's code path at test speed.
TINY = AnalyserConfig(threads=1, batch=8, identities=(0, 4), id_lr=3e-3, expr_lr=2e-3, val_every=1000,
                      id_arch={"channels": [16, 32, 48]}, expr_arch={"channels": [16, 32, 48], "hidden": 64})


class _Recorder(L.Callback):
    """Per-step training losses, and the identity encoder's weights when its last step is done."""

    def __init__(self) -> None:
        self.losses: dict[str, list[float]] = {"train/id_loss": [], "train/expr_loss": []}
        self.id_state: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        for name, values in self.losses.items():
            if name in trainer.callback_metrics and (name != "train/id_loss" or trainer.global_step <= module.hparams.id_steps):
                values.append(float(trainer.callback_metrics[name]))
        if trainer.global_step == module.hparams.id_steps:
            self.id_state = {k: v.clone() for k, v in module.identity_encoder.state_dict().items()}


def test_short_fit_decreases_both_losses_and_stops_each_network_at_its_step_count() -> None:
    recorder = _Recorder()
    module, trainer = fit(replace(TINY, id_steps=30, expr_steps=40), progress=False, validate=False,
                          callbacks=[recorder])
    assert trainer.global_step == 40
    id_losses, expr_losses = recorder.losses["train/id_loss"], recorder.losses["train/expr_loss"]
    assert len(id_losses) == 30 and len(expr_losses) == 40
    for name, losses in (("identity", id_losses), ("expression", expr_losses)):
        assert all(np.isfinite(losses)), name
        assert np.mean(losses[-8:]) < np.mean(losses[:8]), (name, losses)
    # after its 30 steps the identity encoder is not run: no gradient, no AdamW update, no BN update
    assert recorder.id_state is not None
    for k, v in module.identity_encoder.state_dict().items():
        torch.testing.assert_close(v, recorder.id_state[k], msg=k)
    assert not module.identity_encoder.net.training and not module.expression_regressor.net.training


def test_validation_logs_torchmetrics_under_val() -> None:
    cfg = replace(TINY, id_steps=2, expr_steps=2, val_every=2)
    module, trainer = fit(cfg, progress=False)
    metrics = trainer.callback_metrics
    for key in ("val/id_eer", "val/expr_r2", "val/expr_mae"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["val/id_eer"]) <= 1.0


def test_each_network_follows_its_own_warmup_cosine_schedule() -> None:
    f = warmup_cosine(100, 0.05)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0) and f(5) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.02) and f(1000) == pytest.approx(0.02)
    assert f(52) == pytest.approx(0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    module = build_module(replace(TINY, id_steps=20, expr_steps=100))
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert [g["weight_decay"] for g in opt.param_groups] == [TINY.id_weight_decay, 0.0, TINY.expr_weight_decay]
    for _ in range(20):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(0.02 * TINY.id_lr) and lrs[1] == lrs[0]  # identity: done
    assert lrs[2] == pytest.approx(TINY.expr_lr * warmup_cosine(100, 0.05)(20))  # expression: mid-way


def _numpy_roc(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """Reference EER and TAR@FAR=1e-3 (accept score >= t; TAR at the best t with FAR <= 1e-3)."""
    thresholds = np.unique(np.concatenate([genuine, impostor]))
    far = np.array([(impostor >= t).mean() for t in thresholds])
    frr = np.array([(genuine < t).mean() for t in thresholds])
    i = int(np.argmin(np.abs(far - frr)))
    ok = far <= 1e-3
    return float((far[i] + frr[i]) / 2), float((1 - frr[ok]).max())


def test_verification_matches_binary_eer_and_a_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    emb = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(60, 8))).float(), dim=-1)
    ids = torch.arange(60) // 3
    emb = torch.nn.functional.normalize(emb + 1.2 * emb[ids * 3], dim=-1)  # same person: similar
    scores, same = pair_scores(emb, ids)
    assert scores.shape == same.shape == (60 * 59 // 2,) and int(same.sum()) == 20 * 3
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    out = verification(scores, same)
    s = scores.double().numpy()
    eer, tar = _numpy_roc(s[same.bool().numpy()], s[~same.bool().numpy()])
    assert out["eer"] == pytest.approx(eer, abs=1e-6)
    assert out["eer"] == pytest.approx(float(BinaryEER()(scores, same)), abs=1e-6)
    assert out["tar@far=0.001"] == pytest.approx(tar, abs=1e-6)
    cos = (emb @ emb.T)[torch.triu_indices(60, 60, 1).unbind()]
    assert out["genuine_mean"] == pytest.approx(float(cos[same.bool()].mean()), abs=1e-5)
    assert -1.0 <= out["eer_threshold"] <= 1.0


def test_expression_scores_and_agreement_match_their_formulas() -> None:
    rng = np.random.default_rng(1)
    target = rng.normal(size=(50, 10))
    pred = target + rng.normal(scale=0.3, size=(50, 10))
    out = expression_scores(torch.from_numpy(pred), torch.from_numpy(target))
    r2 = 1 - ((pred - target) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(list(out["r2"].values()), r2, rtol=1e-5)
    np.testing.assert_allclose(list(out["mae"].values()), np.abs(pred - target).mean(0), rtol=1e-5)
    a, b = torch.from_numpy(rng.normal(size=40)), torch.from_numpy(rng.normal(size=40))
    same = torch.arange(40) % 4 == 0
    agreement = score_agreement(a, a * 2 + 1, same)
    assert agreement["genuine"] == pytest.approx(1.0) and agreement["impostor"] == pytest.approx(1.0)
    mixed = score_agreement(a, b, same)["all"]
    assert mixed == pytest.approx(float(np.corrcoef(a.numpy(), b.numpy())[0, 1]), abs=1e-6)


def test_cli_roles_preset_and_explicit_options_win(tmp_path) -> None:
    cfg, out, install = config_from_args(["--out", str(tmp_path)])
    assert cfg == AnalyserConfig() and out == tmp_path and not install
    assert cfg.identities == ANALYSER_TRAIN_IDENTITIES and cfg.id_stem == "world_id"
    assert (cfg.id_steps, cfg.expr_steps, cfg.batch, cfg.degrade) == (1000, 3600, 64, 0.5)  # the recipe
    cfg, _, install = config_from_args(["--out", str(tmp_path), "--role", "eval", "--budget-minutes", "3",
                                        "--install", "--expr-steps", "7"])
    assert install and cfg.role == "eval" and cfg.budget_minutes == 3.0 and cfg.expr_steps == 7
    assert cfg.seed == ROLES["eval"]["seed"] != AnalyserConfig.seed
    assert cfg.identities == EVAL_ANALYSER_TRAIN_IDENTITIES and cfg.report_stem == "world_eval_report"
    module = build_module(replace(cfg, identities=(0, 4)))
    assert isinstance(module.identity_encoder, WorldEvalIdentityEncoder)
    assert isinstance(module.expression_regressor, WorldEvalExpressionRegressor)
    assert module.identity_encoder.net.config != WorldIdentityEncoder(weights=None).net.config


def test_a_tiny_eval_run_writes_weights_report_and_config(tmp_path) -> None:
    cfg = AnalyserConfig(role="eval", **{**ROLES["eval"], "identities": (500_000, 500_004)})
    cfg = replace(cfg, threads=1, id_steps=3, expr_steps=4, batch=8, val_every=4, eval_identities=6, eval_renders=6,
                  expr_eval_renders=3, val_identities=6, val_renders=6)
    report = run(cfg, tmp_path)
    for name in ("world_id_eval.safetensors", "world_id_eval.json", "world_expr_eval.safetensors",
                 "world_expr_eval.json", "report.json", "report.md", "config.json"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["seed"] == 1 and config["id_steps"] == 3 and config["id_net"]["input_size"] == 48
    meta = json.loads((tmp_path / "world_id_eval.json").read_text())
    assert meta["role"] == "evaluation" and meta["same_person_threshold"] == report["identity"]["at_threshold"]["threshold"]
    loaded = WorldEvalIdentityEncoder(tmp_path / "world_id_eval.safetensors")
    assert loaded.same_person_threshold == meta["same_person_threshold"]
    assert set(report["robustness"]) == {"clean", "blur0.8", "blur1.2", "down2"}
    assert set(report["agreement"]["expression"]["per_parameter"]) == set(report["expression"]["overall"]["r2"])
    text = (tmp_path / "report.md").read_text()
    assert "evaluation pair" in text and "## Robustness" in text and "## Agreement" in text


def test_calibrate_scales_both_step_counts_to_the_budget(capsys) -> None:
    from lightning_modules.world_analysers import calibrate

    cfg = calibrate(replace(TINY, id_steps=1000, expr_steps=3000, budget_minutes=0.5))
    assert 10 <= cfg.id_steps < 1000 and cfg.expr_steps == pytest.approx(3 * cfg.id_steps, rel=0.01)
    assert "calibrated" in capsys.readouterr().out
