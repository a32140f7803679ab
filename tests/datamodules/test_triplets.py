"""TripletDataModule: IDI triplet shards -> batches, seeded, rank-split, robust to bad shards."""

from __future__ import annotations

import importlib
import json
import pickle
import re
import tarfile
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds

from datamodules.shards import count_samples, list_shards
from datamodules.triplets import (
    NO_CONDITION_DROP,
    CorruptShardError,
    TripletDataModule,
    TripletStatsLogger,
    cfg_dropout,
)
from emojidiff.triplet import encode_triplet, sample_key, shard_name

SIDE = 8  # image_size of the batches; shards hold 16 x 24 images, so every image is cropped and shrunk


def arrays(index: int, mask: bool = False) -> dict:
    """The decoded content of sample `index`: random 16 x 24 RGB images, an optional mask, an 8-d embedding."""
    rng = np.random.default_rng(index)
    images = [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(3)]
    return {
        "target": images[0],
        "reference": images[1],
        "template": images[2],
        "meta": {"prompt": f"portrait {index}", "index": index},
        "identity_embedding": rng.standard_normal(8).astype(np.float32),
        "template_mask": rng.integers(0, 2, (16, 24), dtype=np.uint8) if mask else None,
    }


def triplet(index: int, mask: bool = False) -> dict:
    """The encoded sample of `index` (see `arrays`)."""
    return encode_triplet(sample_key("train", 1, index), **arrays(index, mask))


