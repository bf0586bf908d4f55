"""Trivial baselines on a synthetic split, scored with the project's metrics (`segrl eval --baselines`).

They read no question, only the image: what a model must beat to show it follows
the query. Synthetic scenes are flat palette shapes on a grey background (R = G = B
everywhere, noise included) that never touch, so every connected region of
non-grey pixels is one shape and the shapes can be read off the pixels.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from data.schema import DataError, Sample, read_samples, resolve_image
from data.synthetic import DATASET as SYNTHETIC
from rewards import SegMetrics

Baseline = Callable[[np.ndarray, np.random.Generator], "np.ndarray | None"]
"""(RGB image [H, W, 3], random generator) -> predicted bool mask [H, W], or None for "no such object"."""


def coloured_pixels(image: np.ndarray) -> np.ndarray:
    """Pixels whose channels differ: the shapes (the background is grey)."""
    return (image[..., 0] != image[..., 1]) | (image[..., 1] != image[..., 2])


def shapes(image: np.ndarray) -> list[np.ndarray]:
    """One bool mask per connected region of coloured pixels, in label (raster) order."""
    labels, count = ndimage.label(coloured_pixels(image))
    return [labels == i for i in range(1, count + 1)]


def refuse(image: np.ndarray, rng: np.random.Generator) -> None:
    return None


def random_shape(image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    found = shapes(image)
    return found[int(rng.integers(len(found)))] if found else None


def largest_shape(image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    found = shapes(image)
    return max(found, key=np.count_nonzero) if found else None


def every_coloured_pixel(image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    mask = coloured_pixels(image)
    return mask if mask.any() else None


BASELINES: dict[str, Baseline] = {
    "refuse": refuse,
    "rand shape": random_shape,
    "largest": largest_shape,
    "all colour": every_coloured_pixel,
}
"""The baselines by the label their table row gets, in table order."""


def baseline_metrics(samples: list[Sample], images: list[np.ndarray], seed: int = 0) -> dict[str, dict]:
    """Each baseline's `SegMetrics` summary over the samples (image i belongs to sample i)."""
    out = {}
    for label, predict in BASELINES.items():
        meter, rng = SegMetrics(), np.random.default_rng(seed)
        for sample, image in zip(samples, images, strict=True):
            meter.add(predict(image, rng), sample.gt_stack.any(0), sample.ignore_mask)
        out[label] = meter.summary()
    return out


def split_baselines(split_file: str | Path, limit: int | None = None, seed: int = 0) -> dict[str, dict]:
    """`baseline_metrics` of the first `limit` samples of a synthetic split file."""
    samples = read_samples(split_file)[:limit]
    for s in samples:
        if s.dataset != SYNTHETIC:
            raise DataError(split_file, s.sample_id, "dataset", f"is '{s.dataset}': the baselines read shapes "
                            f"off synthetic scenes (flat colours on grey), so they need a synthetic split")
    images = [np.asarray(Image.open(resolve_image(split_file, s.image_path)).convert("RGB")) for s in samples]
    return baseline_metrics(samples, images, seed)
