"""Learning curves: held-out identity similarity and expression error against step and wall time.

Record: `LearningCurve` is a Lightning callback for any training run (a config stack plus any
LightningCLI overrides). Every `every_n_steps` optimizer steps (and before the first and after the
last) it samples a fixed set of held-out validation rows with the model's EMA weights and scores
them with the *training* analysers (what the losses see) and the *evaluation* analysers (what the
tables use), appending one JSON line per measurement to `<log_dir>/curve.jsonl`:

    make curve CURVE=lora8 CURVE_ARGS="-c configs/decoupled.yaml --model.init_args.unet_lora.rank 8"

which is `python -m emojidiff.cli fit <CURVE_ARGS> --trainer.callbacks+=benchmarks.diagnostics.learning_curves.LearningCurve
...` with the run's logs, checkpoints and model folder under `outputs/curves/<CURVE>/`.

Draw: several runs on one figure (identity and expression against step and against training wall
time) with a markdown table:

    python -m benchmarks.diagnostics.learning_curves outputs/curves/stage1 outputs/curves/lora8 --out docs/train/curves

The rows: `validation_rows(n)`, n rows of the *val* split (never trained on, and apart from the
test split the tables use), built like the evaluation protocol: a held-out person, another held-out
person's expression as the template, an output style, each row's own seed. Wall time counts
training only (the measurements' own time is recorded apart), so curves of runs with different
measurement schedules compare.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.evaluation.methods import EvalInputs, sample_rows, world_inputs
from benchmarks.evaluation.metrics import ExpressionError, ExpressionErrorGT, IdentitySimilarity
from benchmarks.evaluation.protocol import ProtocolRow, world_protocol
from emojidiff.face.world_models import EVALUATION_ANALYSERS, TRAINING_ANALYSERS
from emojidiff.images import to_tensor
from emojidiff.options import parse_options
from emojidiff.plots import pyplot
from emojidiff.world import STYLES

log = logging.getLogger(__name__)

CURVE_FILE = "curve.jsonl"
RUN_FILE = "curve_run.json"
#: The measured figures: key -> (label, analyser role, higher is better).
FIGURES: dict[str, tuple[str, str, bool]] = {
    "eval_identity_similarity": ("ID sim. (eval)", "evaluation", True),
    "eval_expression_error": ("Expr. err. (eval)", "evaluation", False),
    "eval_expression_error_gt": ("Expr. err. GT (eval)", "evaluation", False),
    "train_identity_similarity": ("ID sim. (train)", "training", True),
    "train_expression_error": ("Expr. err. (train)", "training", False),
}


def validation_rows(n: int = 64, seed: int = 0) -> list[ProtocolRow]:
    """n fixed held-out rows from the val split: people x templates, one output style per pair in turn.

    Built from `world_protocol(split="val")` (identities x templates x styles) by keeping, of each
    (person, template) pair, the style `pair % 3`, so the styles are balanced and no pair repeats.
    """

    templates = 4
    people = -(-n // templates)
    rows = world_protocol(people, templates, seed=seed, split="val")
    k = len(STYLES)
    return [rows[pair * k + pair % k] for pair in range(n)]


class LearningCurve(Callback):
    """Held-out identity / expression measurements during training (see the module docstring).

    Args:
        every_n_steps: measure when the global step is a multiple of this (and at the start and end).
        rows: held-out validation rows (`validation_rows`).
        steps / guidance / scheduler: sampling, as the evaluation's defaults (30 DDIM steps, 5.0).
        batch_size: rows per pipeline call.
        at_start: measure before the first step (the starting point of a fine-tuning run).
        training_analysers / evaluation_analysers: {"identity": spec, "expression": spec}.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        rows: int = 64,
        steps: int = 30,
        guidance: float = 5.0,
        scheduler: str = "ddim",
        batch_size: int = 64,
        at_start: bool = True,
        training_analysers: Mapping[str, Any] | None = None,
        evaluation_analysers: Mapping[str, Any] | None = None,
    ):
        if every_n_steps < 1 or rows < 1:
            raise ValueError(f"every_n_steps and rows must be >= 1, got {every_n_steps}, {rows}")
        self.every_n_steps, self.n_rows, self.batch_size, self.at_start = (
            every_n_steps,
            rows,
            batch_size,
            at_start,
        )
        self.sampling = {"num_inference_steps": steps, "guidance_scale": guidance, "scheduler": scheduler}
        self.analysers = {
            "train": dict(training_analysers or TRAINING_ANALYSERS),
            "eval": dict(evaluation_analysers or EVALUATION_ANALYSERS),
        }
        self.train_seconds = 0.0  # training wall time before this process (restored on resume)
        self.measured_steps: list[int] = []
        self._inputs: EvalInputs | None = None
        self._scorers: dict[str, Any] = {}
        self._clock: float | None = None
        self._paused = 0.0

    # -- state (a resumed run continues its clock and does not measure a step twice) -------------

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.elapsed(), "measured_steps": list(self.measured_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.measured_steps = [int(s) for s in state_dict.get("measured_steps", [])]

    def elapsed(self) -> float:
        """Training wall seconds so far (this process's, less its measurements, plus a resumed run's)."""
        if self._clock is None:
            return self.train_seconds
        return self.train_seconds + time.perf_counter() - self._clock - self._paused

    # -- hooks ------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._inputs is None:
            size = int(pl_module.model_spec.image_size or pl_module.backbone.default_image_size)
            self._inputs = world_inputs(validation_rows(self.n_rows), size)
            self._scorers = {
                "train_identity_similarity": IdentitySimilarity(self.analysers["train"]["identity"]),
                "train_expression_error": ExpressionError(self.analysers["train"]["expression"]),
                "eval_identity_similarity": IdentitySimilarity(self.analysers["eval"]["identity"]),
                "eval_expression_error": ExpressionError(self.analysers["eval"]["expression"]),
                "eval_expression_error_gt": ExpressionErrorGT(self.analysers["eval"]["expression"]),
            }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock, self._paused = time.perf_counter(), 0.0
        if trainer.is_global_zero and trainer.log_dir:
            folder = Path(trainer.log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            record = {
                "argv": sys.argv,
                "every_n_steps": self.every_n_steps,
                "rows": self.n_rows,
                "sampling": self.sampling,
                "analysers": self.analysers,
            }
            (folder / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # at the start of the next batch, not the end of this one: Lightning runs callbacks' batch-end
        # hooks before the module's, where the EMA takes the step's weights
        step = trainer.global_step
        if step % self.every_n_steps == 0 and (step > 0 or self.at_start):
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(trainer, pl_module)

    # -- the measurement --------------------------------------------------------------------------

    @torch.no_grad()
    def scores(self, pipeline: Any) -> dict[str, float]:
        """Mean of each figure over the rows, for an `EmojiDiffPipeline`."""
        inputs = self._inputs
        assert inputs is not None, "setup() builds the rows"
        generated = sample_rows(pipeline, inputs, self.sampling, batch_size=self.batch_size)
        out, ids = to_tensor(generated.images), torch.tensor([r.row_id for r in inputs.rows])
        ok = torch.from_numpy(generated.ok)
        out, ids = out[ok], ids[ok]
        refs, tmpls = to_tensor(inputs.references)[ok], to_tensor(inputs.templates)[ok]
        params = torch.from_numpy(inputs.template_params)[ok]
        result = {}
        for key, metric in self._scorers.items():
            metric.reset()
            other = refs if "identity" in key else params if key.endswith("_gt") else tmpls
            metric.update(ids, out, other)
            result[key] = float(metric.compute())
        result["failed_rows"] = int((~ok).sum())
        return result

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = int(trainer.global_step)
        if step in self.measured_steps or trainer.sanity_checking:
            return
        trained = self.elapsed()
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            with pl_module.ema_weights():
                scores = self.scores(pl_module.pipeline())
        finally:
            pl_module.train(was_training)
        seconds = time.perf_counter() - start
        record = {
            "step": step,
            "epoch": int(trainer.current_epoch),
            "train_seconds": round(trained, 2),
            "measure_seconds": round(seconds, 2),
            **scores,
        }
        self._paused += seconds
        self.measured_steps.append(step)
        if trainer.is_global_zero:
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"curve/{k}": float(v) for k, v in scores.items()}, step=step)
            if trainer.log_dir:
                with open(Path(trainer.log_dir) / CURVE_FILE, "a") as f:
                    f.write(json.dumps(record) + "\n")
        log.info("learning curve at step %d: %s", step, {k: round(v, 3) for k, v in scores.items()})


# ------------------------------------------------------------------------------------------------
# reading and drawing


def read_curve(run: str | Path) -> list[dict[str, Any]]:
    """The measurements of a run folder (or a curve.jsonl), one per step (the last of repeats), by step."""
    path = Path(run)
    if path.is_dir():
        found = sorted(path.glob(f"**/{CURVE_FILE}"))
        if not found:
            raise FileNotFoundError(
                f"{path}: no {CURVE_FILE} below it (was the run started with LearningCurve?)"
            )
        path = found[-1]
    rows: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {n + 1} is not JSON: {err}") from None
            rows[int(rec["step"])] = rec
    return [rows[s] for s in sorted(rows)]


def parse_runs(specs: Sequence[str]) -> dict[str, Path]:
    """ "NAME=DIR" or "DIR" (named by the folder) -> {name: dir}."""
    runs = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=")
        path = Path(folder)
        runs[name or path.name] = path
    return runs


def curve_table(curves: Mapping[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per run and measured step (step, training minutes, every figure)."""
    head = ["run", "step", "train min"] + [FIGURES[k][0] for k in FIGURES]
    lines = [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |",
    ]
    for name, recs in curves.items():
        for r in recs:
            cells = [name, str(r["step"]), f"{r['train_seconds'] / 60:.1f}"]
            cells += [f"{r[k]:.3f}" if k in r else "-" for k in FIGURES]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_table(curves: Mapping[str, list[dict[str, Any]]]) -> str:
    """Markdown: each run's last measurement and its best evaluation identity (with its step)."""
    head = [
        "run",
        "steps",
        "train min",
        "ID sim. (eval)",
        "Expr. err. (eval)",
        "Expr. err. GT",
        "best ID sim. (step)",
    ]
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
    for name, recs in curves.items():
        last = recs[-1]
        best = max(recs, key=lambda r: r["eval_identity_similarity"])
        lines.append(
            f"| {name} | {last['step']} | {last['train_seconds'] / 60:.1f} | {last['eval_identity_similarity']:.3f} | "
            f"{last['eval_expression_error']:.3f} | {last['eval_expression_error_gt']:.3f} | "
            f"{best['eval_identity_similarity']:.3f} ({best['step']}) |"
        )
    return "\n".join(lines)


def draw(curves: Mapping[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Identity similarity and expression error (evaluation analysers solid, training dashed)
    against step (top) and training minutes (bottom), every run in its own colour."""
    plt = pyplot()

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    # the default cycle repeats after 10 runs; tab20 tells up to 20 apart
    colours = (
        plt.rcParams["axes.prop_cycle"].by_key()["color"]
        if len(curves) <= 10
        else list(plt.get_cmap("tab20").colors)
    )
    panels = [
        ("identity_similarity", "identity similarity (higher is better)"),
        ("expression_error", "expression error vs template (lower is better)"),
    ]
    for i, (name, recs) in enumerate(curves.items()):
        c = colours[i % len(colours)]
        for row, xkey in enumerate(("step", "train_seconds")):
            x = np.array([r[xkey] for r in recs], float) / (60.0 if xkey == "train_seconds" else 1.0)
            for col, (fig_key, _) in enumerate(panels):
                ax = axes[row][col]
                ax.plot(x, [r[f"eval_{fig_key}"] for r in recs], "-o", color=c, ms=3, label=name)
                ax.plot(x, [r[f"train_{fig_key}"] for r in recs], "--", color=c, alpha=0.5, lw=1)
    for col, (_, title) in enumerate(panels):
        axes[0][col].set_title(title, fontsize=10)
        axes[0][col].set_xlabel("optimizer step")
        axes[1][col].set_xlabel("training wall time (min, 2 CPU cores unless named)")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("held-out val rows: evaluation analysers (solid), training analysers (dashed)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs: Mapping[str, Path], out: str | Path, notes: str = "") -> tuple[Path, Path]:
    """`<out>.png` and `<out>.md` (final table, every measurement, the command of each run)."""
    curves = {name: read_curve(folder) for name, folder in runs.items()}
    out = Path(out)
    png = draw(curves, out.with_suffix(".png"))
    commands = []
    for name, folder in runs.items():
        found = sorted(Path(folder).glob(f"**/{RUN_FILE}")) if Path(folder).is_dir() else []
        argv = json.loads(found[-1].read_text())["argv"] if found else ["?"]
        commands.append(f"- `{name}`: `{' '.join(str(a) for a in argv)}`")
    md = out.with_suffix(".md")
    md.write_text(
        "# Learning curves\n\n"
        f"![curves]({png.name})\n\n"
        "Held-out val rows (`benchmarks.diagnostics.learning_curves.validation_rows`), sampled with the EMA weights "
        "(30 DDIM steps, guidance 5); evaluation analysers world-id-eval / world-expr-eval, training "
        "analysers world-id / world-expr. Wall time: training only, measurements excluded.\n\n"
        + (notes.strip() + "\n\n" if notes.strip() else "")
        + "## Last measurement of each run\n\n"
        + final_table(curves)
        + "\n\n"
        "## Every measurement\n\n" + curve_table(curves) + "\n\n"
        "## Commands\n\n" + "\n".join(commands) + "\n"
    )
    return png, md


@dataclass
class CurvesReportConfig:
    """Runs to draw on one figure with their tables.

    Args:
        runs: run folders (or NAME=FOLDER), each holding a curve.jsonl below it.
        out: writes OUT.png and OUT.md.
        notes: a markdown file whose text goes above the tables.
    """

    runs: list[str]
    out: Path = Path("docs/train/curves")
    notes: Path | None = None


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    args, _ = parse_options(CurvesReportConfig, argv, positional=["runs"])
    png, md = write_report(parse_runs(args.runs), args.out, args.notes.read_text() if args.notes else "")
    print(f"wrote {png} and {md}")
    return png, md


if __name__ == "__main__":
    main()
