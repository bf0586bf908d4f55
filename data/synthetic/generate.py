"""Splits of the synthetic dataset: draw (scene, query) pairs, write images and Parquet.

Each split has its own random stream seeded by (seed, split), so a split's
content depends only on the seed and its own size, and no image is shared
across splits. The query kind is recorded as the last part of the sample id
("train-00012-relation") so metrics can be broken down by kind.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..schema import Sample, write_samples
from .queries import Query
from .registry import DEFAULT_WEIGHTS, QUERY_KINDS
from .scene import Scene, check_image_size, random_scene

SPLITS = ("train", "val", "test")
DATASET = "synthetic"
IMAGE_DIR = "images"
_SCENE_TRIES = 1000  # scenes drawn for one query before giving up on its kind


def query_kind(sample_id: str) -> str:
    """The query kind a synthetic sample id records."""
    return sample_id.split("-", 2)[2]


def _mixture(query_weights: dict[str, float] | None) -> tuple[list[str], np.ndarray]:
    weights = dict(DEFAULT_WEIGHTS if query_weights is None else query_weights)
    unknown = sorted(set(weights) - set(QUERY_KINDS))
    if unknown:
        raise ValueError(f"unknown query kind(s) {unknown}; known: {sorted(QUERY_KINDS)}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"query weights must be non-negative with a positive sum, got {weights}")
    names = [n for n in QUERY_KINDS if weights.get(n, 0) > 0]
    p = np.array([weights[n] for n in names], dtype=np.float64)
    return names, p / p.sum()


def _draw(rng: np.random.Generator, kind: str, image_size: int) -> tuple[Scene, Query]:
    """Fresh scenes until one admits an unambiguous query of this kind."""
    for _ in range(_SCENE_TRIES):
        scene = random_scene(rng, image_size)
        query = QUERY_KINDS[kind](scene, rng)
        if query is not None:
            return scene, query
    raise RuntimeError(f"no scene admitted a {kind!r} query in {_SCENE_TRIES} tries (image_size={image_size})")


def draws(split: str, seed: int = 0, image_size: int = 64,
          query_weights: dict[str, float] | None = None) -> Iterator[tuple[str, Scene, Query]]:
    """(query kind, scene, query) of a split's stream, endless: its first n are the split of size n."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    names, p = _mixture(query_weights)
    while True:
        kind = names[rng.choice(len(names), p=p)]
        yield (kind, *_draw(rng, kind, image_size))


def _split(out_dir: Path, split: str, n: int, seed: int, image_size: int,
           query_weights: dict[str, float] | None, progress: bool) -> list[Sample]:
    stream = draws(split, seed, image_size, query_weights)
    samples = []
    for i in tqdm(range(n), desc=f"synthetic {split}", unit="sample", disable=not progress):
        kind, scene, query = next(stream)
        image_id = f"{split}-{i:05d}"
        image_path = f"{IMAGE_DIR}/{image_id}.png"
        Image.fromarray(scene.image).save(out_dir / image_path)
        samples.append(Sample(
            sample_id=f"{image_id}-{kind}",
            image_id=image_id,
            image_path=image_path,
            height=image_size,
            width=image_size,
            question=query.question,
            split=split,
            dataset=DATASET,
            masks=[scene.shapes[t].mask for t in query.targets],
            no_target=not query.targets,
            is_sentence=query.is_sentence,
            reasoning=query.reasoning,
        ))
    return samples


def make_synthetic(out_dir: str | Path, seed: int = 0, n_train: int = 2000, n_val: int = 200, n_test: int = 200,
                   image_size: int = 64, query_weights: dict[str, float] | None = None,
                   progress: bool = True) -> dict[str, Path]:
    """Write `out_dir/images/*.png` and `out_dir/{train,val,test}.parquet`; returns the split files.

    `query_weights` maps query kinds (see QUERY_KINDS) to relative frequencies;
    kinds left out are not drawn. The same arguments give byte-identical files.
    """
    out_dir = Path(out_dir)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be non-negative, got {sizes}")
    check_image_size(image_size)
    _mixture(query_weights)  # a bad mixture fails before any file is written
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in sizes.items():
        samples = _split(out_dir, split, n, seed, image_size, query_weights, progress)
        paths[split] = write_samples(samples, out_dir / f"{split}.parquet")
    return paths
