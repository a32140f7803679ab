"""World analyser training (`lightning_modules.world_analyser_training`, the configs in
configs/analysers/) and its held-out report (`lightning_modules.world_analyser_report`): a short fit
lowers both losses and stops each network at its step count, the schedule, the report's torchmetrics
figures against hand-written references, the pairs' configs, the time budget, a whole tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryEER

from emojidiff.cli import lightning_cli
from emojidiff.cli import main as cli
from emojidiff.face.world_models import (
    WorldEvalExpressionRegressor,
    WorldEvalIdentityEncoder,
    WorldIdentityEncoder,
)
from emojidiff.options import parse_options
from emojidiff.splits import ANALYSER_TRAIN_IDENTITIES, EVAL_ANALYSER_TRAIN_IDENTITIES
from lightning_modules.world_analyser_budget import BudgetOptions, budget_overlay, calibrate
from lightning_modules.world_analyser_report import (
    ReportOptions,
    expression_scores,
    pair_scores,
    score_agreement,
    verification,
)
from lightning_modules.world_analyser_report import main as report_main
from lightning_modules.world_analyser_training import warmup_cosine

ROOT = Path(__file__).resolve().parents[2]
TRAIN_PAIR = ROOT / "configs/analysers/train_pair.yaml"
EVAL_PAIR = ROOT / "configs/analysers/eval_pair.yaml"

#: Small networks and batches: the recipe's code path at test speed (stacked on the pair's config).
TINY = """
model:
  init_args:
    identity_encoder: {init_args: {arch: {channels: [16, 32, 48]}}}
    expression_regressor: {init_args: {arch: {channels: [16, 32, 48], hidden: 64}}}
    cosface_head: {init_args: {num_classes: 4}}
    expr_lr: 2.0e-3
    export_dir: null
data:
  init_args: {identities: [0, 4], batch_size: 8}
"""


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    """The training pair's config with TINY stacked on it, as LightningCLI arguments."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return ["-c", str(TRAIN_PAIR), "-c", str(path)]


def _steps(id_steps: int, expr_steps: int) -> list[str]:
    return [
        "--model.init_args.id_steps",
        str(id_steps),
        "--model.init_args.expr_steps",
        str(expr_steps),
        "--trainer.max_steps",
        str(max(id_steps, expr_steps)),
    ]


def fit(args: list[str], validate: bool = True, callbacks: list[L.Callback] = ()):
    """The config's module, data and trainer (no logger), fit; returns the module and its trainer."""
    built = lightning_cli(
        [*args, "--trainer.logger", "false", *([] if validate else ["--trainer.limit_val_batches", "0"])],
        run=False,
    )
    built.trainer.callbacks.extend(callbacks)
    built.trainer.fit(built.model, datamodule=built.datamodule)
    return built.model, built.trainer


class _Recorder(L.Callback):
    """Per-step training losses, and the identity encoder's weights when its last step is done."""

    def __init__(self) -> None:
        self.losses: dict[str, list[float]] = {"train/id_loss": [], "train/expr_loss": []}
        self.id_state: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        for name, values in self.losses.items():
            if name in trainer.callback_metrics and (
                name != "train/id_loss" or trainer.global_step <= module.hparams.id_steps
            ):
                values.append(float(trainer.callback_metrics[name]))
        if trainer.global_step == module.hparams.id_steps:
            self.id_state = {k: v.clone() for k, v in module.identity_encoder.state_dict().items()}


def test_short_fit_decreases_both_losses_and_stops_each_network_at_its_step_count(tiny) -> None:
    recorder = _Recorder()
    module, trainer = fit([*tiny, *_steps(30, 40)], validate=False, callbacks=[recorder])
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


def test_validation_logs_torchmetrics_under_val(tiny) -> None:
    module, trainer = fit([*tiny, *_steps(2, 2), "--trainer.val_check_interval", "2"])
    metrics = trainer.callback_metrics
    for key in ("val/id_eer", "val/expr_r2", "val/expr_mae"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["val/id_eer"]) <= 1.0


