"""Stand-in shards: world triplets written straight in the IDI contract (no swap, no filters), at any
image size, for the training tests, the loader benchmark and the scale check (`benchmarks.speed.scale`).
The IDI job (`data_gen.idi`) is what makes training data; these are for measuring and wiring."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from emojidiff.models.bundle import build_identity_encoder
from emojidiff.splits import TRAIN_IDENTITIES, TRAIN_SEEDS
from emojidiff.triplet import encode_triplet, sample_key, shard_name
from emojidiff.world import Expression, Identity, render_batch


def write_world_triplets(
    folder: str | Path,
    n: int = 32,
    shards: int = 2,
    size: int = 64,
    split: str = "train",
    identity_encoder: str | Mapping[str, Any] = "world-id",
) -> list[str]:
    """n triplets over `shards` tar files: target (identity A, expression e), reference (A, another
    expression), template (e on identity A + 1), template mask, the `identity_encoder` embedding of the
    reference (world-id: 128 values; arcface-torch: 512, as photo shards carry); the json's
    scores.identity_similarity is that encoder's cosine of template and target, as the IDI job scores it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [TRAIN_IDENTITIES[0] + i for i in range(n)]
    exprs = [Expression.sample(TRAIN_SEEDS[0] + i) for i in range(n)]
    ref_exprs = [Expression.sample(TRAIN_SEEDS[0] + 10_000 + i) for i in range(n)]
    styles = [("shaded", "cel", "brush")[i % 3] for i in range(n)]
    tgt = render_batch([Identity.sample(i) for i in ids], exprs, styles, size, list(range(n)))
    ref = render_batch(
        [Identity.sample(i) for i in ids], ref_exprs, "shaded", size, [n + i for i in range(n)]
    )
    tmpl = render_batch(
        [Identity.sample(i + 1) for i in ids], exprs, styles, size, [2 * n + i for i in range(n)]
    )
    encoder = build_identity_encoder(identity_encoder)
    with torch.no_grad():
        emb, emb_tgt, emb_tmpl = (
            encoder(r.images.permute(0, 3, 1, 2).float() / 255) for r in (ref, tgt, tmpl)
        )
    similarity = torch.nn.functional.cosine_similarity(emb_tmpl, emb_tgt).tolist()
    emb = emb.numpy()
    paths = []
    per = -(-n // shards)
    for s in range(shards):
        path = folder / shard_name(split, 1, 0, s)
        with wds.TarWriter(str(path)) as sink:
            for i in range(s * per, min(n, (s + 1) * per)):
                meta = {
                    "prompt": f"a portrait, {styles[i]} style",
                    "person": str(ids[i]),
                    "round": 1,
                    "scores": {"identity_similarity": round(similarity[i], 6)},
                }
                sink.write(
                    encode_triplet(
                        sample_key(split, 1, i),
                        tgt.images[i].numpy(),
                        ref.images[i].numpy(),
                        tmpl.images[i].numpy(),
                        meta,
                        emb[i],
                        template_mask=(tmpl.masks[i].numpy() * 255).astype(np.uint8),
                    )
                )
        paths.append(str(path))
    return paths
