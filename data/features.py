"""Content-addressed store of precomputed frozen-encoder features.

One safetensors file per image, named by the SHA-256 of the image file's bytes,
under a folder named by the encoders' identity (their config and weights), so
a changed encoder never reads stale features and a renamed image still hits:

    <cache_dir>/features/<encoder_key>/<hash[:2]>/<hash>.safetensors
        vision         [N, Dv]  patch features for the LLM (before the projector)
        sam            [C, h, w] SAM image embedding
        sam_input_size [2]      (h, w) of the resized image inside SAM's square input
        original_size  [2]      (H, W) of the image file

Shards are written atomically (`data.atomic`), so a crash never leaves a
half-written shard. A shard records the SHA-256 of its tensors (names, dtypes, shapes,
bytes) in its header; reading one checks its structure, that checksum and that every
float is finite, so a truncated, bit-flipped or overwritten shard is reported by name
(`FeatureShardError`) instead of feeding wrong features, and `segrl precompute`
rebuilds it (``check``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from data.atomic import atomic_path
from data.integrity import IntegrityError, file_sha256

FEATURE_KEYS = ("vision", "sam", "sam_input_size", "original_size")
CHECKSUM_KEY = "segrl_sha256"  # header metadata: ``tensors_sha256`` of the shard's tensors


class FeatureShardError(IntegrityError):
    """A cached feature shard that cannot be used; the message names it and says how to rebuild it."""


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the image's identity in the cache)."""
    return file_sha256(path)


def sam_input_size_of(features: dict[str, torch.Tensor]) -> tuple[int, int]:
    """An image's ``sam_input_size`` (h, w) as ints: the shard holds it as an int32 tensor."""
    h, w = (int(v) for v in features["sam_input_size"])
    return h, w


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard's tensors, or FeatureShardError naming what is wrong with it (why the cache cannot trust it)."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 2 <= header_len <= len(data) - 8:
        raise FeatureShardError(f"truncated or not a safetensors file ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        checksum = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise FeatureShardError(f"unreadable header ({type(exc).__name__})") from None
    if (expected := 8 + header_len + max(ends, default=0)) != len(data):
        raise FeatureShardError(f"{len(data)} bytes, its header says {expected} (truncated or overwritten)")
    if checksum is None:
        raise FeatureShardError("no checksum (written by an older segrl)")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise FeatureShardError(f"unreadable ({type(exc).__name__}: {exc})") from None
    if missing := [k for k in FEATURE_KEYS if k not in tensors]:
        raise FeatureShardError(f"lacks {missing}")
    if tensors_sha256(tensors) != checksum:
        raise FeatureShardError("damaged (its tensors do not match the checksum in its header)")
    if bad := _non_finite(tensors):
        raise FeatureShardError(f"non-finite values in {bad}")
    return tensors


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


_HASH_LIMIT = 64 << 20


def encoder_key(*sources: str | Path) -> str:
    """Identity of a set of encoders from their files (configs + weights).

    Files up to 64 MiB are hashed by content; larger ones (real checkpoints)
    by name and size, which is enough to tell ViT-H from ViT-B or a re-save.
    A source that is not a local path (a hub id) counts by its name.
    """
    digest = hashlib.sha256()
    for source in sources:
        path = Path(source)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        digest.update(str(source if not path.exists() else path.name).encode())
        for p in files:
            size = p.stat().st_size
            digest.update(f"{p.relative_to(path.parent) if p != path else p.name}:{size}".encode())
            if size <= _HASH_LIMIT:
                digest.update(content_hash(p).encode())
    return digest.hexdigest()[:16]


class FeatureStore:
    """Read/write per-image feature shards for one encoder identity."""

    def __init__(self, cache_dir: str | Path, key: str):
        self.root = Path(cache_dir) / "features" / key

    def path(self, image_hash: str) -> Path:
        return self.root / image_hash[:2] / f"{image_hash}.safetensors"

    def has(self, image_hash: str) -> bool:
        """A shard file exists (``get`` finds out whether it is sound, ``check`` says so without raising)."""
        return self.path(image_hash).is_file()

    def check(self, image_hash: str) -> str | None:
        """Why the shard of ``image_hash`` must be (re)built: "missing" or what is wrong; None if it is sound."""
        path = self.path(image_hash)
        if not path.is_file():
            return "missing"
        try:
            read_shard(path)
        except FeatureShardError as exc:
            return str(exc)
        return None

    def put(self, image_hash: str, features: dict[str, torch.Tensor]) -> Path:
        missing = [k for k in FEATURE_KEYS if k not in features]
        if missing:
            raise ValueError(f"feature shard for {image_hash} lacks {missing}")
        if bad := _non_finite(features):
            raise ValueError(f"features of image {image_hash} have non-finite values in {bad}: not cached")
        target = self.path(image_hash)
        target.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: features[k].contiguous() for k in FEATURE_KEYS}
        with atomic_path(target) as tmp:
            save_file(tensors, tmp, metadata={CHECKSUM_KEY: tensors_sha256(tensors)})
        return target

    def get(self, image_hash: str) -> dict[str, torch.Tensor]:
        path = self.path(image_hash)
        if not path.is_file():
            raise FileNotFoundError(f"no cached features for image {image_hash} in {self.root}: run `segrl precompute`")
        try:
            return read_shard(path)
        except FeatureShardError as exc:
            raise FeatureShardError(f"{path}: feature shard of image {image_hash}: {exc}; run `segrl precompute` "
                                    f"to rebuild it") from None

    def count(self) -> int:
        return sum(1 for _ in self.root.rglob("*.safetensors")) if self.root.exists() else 0
