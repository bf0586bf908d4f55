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
half-written shard that a rerun would take as done.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.atomic import atomic_path

FEATURE_KEYS = ("vision", "sam", "sam_input_size", "original_size")


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the image's identity in the cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        return self.path(image_hash).is_file()

    def put(self, image_hash: str, features: dict[str, torch.Tensor]) -> Path:
        missing = [k for k in FEATURE_KEYS if k not in features]
        if missing:
            raise ValueError(f"feature shard for {image_hash} lacks {missing}")
        target = self.path(image_hash)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            save_file({k: features[k].contiguous() for k in FEATURE_KEYS}, tmp)
        return target

    def get(self, image_hash: str) -> dict[str, torch.Tensor]:
        path = self.path(image_hash)
        if not path.is_file():
            raise FileNotFoundError(f"no cached features for image {image_hash} in {self.root}: run `segrl precompute`")
        return load_file(path)

    def count(self) -> int:
        return sum(1 for _ in self.root.rglob("*.safetensors")) if self.root.exists() else 0
