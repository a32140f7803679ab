"""The IDI triplet contract: shard and sample names, member encoding and the only decoders allowed.

One shard sample is one triplet (see DESIGN.md, "Contracts"):

    __key__        "{split}-r{round}-{index:09d}" (no dots: WebDataset splits members at the first dot)
    tgt.png        target: identity A wearing expression e; real or a ground-truth render, never synthetic
    ref.png        identity reference: another image of A (or the target itself)
    tmpl.png       expression template: e on an identity other than A (round 0: the target's masked face)
    json           ids, round, alterer, seeds, style, prompt, every filter score; in the world the
                   ground-truth identity and expression parameters of all three images
    id.npy         A's identity embedding from the reference, float32 (D,)
    tmpl_mask.png  optional: the template's face mask, uint8 {0, 255}

Images are uint8 (H, W, 3) RGB arrays here. Decoding goes through `decode_member`, which knows
png/jpg/json/npy/txt and refuses every other extension, and loads .npy with `allow_pickle=False`:
nothing in a shard is ever unpickled. Written by `data_gen`, read by `datamodules`.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

TARGET, REFERENCE, TEMPLATE, META, IDENTITY, TEMPLATE_MASK = (
    "tgt.png",
    "ref.png",
    "tmpl.png",
    "json",
    "id.npy",
    "tmpl_mask.png",
)
#: Members every sample has.
REQUIRED_MEMBERS: tuple[str, ...] = (TARGET, REFERENCE, TEMPLATE, META, IDENTITY)
#: Extensions `decode_member` decodes; anything else in a shard is refused, never interpreted.
DECODABLE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "json", "npy", "txt")

_SHARD_RE = re.compile(r"^(?P<split>[a-z0-9_]+)-r(?P<round>\d+)-(?P<rank>\d{3})-(?P<n>\d{6})\.tar$")
_KEY_RE = re.compile(r"^(?P<split>[a-z0-9_]+)-r(?P<round>\d+)-(?P<index>\d{9})$")


class UnsafeMemberError(ValueError):
    """A shard member whose extension is not in DECODABLE_EXTENSIONS (e.g. .pickle, .pyd)."""


class CorruptMemberError(ValueError):
    """A shard member that does not decode as its extension says."""


def shard_name(split: str, round_: int, rank: int, n: int) -> str:
    """ "{split}-r{round}-{rank:03d}-{n:06d}.tar": shard `n` of a split and round, written by `rank`."""
    return f"{split}-r{round_}-{rank:03d}-{n:06d}.tar"


def parse_shard_name(name: str) -> dict[str, Any]:
    """{"split", "round", "rank", "n"} of a shard file name; ValueError naming it otherwise."""
    m = _SHARD_RE.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a triplet shard name (expected split-rROUND-RANK-NNNNNN.tar)")
    return {"split": m["split"], "round": int(m["round"]), "rank": int(m["rank"]), "n": int(m["n"])}


def sample_key(split: str, round_: int, index: int) -> str:
    """The key of target `index` of a split and round: unique across ranks, stable across resumes."""
    if not re.fullmatch(r"[a-z0-9_]+", split):
        raise ValueError(f"split names are lower-case letters, digits and _, got {split!r}")
    return f"{split}-r{round_}-{index:09d}"


def parse_sample_key(key: str) -> dict[str, Any]:
    m = _KEY_RE.match(key)
    if m is None:
        raise ValueError(f"{key!r} is not a triplet key (expected split-rROUND-NNNNNNNNN)")
    return {"split": m["split"], "round": int(m["round"]), "index": int(m["index"])}


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB or (H, W) grey -> PNG bytes."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"PNG members are uint8, got {image.dtype}")
    bgr = image[..., ::-1] if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError(f"cv2 could not encode an image of shape {image.shape}")
    return buf.tobytes()


def _png(image: np.ndarray | bytes) -> bytes:
    return bytes(image) if isinstance(image, (bytes, bytearray)) else encode_png(image)


def encode_triplet(
    key: str,
    target: np.ndarray | bytes,
    reference: np.ndarray | bytes,
    template: np.ndarray | bytes,
    meta: Mapping[str, Any],
    identity_embedding: np.ndarray,
    template_mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """A WebDataset sample dict (`__key__` plus encoded members) for one triplet.

    Images are uint8 (H, W, 3) RGB arrays, or their PNG bytes already encoded (a target shared by
    several triplets is encoded once).
    """
    parse_sample_key(key)
    emb = np.asarray(identity_embedding, dtype=np.float32).reshape(-1)
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    sample = {
        "__key__": key,
        TARGET: _png(target),
        REFERENCE: _png(reference),
        TEMPLATE: _png(template),
        META: json.dumps(dict(meta), sort_keys=True, separators=(",", ":")).encode(),
        IDENTITY: buf.getvalue(),
    }
    if template_mask is not None:
        sample[TEMPLATE_MASK] = encode_png((np.asarray(template_mask) > 0).astype(np.uint8) * 255)
    return sample


def decode_member(name: str, data: bytes) -> Any:
    """Decode one member by its extension (the part after the last dot of `name`).

    png/jpg/jpeg -> uint8 (H, W, 3) RGB, or (H, W) for a single-channel image; json -> object;
    npy -> array (never pickled objects); txt -> str. Raises UnsafeMemberError for any other
    extension and CorruptMemberError when the bytes are not what the extension says.
    """
    ext = name.rsplit(".", 1)[-1].lower()
    if ext not in DECODABLE_EXTENSIONS:
        raise UnsafeMemberError(
            f"member {name!r}: extension .{ext} is not decoded (allowed: {', '.join(DECODABLE_EXTENSIONS)})"
        )
    try:
        if ext in ("png", "jpg", "jpeg"):
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if image is None:
                raise CorruptMemberError(f"member {name!r} is not a readable {ext} image")
            if image.ndim == 3:
                image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
            if image.dtype != np.uint8:
                image = (image / 257).astype(np.uint8) if image.dtype == np.uint16 else image.astype(np.uint8)
            return image
        if ext == "json":
            return json.loads(data)
        if ext == "npy":
            return np.load(io.BytesIO(data), allow_pickle=False)
        return data.decode("utf-8")
    except CorruptMemberError:
        raise
    except (ValueError, UnicodeDecodeError, OSError, EOFError) as err:
        raise CorruptMemberError(f"member {name!r} does not decode as .{ext}: {err}") from None
