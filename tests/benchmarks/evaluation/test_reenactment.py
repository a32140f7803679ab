"""The one-call ONNX reenactor and the two-stage method on file rows, on real photos, with small graphs of
the reenactor's signature (a fixed blend of the source and driving crops)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from benchmarks.evaluation.baselines.reenactment import Reenactor
from benchmarks.evaluation.methods import TwoStage, file_inputs
from benchmarks.evaluation.protocol import ProtocolRow, read_protocol, write_protocol
from emojidiff.errors import MissingWeightsError
from emojidiff.face import build_face_aligner
from emojidiff.face.dlib_backend import DlibLandmarker

SIDE = 128
#: The blend models return SOURCE_WEIGHT * source + (1 - SOURCE_WEIGHT) * driving.
SOURCE_WEIGHT = 0.25


def blend_onnx(
    path: Path, side: int | str = SIDE, names: tuple[str, str] = ("source", "driving"), rank: int = 4
) -> Path:
    """A graph `output = w * a + (1 - w) * b` of inputs `names`, shape [1, 3, side, side] (rank 4) or [1, 3]."""
    shape = [1, 3, side, side] if rank == 4 else [1, 3]
    inits = [
        numpy_helper.from_array(np.float32([SOURCE_WEIGHT]), "w"),
        numpy_helper.from_array(np.float32([1 - SOURCE_WEIGHT]), "w1"),
    ]
    nodes = [
        helper.make_node("Mul", [names[0], "w"], ["a"]),
        helper.make_node("Mul", [names[1], "w1"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "blend",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in names],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> Path:
    return blend_onnx(tmp_path_factory.mktemp("reenactor") / "blend.onnx")


@pytest.fixture(scope="module")
def photos(photo) -> dict[str, np.ndarray]:
    astronaut = photo("astronaut")
    return {
        "astronaut": astronaut,
        "astronaut_face": np.ascontiguousarray(astronaut[20:220, 120:320]),
        "hanks": photo("Tom_Hanks_54745.png"),
    }


def hull(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(landmarks).astype(np.int32)), 1)
    return mask


# ------------------------------------------------------------------------------------ the reenactor


def test_the_face_moves_toward_the_driving_face_and_nothing_else_changes(blend, photos):
    reenactor = Reenactor(blend, feather=4)
    image, template = photos["astronaut"], photos["hanks"]
    out, reason = reenactor.reenact(image, template)
    assert reason == "" and out.shape == image.shape and out.dtype == np.uint8

    # the crops: the FFHQ alignment of dlib's 68 points at the model's side (independently cut here)
    source, driving = reenactor.find_face(image), reenactor.find_face(template)
    np.testing.assert_array_equal(
        source.crop, build_face_aligner("dlib-ffhq", output_size=SIDE).align(image).crop
    )
    # the 112 px template is detected enlarged; its landmarks are mapped back onto its own pixels
    rect = DlibLandmarker(upsample=1).boxes(template)[0][0]
    direct = DlibLandmarker().shape(template, rect)
    assert np.abs(driving.detection.landmarks - direct).mean() < 2.0

    face = hull(source.detection.landmarks, image.shape[:2])
    far = cv2.dilate(face, np.ones((11, 11), np.uint8)) == 0
    changed = np.abs(out.astype(int) - image).max(-1) > 0
    assert not changed[far].any()  # outside the face (and its feathered edge): untouched
    inner = cv2.erode(face, np.ones((11, 11), np.uint8)) == 1
    assert changed[inner].mean() > 0.9

    # inside: the model's blend, warped back with the inverse crop transform
    expected = SOURCE_WEIGHT * source.crop.astype(np.float32) + (1 - SOURCE_WEIGHT) * driving.crop
    back = cv2.warpAffine(expected, cv2.invertAffineTransform(source.transform), image.shape[1::-1])
    assert np.abs(out[inner] - back[inner]).mean() < 1.0
    # ... so in the crop frame the face is ~SOURCE_WEIGHT of its old distance from the driving face
    crop_inner = cv2.erode(hull(source.landmarks, (SIDE, SIDE)), np.ones((7, 7), np.uint8)) == 1
    recrop = cv2.warpAffine(out, source.transform, (SIDE, SIDE)).astype(np.float32)
    before = np.abs(source.crop.astype(np.float32) - driving.crop)[crop_inner].mean()
    after = np.abs(recrop - driving.crop)[crop_inner].mean()
    assert before > 20 and after < 0.4 * before


def test_rows_without_a_face_fail_with_the_reason(blend, photos):
    reenactor = Reenactor(blend)
    face = photos["astronaut_face"]
    grey = np.full_like(face, 128)
    driving = cv2.resize(photos["hanks"], face.shape[1::-1])
    images, ok, errors = reenactor.reenact_batch(
        np.stack([face, grey, face]), np.stack([driving, driving, grey])
    )
    assert ok.tolist() == [True, False, False]
    assert errors[0] == "" and "generated image" in errors[1] and "expression template" in errors[2]
    assert not images[1:].any() and (images[0] != face).any()


def test_a_model_of_another_signature_is_refused_naming_the_file(tmp_path, photos):
    swapper_like = blend_onnx(tmp_path / "swapper_like.onnx", names=("target", "source"))
    with pytest.raises(ValueError, match=r"swapper_like\.onnx.*source \[1,3,S,S\] and driving.*got target"):
        Reenactor(swapper_like)
    flat = blend_onnx(tmp_path / "flat.onnx", rank=2)
    with pytest.raises(ValueError, match=r"flat\.onnx: not a reenactment model"):
        Reenactor(flat)
    with pytest.raises(ValueError, match=r"blend\.onnx: the model's crop side is 128, but size = 96"):
        Reenactor(blend_onnx(tmp_path / "blend.onnx"), size=96)
    dynamic = blend_onnx(tmp_path / "dynamic.onnx", side="S")
    with pytest.raises(ValueError, match=r"dynamic\.onnx: the model's crop side is dynamic.*reenactor_size"):
        Reenactor(dynamic)
    reenactor = Reenactor(dynamic, size=96)
    out, reason = reenactor.reenact(photos["astronaut_face"], photos["hanks"])
    assert (
        reenactor.size == 96
        and reason == ""
        and reenactor.find_face(photos["hanks"]).crop.shape == (96, 96, 3)
    )
    assert out.shape == photos["astronaut_face"].shape


def test_a_missing_model_names_the_config_key(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"`reenactor`.*nope\.onnx") as info:
        TwoStage(reenactor=str(tmp_path / "nope.onnx"), steps=2)
    assert info.value.key == "reenactor"
    with pytest.raises(MissingWeightsError, match="`reenactor` is not set"):
        Reenactor(None)


# ------------------------------------------------------------------------------------ two-stage on file rows


@pytest.fixture(scope="module")
def file_rows(tmp_path_factory, photos) -> list[ProtocolRow]:
    root = tmp_path_factory.mktemp("rows")
    Image.fromarray(photos["astronaut_face"]).save(root / "astronaut.png")
    Image.fromarray(photos["hanks"]).save(root / "hanks.png")
    # seeds whose identity-only portraits (untrained adapter, 64 px) hold a face dlib finds
    pairs = [(60, "astronaut.png", "hanks.png"), (61, "hanks.png", "astronaut.png")]
    rows = [
        ProtocolRow(
            row_id=i,
            kind="files",
            style="photo",
            prompt="a portrait photo of a person",
            seed=seed,
            ref_path=ref,
            tmpl_path=tmpl,
        )
        for i, (seed, ref, tmpl) in enumerate(pairs)
    ]
    return read_protocol(write_protocol(rows, root / "protocol.csv"))


def test_two_stage_reenacts_the_identity_only_portrait_on_file_rows(blend, file_rows):
    inputs = file_inputs(file_rows, 64)
    method = TwoStage(steps=2, reenactor=str(blend))
    assert method.describe()["reenactor"] == str(blend) and method.describe()["reenactor_size"] == SIDE
    first = method._generate(inputs, expr_scale=0.0)
    out = method.generate(inputs)
    assert out.images.shape == (2, 64, 64, 3) and out.images.dtype == np.uint8
    assert first.ok.all() and out.ok.sum() >= 1
    for i in range(2):  # each row: the reenactor on the first stage's image, or the reason it failed
        expected, reason = method.reenactor.reenact(first.images[i], inputs.templates[i])
        assert out.ok[i] == (expected is not None) and out.errors[i] == reason
        if out.ok[i]:
            np.testing.assert_array_equal(out.images[i], expected)
            assert (out.images[i] != first.images[i]).any()
        else:
            assert "no face" in reason and not out.images[i].any()


def test_two_stage_refuses_file_rows_without_a_reenactor(file_rows):
    method = TwoStage(steps=2)
    assert (
        "reenactor" not in method.describe()
    )  # world records (and their generation caches) stay as they were
    with pytest.raises(ValueError, match=r"methods\.<label>\.init_args\.reenactor"):
        method.generate(file_inputs(file_rows, 64))
