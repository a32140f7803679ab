"""The ending the speed benchmarks share: print the tables, write the record as JSON, say where."""

from __future__ import annotations

import json
import platform
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console, RenderableType


def machine() -> dict[str, Any]:
    """What a CPU timing depends on: torch's version and thread count, the machine and processor."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, in bytes."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform == "darwin" else 1024)


def print_and_write(
    out: str | Path, record: Mapping[str, Any], *shown: RenderableType, width: int | None = None
) -> Path:
    """Print `shown` (rich tables, lines) and write `record` to `out` as indented JSON (its folder made).

    width: the console's least width, so that a wide table stays unwrapped in a narrow (or no) terminal.
    """
    console = Console(width=max(Console().width, width) if width else None)
    for item in shown:
        console.print(item)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"wrote {out}", highlight=False, markup=False)
    return out
