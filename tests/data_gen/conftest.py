"""Fixtures of the data_gen tests: real photos shipped in packages, random ONNX models of real layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# ------------------------------------------------------------------------------------ ONNX builders


def save_model(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_swapper_onnx(path: Path, seed: int = 0) -> np.ndarray:
    """A random graph of inswapper_128's signature: sigmoid(conv1x1(target) + reshape(source @ W)),
    with a random 512 x 512 `emap` as the LAST initializer (unused by the graph, as in inswapper).
    Returns the emap."""
    rng = np.random.default_rng(seed)
    emap = rng.normal(0, 1, (512, 512)).astype(np.float32)
    inits = [
        numpy_helper.from_array(rng.normal(0, 2.0, (3, 3, 1, 1)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.5, (512, 3)).astype(np.float32), "id_w"),
        numpy_helper.from_array(np.array([1, 3, 1, 1], np.int64), "bias_shape"),
        numpy_helper.from_array(emap, "emap"),
    ]
    nodes = [
        helper.make_node("Conv", ["target", "conv_w"], ["conv"], kernel_shape=[1, 1]),
        helper.make_node("Gemm", ["source", "id_w"], ["id_bias"]),
        helper.make_node("Reshape", ["id_bias", "bias_shape"], ["id_bias4"]),
        helper.make_node("Add", ["conv", "id_bias4"], ["pre"]),
        helper.make_node("Sigmoid", ["pre"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_inswapper",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        inits,
    )
    save_model(graph, path)
    return emap


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory, tiny_recognition_onnx) -> dict:
    """A random ArcFace-shaped recognition folder and a random inswapper_128-shaped ONNX (emap last)."""
    folder = tmp_path_factory.mktemp("onnx")
    (folder / "rec").mkdir()
    tiny_recognition_onnx(folder / "rec" / "w600k_r50.onnx")
    emap = tiny_swapper_onnx(folder / "inswapper_128.onnx")
    return {
        "swapper": folder / "inswapper_128.onnx",
        "encoder": {"name": "insightface-arcface", "init_args": {"model_dir": str(folder / "rec")}},
        "emap": emap,
    }
