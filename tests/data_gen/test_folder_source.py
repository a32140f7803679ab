"""The "folder" IDI source on real photos: layouts, alignment, references, and skipped files."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from data_gen.base import SOURCES
from data_gen.sources.folder import FolderSource, list_portraits

SIZE = 128


def save(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def nested(tmp_path_factory, photo) -> Path:
    """astronaut/ (two photos), hanks/ (one), a faceless photo and an unreadable .jpg at the top."""
    root = tmp_path_factory.mktemp("portraits")
    astronaut = data.astronaut()
    save(root / "astronaut" / "a.png", astronaut)
    save(
        root / "astronaut" / "b.jpg", np.ascontiguousarray(astronaut[20:480, 40:500][:, ::-1])
    )  # cropped, mirrored
    save(root / "hanks" / "tom.png", photo("Tom_Hanks_54745.png"))
    save(root / "coffee.png", data.coffee())
    (root / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "notes.txt").write_text("not an image")
    return root


def test_listing_is_sorted_and_groups_persons(nested):
    listing = [(rel.as_posix(), person) for rel, person in list_portraits(nested)]
    assert listing == [
        ("astronaut/a.png", "astronaut"),
        ("astronaut/b.jpg", "astronaut"),
        ("broken.jpg", "broken"),
        ("coffee.png", "coffee"),
        ("hanks/tom.png", "hanks"),
    ]


def test_load_gives_aligned_targets_and_reports_bad_files(nested, caplog):
    source = SOURCES.build({"name": "folder", "init_args": {"root": str(nested), "size": SIZE}})
    assert isinstance(source, FolderSource) and len(source) == 5 and not source.world and source.size == SIZE
    with caplog.at_level(logging.WARNING, logger="data_gen.sources.folder"):
        t = source.load(range(5))
    assert t.indices.tolist() == [0, 1, 4] and t.persons == ["astronaut", "astronaut", "hanks"]
    assert t.images.shape == (3, SIZE, SIZE, 3) and t.images.dtype == np.uint8
    assert t.references.shape == t.images.shape and t.references.dtype == np.uint8
    assert t.masks.shape == (3, SIZE, SIZE) and t.masks.dtype == np.float32
    assert set(np.unique(t.masks)) <= {0.0, 1.0}
    area = t.masks.mean(axis=(1, 2))
    assert ((area > 0.15) & (area < 0.7)).all()  # the landmark hull of an FFHQ crop
    assert t.prompts == ["a portrait photo of a person"] * 3
    assert t.identity_params is None and t.expression_params is None
    # both bad files are skipped with their paths and reasons, and the log names them
    skipped = {Path(name).name: (index, reason) for index, name, reason in t.skipped}
    assert set(skipped) == {"broken.jpg", "coffee.png"}
    assert skipped["broken.jpg"][0] == 2 and "cannot be read" in skipped["broken.jpg"][1]
    assert skipped["coffee.png"][0] == 3 and "no face" in skipped["coffee.png"][1]
    assert str(nested / "broken.jpg") in caplog.text and str(nested / "coffee.png") in caplog.text


def test_references_are_the_same_persons_other_photo(nested):
    t = FolderSource(nested, size=SIZE).load([0, 1, 4])
    np.testing.assert_array_equal(t.references[0], t.images[1])  # astronaut a <- b
    np.testing.assert_array_equal(t.references[1], t.images[0])  # astronaut b <- a
    np.testing.assert_array_equal(t.references[2], t.images[2])  # hanks has one photo: itself
    assert [m["reference_path"] for m in t.meta] == ["astronaut/b.jpg", "astronaut/a.png", "hanks/tom.png"]
    assert [m["path"] for m in t.meta] == ["astronaut/a.png", "astronaut/b.jpg", "hanks/tom.png"]
    assert all(isinstance(m["detection_score"], float) and m["detection_score"] > 0 for m in t.meta)
    assert not (t.images[0] == t.images[1]).all()  # the mirrored crop is another photo
    same = FolderSource(nested, size=SIZE, reference="target").load([0])
    np.testing.assert_array_equal(same.references[0], same.images[0])
    assert same.meta[0]["reference_path"] == "astronaut/a.png"


def test_landmarks5_are_arcface_points_in_the_crop(nested):
    t = FolderSource(nested, size=SIZE).load([0, 4])
    lm = t.landmarks5
    assert lm is not None and lm.shape == (2, 5, 2) and lm.dtype == np.float32
    assert ((lm > 0) & (lm < SIZE)).all()
    assert (lm[:, 0, 0] < lm[:, 2, 0]).all() and (
        lm[:, 2, 0] < lm[:, 1, 0]
    ).all()  # eyes either side of the nose
    assert (lm[:, 3:, 1].min(1) > lm[:, 2, 1]).all()  # mouth corners below the nose tip
    assert (
        t.masks[np.arange(2)[:, None], lm[..., 1].round().astype(int), lm[..., 0].round().astype(int)] == 1
    ).all()
    assert len(t.subset([1]).landmarks5) == 1


def test_same_index_same_target_in_any_batch(nested):
    source = FolderSource(nested, size=SIZE)
    alone, batch = source.load([4]), source.load([1, 4, 0])
    np.testing.assert_array_equal(alone.images[0], batch.images[1])
    np.testing.assert_array_equal(alone.references[0], batch.references[1])
    clone = pickle.loads(pickle.dumps(source))  # workers get a copy; its aligner is rebuilt there
    np.testing.assert_array_equal(clone.load([4]).images[0], alone.images[0])


def test_unusable_reference_falls_back_to_the_target(tmp_path, caplog):
    save(tmp_path / "p" / "1.png", data.astronaut())
    save(tmp_path / "p" / "2.png", np.full((200, 200, 3), 128, np.uint8))  # no face
    source = FolderSource(tmp_path, size=SIZE, prompt="a photo")
    with caplog.at_level(logging.WARNING, logger="data_gen.sources.folder"):
        t = source.load([0, 1])
    assert t.indices.tolist() == [0] and t.prompts == ["a photo"]
    np.testing.assert_array_equal(t.references[0], t.images[0])
    assert "p/2.png" in t.meta[0]["reference_error"] and t.meta[0]["reference_path"] == "p/1.png"
    assert [Path(name).name for _, name, _ in t.skipped] == ["2.png"]
    assert str(tmp_path / "p" / "2.png") in caplog.text


def test_flat_layout_each_file_is_a_person(tmp_path, photo):
    save(tmp_path / "astronaut.png", data.astronaut())
    save(tmp_path / "tom.png", photo("Tom_Hanks_54745.png"))
    t = FolderSource(tmp_path, size=64).load([0, 1])
    assert t.persons == ["astronaut", "tom"] and t.images.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(t.references, t.images)


def test_empty_and_missing_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no images"):
        FolderSource(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        FolderSource(tmp_path / "nope")
    save(tmp_path / "grey.png", np.full((64, 64, 3), 100, np.uint8))
    t = FolderSource(tmp_path, size=64).load([0])
    assert len(t) == 0 and t.images.shape == (0, 64, 64, 3) and t.landmarks5 is None and len(t.skipped) == 1
    with pytest.raises(IndexError, match="out of range"):
        FolderSource(tmp_path).load([1])
