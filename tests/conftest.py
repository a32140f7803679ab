"""Suite-wide test settings and fixtures."""

import functools
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from skimage import data

# One intra-op thread: on a 2-core machine shared with other processes (CI, data workers),
# OpenMP threads that wait on each other made parts of the suite 20x slower.
torch.set_num_threads(1)


def _tiny_recognition_onnx(path, mxnet_style: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A random (N, 3, 112, 112) -> (N, 512) network: 8x8/8 conv, flatten, linear.

    mxnet_style: start the graph with Sub/Mul nodes that normalise inside, as insightface's
    mxnet-converted models do (its loader then feeds raw 0..255 pixels).
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (8, 3, 8, 8)).astype(np.float32)
    fc = rng.normal(0, 0.02, (512, 8 * 14 * 14)).astype(np.float32)
    bias = rng.normal(0, 0.1, (512,)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "conv_w"), (fc, "fc_w"), (bias, "fc_b"))]
    nodes, x = [], "input.1"
    if mxnet_style:
        inits += [
            numpy_helper.from_array(np.float32([127.5]), "mean"),
            numpy_helper.from_array(np.float32([1 / 128.0]), "scale"),
        ]
        nodes += [
            helper.make_node("Sub", [x, "mean"], ["centred"], name="_minus0"),
            helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mul0"),
        ]
        x = "scaled"
    nodes += [
        helper.make_node("Conv", [x, "conv_w"], ["conv"], kernel_shape=[8, 8], strides=[8, 8], name="Conv_0"),
        helper.make_node("Flatten", ["conv"], ["flat"], axis=1, name="Flatten_0"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["embedding"], transB=1, name="Gemm_0"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 512])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"conv_w": w, "fc_w": fc, "fc_b": bias}


@pytest.fixture(scope="session")
def tiny_recognition_onnx():
    """Writes a random ArcFace-shaped recognition ONNX: `(path, mxnet_style=False, seed=0) -> its weights`."""
    return _tiny_recognition_onnx


@functools.cache
def _photo(name: str) -> np.ndarray:
    if name == "astronaut":
        return data.astronaut()
    package = Path(next(iter(importlib.util.find_spec("insightface").submodule_search_locations)))
    return np.array(Image.open(package / "data" / "images" / name).convert("RGB"))


@pytest.fixture(scope="session")
def photo():
    """name -> uint8 (H, W, 3) RGB photo: "astronaut" (scikit-image's), or one of insightface's
    package images ("t1.jpg", "Tom_Hanks_54745.png")."""
    return _photo
