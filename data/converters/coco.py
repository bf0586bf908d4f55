"""COCO `instances.json`: image lookup and annotation masks (pycocotools).

Shared by the REFER and gRefCOCO converters. Masks are decoded the way LISA's
ValDataset does: polygon parts rasterised by pycocotools and merged; crowd
annotations (RLE, compressed or not) decoded as they are. Image sizes and polygon
points are checked against `Limits` first: pycocotools crashed (exit 139) on a
10^6 x 10^6 image and grew to tens of GB on a polygon with coordinates of 4e8.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from data.converters.sources import DEFAULT_LIMITS, Limits, get, polygon, read_json
from data.schema import DataError


class CocoInstances:
    """Index of one instances.json; lookups name the referring file on a miss."""

    def __init__(self, path: Path, limits: Limits = DEFAULT_LIMITS):
        self.path, self.limits = path, limits
        data = read_json(path)
        self.images = self._index(get(data, "images", path, None, list), "images")
        self.anns = self._index(get(data, "annotations", path, None, list), "annotations")

    def _index(self, entries: list, name: str) -> dict:
        return {get(e, "id", self.path, f"{name}[{i}]", int): e for i, e in enumerate(entries)}

    def image(self, image_id: int, where: Path, record_name: str) -> dict:
        """The image entry, with file_name / height / width checked."""
        image = self.images.get(image_id)
        if image is None:
            raise DataError(where, record_name, "image_id", f"image {image_id} is not in {self.path.name}")
        rec = f"image {image_id}"
        get(image, "file_name", self.path, rec, str)
        for key in ("height", "width"):
            if isinstance(get(image, key, self.path, rec, int), bool) or image[key] <= 0:
                raise DataError(self.path, rec, key, f"must be a positive integer, got {image[key]!r}")
        self.limits.check_size(image["height"], image["width"], 1, self.path, rec, "height/width")
        return image

    def mask(self, ann_id: int, image: dict, where: Path, record_name: str) -> np.ndarray:
        """Bool [H, W] mask of one annotation, which must lie on `image`."""
        ann = self.anns.get(ann_id)
        if ann is None:
            raise DataError(where, record_name, "ann_id", f"annotation {ann_id} is not in {self.path.name}")
        rec = f"annotation {ann_id}"
        on = get(ann, "image_id", self.path, rec, int)
        if on != image["id"]:
            problem = f"ref is on image {image['id']}, annotation {ann_id} on image {on}"
            raise DataError(where, record_name, "image_id", problem)
        seg = get(ann, "segmentation", self.path, rec, (list, dict))
        h, w = image["height"], image["width"]
        m = self._polygons(seg, h, w, rec) if isinstance(seg, list) else self._rle(seg, h, w, rec)
        if not m.any():
            raise DataError(self.path, rec, "segmentation", "decodes to an empty mask")
        return m

    def _polygons(self, seg: list, h: int, w: int, rec: str) -> np.ndarray:
        if not seg:
            raise DataError(self.path, rec, "segmentation", "empty polygon list")
        parts = []
        for i, flat in enumerate(seg):
            field = f"segmentation[{i}]"
            if not isinstance(flat, list) or len(flat) % 2:
                raise DataError(self.path, rec, field, "expected a flat [x1, y1, x2, y2, ...] list of even length")
            points = polygon([flat[j : j + 2] for j in range(0, len(flat), 2)], self.path, rec, field, (h, w),
                             self.limits)
            parts.append(points.ravel().tolist())
        # merged as RLE, so decoding allocates one image, not one per part
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, h, w))).astype(bool)

    def _rle(self, seg: dict, h: int, w: int, rec: str) -> np.ndarray:
        size = get(seg, "size", self.path, rec, list, "segmentation.size")
        if size != [h, w]:
            raise DataError(self.path, rec, "segmentation.size", f"{size} is not the image's [height, width] {[h, w]}")
        counts = get(seg, "counts", self.path, rec, (list, str), "segmentation.counts")
        if isinstance(counts, list):  # uncompressed (COCO iscrowd): valid whenever the runs cover the image
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
                problem = f"run lengths must be non-negative ints summing to {h * w}"
                raise DataError(self.path, rec, "segmentation.counts", problem)
            return mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(bool)
        try:
            rle = {"size": [h, w], "counts": counts.encode("ascii")}
            m = mask_utils.decode(rle)
        except Exception as exc:  # pycocotools raises bare exceptions on garbage
            raise DataError(self.path, rec, "segmentation.counts", f"undecodable RLE ({exc})") from exc
        # pycocotools decodes some garbage strings (even "") without complaint; a
        # valid compressed RLE is one that re-encodes to itself.
        if mask_utils.encode(m)["counts"] != rle["counts"]:
            raise DataError(self.path, rec, "segmentation.counts", "RLE does not decode cleanly (corrupt counts?)")
        return m.astype(bool)
