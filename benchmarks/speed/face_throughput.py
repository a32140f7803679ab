"""CPU throughput (images/s) of the real face-analysis backends.

    python -m benchmarks.speed.face_throughput [--threads 1] [--seconds 3] [--out outputs/bench/face_throughput.json]

Backends: dlib aligner (HOG detection + 5 landmarks + chip) on a 512x512 photo, dlib 128-d
encoder on 150x150 chips, dlib LMS expression analyser on a 512x512 photo, ArcFace ONNX (a
randomly initialised IResNet-50 exported to ONNX, the size of buffalo_l's w600k_r50) and the torch
IResNet-50 (random init) at batch 16, forward and forward+backward. Random weights run at the
same speed as trained ones; no weights are needed.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from skimage import data

from benchmarks.speed.report import print_and_write
from emojidiff.face import build_expression_analyser, build_face_aligner, build_identity_encoder
from emojidiff.face.arcface_torch import ArcFaceTorchEncoder, build_iresnet
from emojidiff.face.base import images_to_tensor
from emojidiff.face.insightface_backend import ArcFaceONNXEncoder
from emojidiff.options import parse_options


def timed(fn: Callable[[], object], batch: int, seconds: float) -> dict[str, float]:
    """Run `fn` (which processes `batch` images) once to warm up, then for ~`seconds`."""
    fn()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and runs >= 2:
            break
    per_image = elapsed / (runs * batch)
    return {"images_per_s": 1.0 / per_image, "ms_per_image": 1000.0 * per_image, "runs": runs}


def export_iresnet_onnx(arch: str, path: Path) -> None:
    """Random-init IResNet as an insightface-style recognition ONNX: input.1 (N,3,112,112) -> (N,512)."""
    net = build_iresnet(arch).eval()
    torch.onnx.export(  # the TorchScript exporter: the dynamo one needs onnxscript, not installed
        net,
        (torch.zeros(1, 3, 112, 112),),
        str(path),
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}},
        opset_version=13,
        dynamo=False,
    )


@dataclass
class FaceThroughputConfig:
    """The real face backends' CPU throughput.

    Args:
        threads: torch / onnxruntime intra-op threads.
        seconds: minimum timed seconds per backend.
        batch: batch of the network backends.
        out: the JSON record.
    """

    threads: int = 1
    seconds: float = 3.0
    batch: int = 16
    out: Path = Path("outputs/bench/face_throughput.json")


def main(argv: list[str] | None = None) -> None:
    args, _ = parse_options(FaceThroughputConfig, argv)
    torch.manual_seed(0)

    photo = data.astronaut()
    photo_t = images_to_tensor([photo])
    b = args.batch
    results: list[dict[str, object]] = []

    def record(backend: str, batch: int, input_desc: str, fn: Callable[[], object]) -> None:
        results.append(
            {"backend": backend, "batch": batch, "input": input_desc, **timed(fn, batch, args.seconds)}
        )

    aligner = build_face_aligner("dlib-chip")
    record("dlib-chip aligner (HOG + 5 pts + chip)", 1, "512x512 photo, 1 face", lambda: aligner.align(photo))

    chips = images_to_tensor([aligner.align(photo).crop] * b)
    dlib_encoder = build_identity_encoder("dlib")
    record("dlib encoder (ResNet 128-d)", b, "150x150 chips", lambda: dlib_encoder(chips))

    lms = build_expression_analyser("dlib-lms")
    record("dlib-lms analyser (HOG + 68 pts)", 1, "512x512 photo", lambda: lms(photo_t))

    crops = torch.rand(b, 3, 112, 112)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = Path(tmp) / "iresnet50.onnx"
        export_iresnet_onnx("iresnet50", onnx_file)
        onnx_encoder = ArcFaceONNXEncoder(model_file=onnx_file, num_threads=args.threads)
        record(
            "insightface-arcface ONNX (IResNet-50, random)", b, "112x112 crops", lambda: onnx_encoder(crops)
        )

        weights = Path(tmp) / "iresnet50.pth"
        torch.save(build_iresnet("iresnet50").state_dict(), weights)
        torch_encoder = ArcFaceTorchEncoder(weights, arch="iresnet50")

    def torch_forward() -> None:
        with torch.no_grad():
            torch_encoder(crops)

    def torch_backward() -> None:
        x = crops.clone().requires_grad_(True)
        torch_encoder(x).sum().backward()

    record("arcface-torch IResNet-50 forward", b, "112x112 crops", torch_forward)
    record("arcface-torch IResNet-50 forward+backward", b, "112x112 crops", torch_backward)

    report = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "results": results,
    }
    table = Table(title=f"face backends, CPU, {args.threads} thread(s)")
    for col in ("backend", "batch", "input", "images/s", "ms/image"):
        table.add_column(col, justify="right" if col in ("batch", "images/s", "ms/image") else "left")
    for r in results:
        table.add_row(
            str(r["backend"]),
            str(r["batch"]),
            str(r["input"]),
            f"{r['images_per_s']:.1f}",
            f"{r['ms_per_image']:.2f}",
        )
    print_and_write(args.out, report, table, width=120)


if __name__ == "__main__":
    main()
