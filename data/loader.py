"""Training/eval items: a canonical sample joined with its cached encoder features.

Frozen encoders never run here (SegCompass A.1): vision features and the SAM
embedding are read from the feature cache by image content hash, and the GT
masks are moved into SAM's low-res frame once per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from data.features import FeatureStore, content_hash, sam_input_size_of
from data.mask_frames import lowres_gt
from data.schema import DataError, Sample, read_samples, resolve_image


@dataclass
class SegItem:
    sample: Sample
    vision: torch.Tensor  # [N, Dv] patch features for the projector
    sam_embedding: torch.Tensor  # [C, h, w]
    sam_input_size: tuple[int, int]
    gt_lowres: torch.Tensor  # [G, L, L] soft GT in SAM's low-res frame (G = 0 for no target)


class SegDataset:
    """One split of a canonical dataset with features from `store`; items are built lazily.

    A split with no samples (or ``limit`` 0) is an error: metrics over nothing are NaN, not a result.
    """

    def __init__(self, split_file: str | Path, store: FeatureStore, sam_img_size: int, limit: int | None = None):
        self.split_file = Path(split_file)
        self.samples = read_samples(self.split_file)[:limit]
        if not self.samples:
            raise DataError(self.split_file, None, None, f"no samples{'' if limit is None else f' (limit {limit})'}")
        self.store, self.sam_img_size = store, sam_img_size
        self._item = lru_cache(maxsize=None)(self._build)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> SegItem:
        return self._item(index)

    def _build(self, index: int) -> SegItem:
        sample = self.samples[index]
        image = resolve_image(self.split_file, sample.image_path)
        try:
            feats = self.store.get(content_hash(image))
        except FileNotFoundError as exc:
            problem = f"image {image} not found" if not image.is_file() else str(exc)
            raise DataError(self.split_file, sample.sample_id, None, problem) from None
        return SegItem(sample, feats["vision"], feats["sam"], sam_input_size_of(feats),
                       lowres_gt(sample.gt_stack, feats, self.sam_img_size))
