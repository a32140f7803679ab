"""Generation of the evaluation under `trainer.predict`: each rank generates its share of the
protocol rows for one method and writes them as PNGs, cached across runs.

    results/<run>/generations/<label>/{row_id:06d}.png     one per successful row
    results/<run>/generations/<label>/failures-{rank}.jsonl  {"row_id", "error"} per failed row
    results/<run>/generations/<label>/method.json          the method's description + protocol hash

A later run with the same method description and protocol reuses every row already written (a
metrics-only change regenerates nothing); a changed description regenerates the method.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from benchmarks.evaluation.methods import Method, load_inputs
from benchmarks.evaluation.protocol import ProtocolRow

METHOD_FILE = "method.json"


def protocol_hash(rows: Sequence[ProtocolRow], image_size: int) -> str:
    text = json.dumps([r.__dict__ for r in rows], sort_keys=True) + f"|{image_size}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_path(folder: Path, row_id: int) -> Path:
    return folder / f"{row_id:06d}.png"


def read_failures(folder: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for path in sorted(folder.glob("failures-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[int(rec["row_id"])] = rec["error"]
    return out


def done_rows(folder: Path, record: dict[str, Any]) -> set[int]:
    """Rows already generated (or failed) by a method with the same description; none otherwise."""
    meta = folder / METHOD_FILE
    if not meta.is_file() or json.loads(meta.read_text()) != record:
        return set()
    written = {int(p.stem) for p in folder.glob("[0-9]*.png")}
    return written | set(read_failures(folder))


def read_generation(folder: Path, row_id: int) -> np.ndarray | None:
    """uint8 (S, S, 3) RGB of a generated row, None when it failed or is missing."""
    path = image_path(folder, row_id)
    if not path.is_file():
        return None
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def chunk_for(rows: int, chunk: int, world_size: int) -> int:
    """A chunk size that gives every rank at least one chunk (Lightning's predict sampler does not pad)."""
    return max(1, min(chunk, math.ceil(rows / max(1, world_size))))


class RowChunks(Dataset):
    """Chunks of protocol rows (each a list of rows), one chunk per step. With fewer rows than
    `min_chunks`, the last row is repeated so every rank has a chunk (a repeat rewrites the same
    file and is counted once by the metrics, which keep each row id once)."""

    def __init__(self, rows: Sequence[ProtocolRow], chunk: int, min_chunks: int = 1):
        rows = list(rows)
        if rows and len(rows) < min_chunks:
            rows += [rows[-1]] * (min_chunks - len(rows))
        self.chunks = [rows[a : a + chunk] for a in range(0, len(rows), chunk)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> list[ProtocolRow]:
        return self.chunks[i]


def _no_collate(batch: list[list[ProtocolRow]]) -> list[ProtocolRow]:
    return batch[0]


class GenerationModule(L.LightningModule):
    """predict_step: a chunk of rows -> (rows, Generated) with the wrapped method."""

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Protocol rows stay on the host: a step moves the tensors it builds from them."""
        return batch

    def __init__(self, method: Method, image_size: int):
        super().__init__()
        self.method, self.image_size = method, image_size
        self.seconds = 0.0

    def on_predict_start(self) -> None:
        self.method.to(self.device)

    def predict_step(self, rows: list[ProtocolRow], batch_idx: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        inputs = load_inputs(rows, self.image_size)
        try:
            out = self.method.generate(inputs)
            errors = out.errors or [""] * len(rows)
        except Exception as err:  # a method that fails on a chunk: every row of it is a reported failure
            out = None
            errors = [f"{type(err).__name__}: {err}"] * len(rows)
        self.seconds += time.perf_counter() - t0
        return {"rows": rows, "out": out, "errors": errors}


class GenerationWriter(BasePredictionWriter):
    """Writes each row's PNG, or its failure, into the method's folder (each rank its own failures file)."""

    def __init__(self, folder: Path):
        super().__init__(write_interval="batch")
        self.folder = folder

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        rows, out, errors = prediction["rows"], prediction["out"], prediction["errors"]
        failures = self.folder / f"failures-{trainer.global_rank}.jsonl"
        for i, row in enumerate(rows):
            if out is not None and out.ok[i]:
                cv2.imwrite(
                    str(image_path(self.folder, row.row_id)), cv2.cvtColor(out.images[i], cv2.COLOR_RGB2BGR)
                )
            else:
                with open(failures, "a") as f:
                    f.write(json.dumps({"row_id": row.row_id, "error": errors[i] or "failed"}) + "\n")


def generate_method(
    label: str,
    method: Method,
    rows: Sequence[ProtocolRow],
    out_dir: Path,
    image_size: int,
    trainer_kwargs: dict[str, Any],
    chunk: int = 32,
) -> dict[str, Any]:
    """Generate the rows of `method` not cached yet; returns {"label", "generated", "cached", "seconds"}."""
    folder = out_dir / "generations" / label
    folder.mkdir(parents=True, exist_ok=True)
    record = {"method": method.describe(), "protocol": protocol_hash(rows, image_size)}
    done = done_rows(folder, record)
    if not done:  # a new or changed method: start its folder afresh
        for p in list(folder.glob("*.png")) + list(folder.glob("failures-*.jsonl")):
            p.unlink()
    (folder / METHOD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))  # a killed run resumes
    todo = [r for r in rows if r.row_id not in done]
    t0 = time.perf_counter()
    if todo:
        module = GenerationModule(method, image_size)
        trainer = L.Trainer(
            **trainer_kwargs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[GenerationWriter(folder)],
        )
        loader = DataLoader(
            RowChunks(todo, chunk_for(len(todo), chunk, trainer.world_size), trainer.world_size),
            batch_size=1,
            collate_fn=_no_collate,
        )
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        trainer.strategy.barrier("generated")
    return {
        "label": label,
        "generated": len(todo),
        "cached": len(rows) - len(todo),
        "seconds": time.perf_counter() - t0,
        "chunks": math.ceil(len(todo) / chunk),
    }