def test_each_network_follows_its_own_warmup_cosine_schedule(tiny) -> None:
    f = warmup_cosine(100, 0.05)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0) and f(5) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.02) and f(1000) == pytest.approx(0.02)
    assert f(52) == pytest.approx(0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    module = lightning_cli([*tiny, *_steps(20, 100)], run=False).model
    hp = module.hparams
    assert (hp.id_lr, hp.expr_lr, hp.id_weight_decay, hp.expr_weight_decay) == (3e-3, 2e-3, 5e-4, 1e-4)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert [g["weight_decay"] for g in opt.param_groups] == [hp.id_weight_decay, 0.0, hp.expr_weight_decay]
    for _ in range(20):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(0.02 * hp.id_lr) and lrs[1] == lrs[0]  # identity: done
    assert lrs[2] == pytest.approx(hp.expr_lr * warmup_cosine(100, 0.05)(20))  # expression: mid-way


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


def test_pair_configs_hold_the_recipes_and_explicit_options_win(tmp_path) -> None:
    train = lightning_cli(["-c", str(TRAIN_PAIR)], run=False)
    module, data, trainer = train.model, train.datamodule, train.trainer
    hp = module.hparams
    assert tuple(data.hparams.identities) == ANALYSER_TRAIN_IDENTITIES and hp.id_stem == "world_id"
    assert (hp.id_steps, hp.expr_steps, data.hparams.batch_size, data.hparams.degrade) == (
        1000,
        3600,
        64,
        0.5,
    )  # the recipe
    assert (hp.id_lr, hp.id_weight_decay, hp.expr_lr, hp.expr_weight_decay, hp.expr_beta, hp.warmup) == (
        3e-3,
        5e-4,
        3e-3,
        1e-4,
        1.0,
        0.05,
    )
    assert trainer.max_steps == data.hparams.steps == 3600 and trainer.val_check_interval == 500
    assert module.cosface_head.weight.shape == (data.num_classes, module.identity_encoder.embedding_dim)
    assert (module.cosface_head.scale, module.cosface_head.margin) == (30.0, 0.25)
    assert train.config["seed_everything"] == 0 and data.hparams.seed == 0
    evaluation = lightning_cli(
        [
            "-c",
            str(TRAIN_PAIR),
            "-c",
            str(EVAL_PAIR),
            "--model.init_args.expr_steps",
            "7",
            "--trainer.max_steps",
            "7",
        ],
        run=False,
    )
    module, data = evaluation.model, evaluation.datamodule
    assert module.hparams.expr_steps == 7 and evaluation.trainer.max_steps == 7
    assert evaluation.config["seed_everything"] == data.hparams.seed == 1
    assert (
        tuple(data.hparams.identities) == EVAL_ANALYSER_TRAIN_IDENTITIES
        and module.hparams.id_stem == "world_id_eval"
    )
    assert isinstance(module.identity_encoder, WorldEvalIdentityEncoder)
    assert isinstance(module.expression_regressor, WorldEvalExpressionRegressor)
    assert module.identity_encoder.net.config != WorldIdentityEncoder(weights=None).net.config
    # the report and the budget: their configs and options
    options, _ = parse_options(
        ReportOptions,
        ["-c", str(ROOT / "configs/analysers/eval_pair_report.yaml"), "--install", "true"],
        prog="report",
    )
    assert options.install and options.report_stem == "world_eval_report"
    assert options.compare_with == ("world-id", "world-expr") and options.weights_dir == Path(
        "outputs/eval-analysers"
    )
    options, _ = parse_options(
        ReportOptions, ["-c", str(ROOT / "configs/analysers/train_pair_report.yaml")], prog="report"
    )
    assert not options.install and options.report_stem == "world_report" and options.compare_with is None
    assert (options.eval_identities, options.eval_renders, options.val_identities) == (200, 12, 100)
    budget, _ = parse_options(
        BudgetOptions, ["--configs+=a.yaml", "--minutes", "3", "--out", "b.yaml"], prog="budget"
    )
    assert budget.minutes == 3.0 and budget.configs == [Path("a.yaml")]


def test_the_run_must_have_the_modules_shape(tiny) -> None:
    with pytest.raises(ValueError, match=r"trainer.max_steps is 5: .*max\(2, 4\)"):
        fit([*tiny, *_steps(2, 4), "--trainer.max_steps", "5"], validate=False)
    with pytest.raises(ValueError, match="num_classes is 4, but data.init_args.identities holds 5"):
        fit([*tiny, *_steps(2, 4), "--data.init_args.identities", "[0, 5]"], validate=False)
    with pytest.raises(ValueError, match="cosface_head.init_args.dim is 64"):
        lightning_cli([*tiny, "--model.init_args.cosface_head.init_args.dim", "64"], run=False)


def test_a_tiny_eval_run_writes_weights_report_and_config(tmp_path) -> None:
    """`make eval-analysers`' fit and report on tiny step counts (the evaluation pair's architectures)."""
    overlay = tmp_path / "tiny_eval.yaml"
    overlay.write_text(f"""
trainer:
  max_steps: 4
  val_check_interval: 4
  logger: {{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {{save_dir: {tmp_path}}}}}
model:
  init_args: {{cosface_head: {{init_args: {{num_classes: 4}}}}, id_steps: 3, expr_steps: 4, export_dir: {tmp_path}}}
data:
  init_args: {{identities: [500000, 500004], batch_size: 8}}
""")
    fit_args = ["fit", "-c", str(TRAIN_PAIR), "-c", str(EVAL_PAIR), "-c", str(overlay)]
    assert cli(fit_args) == 0
    report = report_main(
        [
            "-c",
            str(ROOT / "configs/analysers/eval_pair_report.yaml"),
            "--weights_dir",
            str(tmp_path),
            "--eval_identities",
            "6",
            "--eval_renders",
            "6",
            "--expr_eval_renders",
            "3",
            "--val_identities",
            "6",
            "--val_renders",
            "6",
        ]
    )
    for name in (
        "world_id_eval.safetensors",
        "world_id_eval.json",
        "world_expr_eval.safetensors",
        "world_expr_eval.json",
        "report.json",
        "report.md",
        "train_record.json",
    ):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "train_record.json").read_text())
    assert config["seed"] == 1 and config["id_steps"] == 3 and config["id_net"]["input_size"] == 48
    assert config["command"] == "python -m emojidiff.cli " + " ".join(
        fit_args
    )  # the new entry point, recorded
    assert config["config"]["model"]["init_args"]["expr_stem"] == "world_expr_eval"  # the resolved config
    meta = json.loads((tmp_path / "world_id_eval.json").read_text())
    assert (
        meta["role"] == "evaluation"
        and meta["same_person_threshold"] == report["identity"]["at_threshold"]["threshold"]
    )
    loaded = WorldEvalIdentityEncoder(tmp_path / "world_id_eval.safetensors")
    assert loaded.same_person_threshold == meta["same_person_threshold"]
    assert set(report["robustness"]) == {"clean", "blur0.8", "blur1.2", "down2"}
    assert set(report["agreement"]["expression"]["per_parameter"]) == set(
        report["expression"]["overall"]["r2"]
    )
    text = (tmp_path / "report.md").read_text()
    assert "evaluation pair" in text and "## Robustness" in text and "## Agreement" in text
    assert config["command"] in text


def test_calibrate_scales_both_step_counts_to_the_budget(tiny, capsys) -> None:
    configs, overrides = (
        tiny[1::2],
        ["--model.init_args.id_steps", "1000", "--model.init_args.expr_steps", "3000"],
    )
    steps = calibrate(configs, 0.5, overrides=overrides)
    assert 10 <= steps["id_steps"] < 1000 and steps["expr_steps"] == pytest.approx(
        3 * steps["id_steps"], rel=0.01
    )
    assert "calibrated" in capsys.readouterr().out
    overlay = budget_overlay(configs, steps)  # the run follows the longer network
    assert overlay["trainer"]["max_steps"] == overlay["data"]["init_args"]["steps"] == steps["expr_steps"]
    assert overlay["trainer"]["val_check_interval"] == min(500, steps["expr_steps"])
