"""gRefCOCO (G_REFER layout) -> canonical Samples.

Like REFER, but a ref names a list of annotations: each becomes its own instance
mask (not merged, as SegCompass keeps them), and `ann_id == [-1]` marks a
no-target ref whose right answer is no mask.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data.converters.coco import CocoInstances
from data.converters.refer import load_refs, ref_samples, require_image_root
from data.converters.sources import DEFAULT_LIMITS, Limits, get
from data.schema import DataError, Sample

GREFS_FILES = ("grefs(unc).json", "grefs(unc).p")


def convert_split(src: Path, split: str, out_dir: Path, image_root: Path | None,
                  limits: Limits = DEFAULT_LIMITS) -> Iterator[Sample]:
    """`src` is the grefcoco folder (grefs(unc).json, else .p) or a grefs file itself."""
    image_root = require_image_root(image_root, "grefcoco")
    if src.is_file():
        refs_path = src
    else:
        refs_path = next((src / n for n in GREFS_FILES if (src / n).is_file()), src / GREFS_FILES[0])
    refs = load_refs(refs_path)
    coco = CocoInstances(refs_path.parent / "instances.json", limits)

    def masks(ref: dict, image: dict, record: str) -> list[np.ndarray]:
        ann_ids = get(ref, "ann_id", refs_path, record, list)
        if not ann_ids or not all(isinstance(a, int) and not isinstance(a, bool) for a in ann_ids):
            problem = f"expected a non-empty list of annotation ids, got {ann_ids!r:.60}"
            raise DataError(refs_path, record, "ann_id", problem)
        repeated = sorted(a for a, n in Counter(ann_ids).items() if n > 1)
        if repeated:
            raise DataError(refs_path, record, "ann_id", f"annotation(s) {repeated} listed more than once")
        empty = ann_ids == [-1]
        flag = ref.get("no_target", empty)
        if flag is not empty:
            raise DataError(refs_path, record, "no_target", f"is {flag!r} but ann_id is {ann_ids}")
        limits.check_size(image["height"], image["width"], len(ann_ids), refs_path, record, "ann_id")
        return [] if empty else [coco.mask(a, image, refs_path, record) for a in ann_ids]

    return ref_samples(refs_path, refs, coco, split, "grefcoco", image_root, out_dir, masks)