def write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def write_dataset(
    folder: Path, shards: int = 4, per_shard: int = 8, ranks: int = 1, masks: bool = False
) -> list[str]:
    """`shards` shards named train-r1-RANK-N.tar (split evenly over `ranks` writer ranks)."""
    folder.mkdir(parents=True, exist_ok=True)
    per_rank = shards // ranks
    return [
        write_shard(
            folder / shard_name("train", 1, i // per_rank, i % per_rank),
            [triplet(i * per_shard + j, mask=masks and j % 2 == 0) for j in range(per_shard)],
        )
        for i in range(shards)
    ]


def datamodule(shards, **overrides) -> TripletDataModule:
    options = dict(
        train_shards=shards,
        val_shards=shards,
        batch_size=4,
        num_workers=0,
        image_size=SIDE,
        shuffle_buffer=8,
        seed=0,
        **NO_CONDITION_DROP,
    )
    return TripletDataModule(**(options | overrides))


def epochs(loader, n: int = 1) -> list[list[dict]]:
    return [list(loader) for _ in range(n)]


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def expected_image(stored: np.ndarray) -> torch.Tensor:
    """Independent reference: centre 16 x 16 crop, INTER_AREA to SIDE, [-1, 1], (3, SIDE, SIDE)."""
    crop = stored[:, 4:20]
    return (
        torch.from_numpy(cv2.resize(crop, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
        .permute(2, 0, 1)
        .float()
        / 127.5
        - 1
    )


def test_batches_have_the_contract_shapes_ranges_and_values(tmp_path):
    shards = write_dataset(tmp_path, shards=2, masks=True)
    batches = list(datamodule(shards).make_loader("val"))
    assert [len(b["key"]) for b in batches] == [4, 4, 4, 4]
    b = batches[0]
    for name in ("tgt", "ref", "tmpl"):
        assert b[name].shape == (4, 3, SIDE, SIDE) and b[name].dtype == torch.float32
        assert b[name].min() >= -1 and b[name].max() <= 1
    assert b["tmpl_mask"].shape == (4, 1, SIDE, SIDE) and b["tmpl_mask"].dtype == torch.float32
    assert b["id_embed"].shape == (4, 8) and b["id_embed"].dtype == torch.float32
    assert b["key"] == [sample_key("train", 1, i) for i in range(4)]
    assert b["prompt"] == [f"portrait {i}" for i in range(4)] and b["meta"][2] == {
        "prompt": "portrait 2",
        "index": 2,
    }
    for flag in ("drop_text", "drop_id", "drop_expr"):
        assert b[flag].dtype == torch.bool and b[flag].shape == (4,)
    one, two = arrays(1), arrays(2, mask=True)  # odd samples have no tmpl_mask.png
    assert torch.allclose(b["tgt"][1], expected_image(one["target"]), atol=1e-5)
    assert torch.allclose(b["tmpl"][2], expected_image(two["template"]), atol=1e-5)
    assert torch.equal(b["id_embed"][1], torch.from_numpy(one["identity_embedding"]))
    assert torch.equal(b["tmpl_mask"][1], torch.ones(1, SIDE, SIDE))
    crop = two["template_mask"][:, 4:20].astype(np.float32)
    reference_mask = torch.from_numpy(cv2.resize(crop, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
    assert torch.allclose(b["tmpl_mask"][2, 0], reference_mask, atol=1 / 255)


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        (dict(drop_text=0.0, drop_id=0.0, drop_expr=0.0, drop_all=0.0), False),
        (dict(drop_text=1.0, drop_id=1.0, drop_expr=1.0, drop_all=0.0), True),
        (dict(drop_text=0.0, drop_id=0.0, drop_expr=0.0, drop_all=1.0), True),
    ],
)
def test_dropout_masks_follow_the_rates(tmp_path, rates, expected):
    batches = list(datamodule(write_dataset(tmp_path, shards=2), **rates).make_loader("train"))
    for flag in ("drop_text", "drop_id", "drop_expr"):
        masks = torch.cat([b[flag] for b in batches])
        assert masks.shape == (16,) and bool(masks.all() if expected else not masks.any())


def test_cfg_dropout_is_deterministic_per_key_and_matches_the_rates():
    rates = {"text": 0.05, "id": 0.2, "expr": 0.0, "all": 0.05}
    draws = [cfg_dropout(sample_key("train", 1, i), seed=7, epoch=0, rates=rates) for i in range(4000)]
    assert draws[:50] == [
        cfg_dropout(sample_key("train", 1, i), seed=7, epoch=0, rates=rates) for i in range(50)
    ]
    assert draws[:50] != [
        cfg_dropout(sample_key("train", 1, i), seed=7, epoch=1, rates=rates) for i in range(50)
    ]
    share = {flag: np.mean([d[flag] for d in draws]) for flag in ("drop_text", "drop_id", "drop_expr")}
    assert share["drop_text"] == pytest.approx(1 - 0.95 * 0.95, abs=0.015)
    assert share["drop_id"] == pytest.approx(1 - 0.8 * 0.95, abs=0.02)
    assert share["drop_expr"] == pytest.approx(0.05, abs=0.012)
    assert all(
        d["drop_expr"] <= (d["drop_text"] and d["drop_id"]) for d in draws
    )  # expr only ever drops with all


def test_missing_prompt_reads_as_empty_string(tmp_path):
    content = arrays(0)
    content["meta"] = {"round": 1}
    shard = write_shard(tmp_path / "a.tar", [encode_triplet(sample_key("train", 1, 0), **content)])
    (batch,) = datamodule(shard).make_loader("val")
    assert batch["prompt"] == [""] and batch["meta"] == [{"round": 1}]


@pytest.mark.parametrize("workers", [0, 1])
def test_same_seed_gives_same_batches(tmp_path, workers):
    shards = write_dataset(tmp_path, shards=4)
    rates = dict(drop_text=0.5, drop_id=0.5, drop_expr=0.5, drop_all=0.1)

    def run(seed: int, num_workers: int, n: int = 2) -> list[list[dict]]:
        return epochs(datamodule(shards, seed=seed, num_workers=num_workers, **rates).make_loader("train"), n)

    first, again = run(3, workers), run(3, workers)
    for a, b in zip(first, again, strict=True):
        assert keys(a) == keys(b)
        for name in ("tgt", "tmpl_mask", "id_embed", "drop_text", "drop_id", "drop_expr"):
            assert all(torch.equal(x[name], y[name]) for x, y in zip(a, b, strict=True))
    assert len(first[0]) == 8 and keys(first[0]) != keys(first[1])  # each epoch its own order
    assert keys(run(4, workers, n=1)[0]) != keys(first[0])
    if workers:
        assert [keys(e) for e in run(3, 0)] == [keys(e) for e in first]


def corrupt_dataset(folder: Path, marker: Path) -> list[str]:
    """Three shards of 8 samples holding, in order:
    good-0: sample 1 tgt.png is not an image, sample 2 tgt.png is cut in half, sample 3 carries a
            .pickle (that would create `marker` if unpickled) and a .pyd, sample 4 lacks tmpl.png;
    cut-1:  a tar cut inside sample 13's ref.png (12, the ones before, are whole);
    good-2: eight good samples.
    """

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder.mkdir()
    first = [triplet(i) for i in range(8)]
    first[1]["tgt.png"] = b"this is not a png"
    first[2]["tgt.png"] = first[2]["tgt.png"][: len(first[2]["tgt.png"]) // 2]
    first[3]["pickle"] = pickle.dumps(Payload())
    first[3]["pyd"] = b"MZ\x90\x00 not a module"
    del first[4]["tmpl.png"]
    cut = write_shard(folder / "cut-1.tar", [triplet(i) for i in range(8, 16)])
    with tarfile.open(cut) as tar:
        offset = tar.getmember(sample_key("train", 1, 13) + ".ref.png").offset_data
    Path(cut).write_bytes(Path(cut).read_bytes()[: offset + 100])
    return [
        write_shard(folder / "good-0.tar", first),
        cut,
        write_shard(folder / "good-2.tar", [triplet(i) for i in range(16, 24)]),
    ]


def test_corrupt_truncated_and_unsafe_members_are_skipped_and_counted(tmp_path):
    marker = tmp_path / "unpickled"
    shards = corrupt_dataset(tmp_path / "shards", marker)
    dm = datamodule(shards, max_corrupt_fraction=None)
    batches = list(dm.make_loader("val"))
    assert not marker.exists()
    assert keys(batches) == [
        sample_key("train", 1, i) for i in [0, 3, 5, 6, 7, *range(8, 13), *range(16, 24)]
    ]
    expected = {
        "samples": 18,
        "skipped_samples": 4,
        "filtered_samples": 0,
        "corrupt_members": 2,
        "unsafe_members": 2,
        "shard_errors": 1,
    }
    assert dm.stats("val") == expected
    assert {k: batches[-1]["stats"][k] for k in expected} == expected


def test_max_identity_similarity_leaves_out_templates_too_like_the_target(tmp_path):
    similarity = {i: (i % 5) / 4 for i in range(16)}  # 0, .25, .5, .75, 1, 0, ...
    samples = []
    for i in range(16):
        a = arrays(i)
        a["meta"]["scores"] = {"identity_similarity": similarity[i]}
        samples.append(encode_triplet(sample_key("train", 1, i), **a))
    unscored = encode_triplet(sample_key("train", 1, 16), **arrays(16))
    shards = [
        write_shard(tmp_path / "a.tar", samples[:8]),
        write_shard(tmp_path / "b.tar", [*samples[8:], unscored]),
    ]
    allowed = sorted(sample_key("train", 1, i) for i in range(16) if similarity[i] <= 0.5)
    # counted epoch: every passing triplet exactly once
    dm = datamodule(shards, max_identity_similarity=0.5, batch_size=1, max_corrupt_fraction=None)
    assert sorted(keys(list(dm.make_loader("train")))) == allowed
    stats = dm.stats("train")
    assert (stats["filtered_samples"], stats["skipped_samples"]) == (
        sum(v > 0.5 for v in similarity.values()),
        1,
    )
    # resampled epoch: only passing triplets, as many as asked for
    dm = datamodule(
        shards,
        max_identity_similarity=0.5,
        batch_size=1,
        max_corrupt_fraction=None,
        resampled=True,
        samples_per_epoch=60,
    )
    train = keys(list(dm.make_loader("train")))
    assert len(train) == 60 and sorted(set(train)) == allowed
    assert len(keys(list(dm.make_loader("val")))) == 17  # evaluation stages read every triplet


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_failures_raise_naming_the_shard(tmp_path, workers):
    good = write_shard(tmp_path / "good.tar", [triplet(i) for i in range(8)])
    bad_samples = [triplet(i) for i in range(8, 16)]
    for sample in bad_samples:
        sample["id.npy"] = b"\x93NUMPY truncated"
    bad = write_shard(tmp_path / "bad.tar", bad_samples)
    dm = datamodule([good, bad], num_workers=workers, max_corrupt_fraction=0.1, min_samples_for_fraction=10)
    with pytest.raises(CorruptShardError, match=re.escape(f"last failure in shard {bad}")):
        list(dm.make_loader("val"))


def test_two_ranks_read_disjoint_samples_in_equal_numbers_of_batches(tmp_path):
    shards = write_dataset(tmp_path, shards=3) + [
        write_shard(tmp_path / "small.tar", [triplet(100 + i) for i in range(5)])
    ]
    dm = datamodule(shards, shuffle_buffer=4)
    assert count_samples(shards) == 29 and dm.batches_per_worker(world_size=2) == 3  # floor(29 / (4 * 2 * 1))
    train = [list(dm.make_loader("train", rank=r, world_size=2)) for r in (0, 1)]
    assert [len(t) for t in train] == [3, 3] and len(dm.make_loader("train", rank=0, world_size=2)) == 3
    assert not set(keys(train[0])) & set(keys(train[1]))
    val = [keys(list(dm.make_loader("val", rank=r, world_size=2))) for r in (0, 1)]
    assert not set(val[0]) & set(val[1]) and sorted(val[0] + val[1]) == sorted(
        keys(list(dm.make_loader("val")))
    )
    assert len(val[0] + val[1]) == 29


def test_two_gloo_processes_split_the_shards(tmp_path, monkeypatch):
    shards = write_dataset(tmp_path / "shards", shards=4)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    fixtures = importlib.import_module("shard_fixtures")
    mp.spawn(fixtures.read_rank, args=(2, str(tmp_path / "pg"), shards, str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["distributed"] for r in reports] == [[0, 2], [1, 2]]
    assert reports[0]["batches_per_rank"] == [4, 4]
    assert (
        not set(reports[0]["keys"]) & set(reports[1]["keys"])
        and len(reports[0]["keys"] + reports[1]["keys"]) == 32
    )
    simulated = datamodule(shards, shuffle_buffer=8, seed=0)
    for rank, report in enumerate(reports):
        assert report["keys"] == keys(list(simulated.make_loader("train", rank=rank, world_size=2)))


def test_resampled_mode_yields_the_epoch_length_per_worker(tmp_path):
    shards = write_dataset(tmp_path, shards=2)
    dm = datamodule(shards, resampled=True, samples_per_epoch=20, num_workers=2, persistent_workers=False)
    loader = dm.make_loader("train")
    batches = list(loader)
    per_worker = [sum(b["stats"]["worker"] == w for b in batches) for w in (0, 1)]
    assert per_worker == [3, 3] and len(loader) == 6  # ceil(20 / (4 * 1 * 2)) per worker
    assert dm.stats("train")["samples"] >= 24


def test_shard_weights_set_each_sources_share_of_the_draws(tmp_path):
    write_dataset(tmp_path / "old", shards=6, per_shard=2)  # sample indices 0..11
    (tmp_path / "new").mkdir()
    new = write_shard(tmp_path / "new" / "train-r2-000-000000.tar", [triplet(1000 + j) for j in range(2)])
    spec = [str(tmp_path / "old"), new]

    def new_share(**options) -> tuple[float, list[str]]:
        dm = datamodule(spec, resampled=True, samples_per_epoch=800, shuffle_buffer=0, **options)
        got = [m["index"] for b in dm.make_loader("train") for m in b["meta"]]
        return sum(i >= 1000 for i in got) / len(got), got

    weighted, order = new_share(train_shard_weights=[1.0, 1.0])
    uniform, _ = new_share()
    assert 0.4 < weighted < 0.6  # 1 : 1 by source, not 1 : 6 by shard
    assert uniform < 0.25
    assert new_share(train_shard_weights=[1.0, 1.0])[1] == order  # same seed, same draws
    with pytest.raises(ValueError, match="one weight per entry"):
        datamodule(spec, resampled=True, samples_per_epoch=8, train_shard_weights=[1.0]).make_loader("train")
    with pytest.raises(ValueError, match="needs resampled"):
        datamodule(spec, train_shard_weights=[1.0, 1.0])


def test_shard_specs_resolve_to_the_same_list(tmp_path):
    shards = write_dataset(tmp_path / "data", shards=8, per_shard=1, ranks=2)
    brace = str(tmp_path / "data" / "train-r1-{000..001}-{000000..000003}.tar")
    assert list_shards(brace) == shards
    assert list_shards(str(tmp_path / "data")) == shards
    assert list_shards(str(tmp_path / "data" / "train-r1-*.tar")) == shards
    assert (
        list_shards(
            [str(tmp_path / "data" / "train-r1-000-*.tar"), str(tmp_path / "data" / "train-r1-001-*.tar")]
        )
        == shards
    )
    assert list_shards(f"pipe:cat {shards[0]}") == [f"pipe:cat {shards[0]}"]
    with pytest.raises(FileNotFoundError, match=re.escape("valid-r1-*.tar")):
        list_shards(str(tmp_path / "data" / "valid-r1-*.tar"))
    with pytest.raises(FileNotFoundError, match=re.escape("{000..002}")):
        list_shards(str(tmp_path / "data" / "train-r1-{000..002}-000000.tar"))


def test_reads_pipe_and_fsspec_urls(tmp_path):
    import fsspec

    local = write_shard(tmp_path / "a.tar", [triplet(i) for i in range(4)])
    with fsspec.open("memory://triplets/b.tar", "wb") as f:
        f.write((tmp_path / "a.tar").read_bytes())
    remote = list_shards("memory://triplets/")
    assert remote == ["memory:///triplets/b.tar"]  # fsspec's canonical form of the url
    for spec in (f"pipe:cat {local}", remote):
        assert keys(list(datamodule(spec).make_loader("val"))) == [
            sample_key("train", 1, i) for i in range(4)
        ]


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        return (self.scale * batch["tgt"]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_stats_logger_logs_the_counters_under_a_trainer(tmp_path):
    samples = [triplet(i) for i in range(8)]
    samples[0]["pyd"] = b"not decoded"
    shards = [write_shard(tmp_path / "a.tar", samples), *write_dataset(tmp_path / "more", shards=1)]
    dm = datamodule(shards, val_shards=None, batch_size=2)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TripletStatsLogger()],
        default_root_dir=tmp_path,
    )
    trainer.fit(_Tiny(), datamodule=dm)
    assert trainer.global_step == 16
    logged = {
        k.removeprefix("data/"): int(v) for k, v in trainer.callback_metrics.items() if k.startswith("data/")
    }
    assert logged == dm.stats("train") and logged["unsafe_members"] == 2 and logged["samples"] == 32
