"""ReasonSeg (LISA) -> canonical Samples.

Each `<split>/<name>.json` (LabelMe style: `text` list, `is_sentence`, `shapes`)
sits beside `<name>.jpg`. Masks are rasterised like LISA's get_mask_from_json so
scores stay comparable with published ones: "flag" shapes dropped, shapes painted
largest first so smaller ones win, "ignore" shapes form the ignore mask.

Train keeps one Sample per instruction (the rephrasings are augmentation); val
and test keep only `text[0]`, the one LISA-style evaluation scores.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.converters.sources import DEFAULT_LIMITS, Limits, get, image_ref, image_size, polygon, read_json
from data.schema import DataError, Sample

TARGET, IGNORE = 1, 255


def convert_split(src: Path, split: str, out_dir: Path, image_root: Path | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> Iterator[Sample]:
    """`src` is the ReasonSeg folder holding `train/`, `val/`, `test/`."""
    if image_root is not None:
        raise DataError(image_root, None, "--image-root", "not used by reasonseg: its images sit beside their JSON "
                        "files; drop --image-root")
    folder = src / split
    if not folder.is_dir():
        raise DataError(folder, None, None, "split folder not found")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataError(folder, None, None, "no .json annotation files")
    for f in files:
        yield from _samples(f, split, out_dir, limits)


def _samples(path: Path, split: str, out_dir: Path, limits: Limits) -> list[Sample]:
    name = path.stem
    ann = read_json(path)
    texts = get(ann, "text", path, name, list)
    if not texts:
        raise DataError(path, name, "text", "no instructions")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(path, name, f"text[{i}]", f"expected a non-empty string, got {t!r:.60}")
    is_sentence = get(ann, "is_sentence", path, name, bool)
    image = path.with_suffix(".jpg")
    height, width = image_size(image, path, name, limits, masks=2)  # target and ignore
    target, ignore = rasterize(get(ann, "shapes", path, name, list), height, width, path, name, limits)
    if not target.any():
        raise DataError(path, name, "shapes", "no target pixels (only flag/ignore shapes, or all covered by ignore)")
    image_path = image_ref(image, out_dir, path, name)
    return [
        Sample(
            sample_id=f"{name}:{i}",
            image_id=name,
            image_path=image_path,
            height=height,
            width=width,
            question=text,
            split=split,
            dataset="reasonseg",
            masks=[target],
            ignore_mask=ignore if ignore.any() else None,
            is_sentence=is_sentence,
        )
        for i, text in enumerate(texts if split == "train" else texts[:1])
    ]


def rasterize(shapes: list, height: int, width: int, path: Path, name: str,
              limits: Limits = DEFAULT_LIMITS) -> tuple[np.ndarray, np.ndarray]:
    """LabelMe shapes -> (target, ignore) bool [H, W] masks, LISA's painting order."""
    painted = []
    for i, shape in enumerate(shapes):
        label = get(shape, "label", path, name, str, f"shapes[{i}].label").lower()
        if label == "flag":
            continue
        field = f"shapes[{i}].points"
        # int() truncates toward zero, like LISA's np.int32 cast before cv2.fillPoly.
        points = polygon(get(shape, "points", path, name, list, field), path, name, field, (height, width), limits)
        xy = [(int(x), int(y)) for x, y in points]
        painted.append((_area(xy, height, width), xy, IGNORE if "ignore" in label else TARGET))
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for _, xy, value in sorted(painted, key=lambda p: -p[0]):
        draw.polygon(xy, fill=value, outline=value)
    labels = np.asarray(canvas)
    return labels == TARGET, labels == IGNORE


def _area(xy: list[tuple[int, int]], height: int, width: int) -> int:
    """Pixels of one filled polygon plus its 1-px outline, clipped to the image (LISA's sort key)."""
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(xy, fill=1, outline=1)
    return int(np.asarray(canvas).sum())
