"""Defensive reading of upstream annotation files.

Every failure becomes a DataError naming the file, the record and the field, so
one bad record among 100k is found from the message alone, never from a
KeyError deep inside a converter. Sizes and coordinates are bounded (`Limits`)
before any mask is rasterised: pycocotools trusts them, and a crafted image size
or polygon crashed it or grew it without bound.
"""
from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.rle import MAX_MASK_PIXELS
from data.schema import DataError, mask_pixels


@dataclass(frozen=True)
class Limits:
    """Caps on outside data, checked before anything is allocated for it.

    ``max_pixels``: the most mask pixels one sample may hold (height x width x masks);
    ``polygon_margin``: how far (in image widths / heights) a polygon point may lie outside
    its image (annotations overshoot an edge a little; rasterising clips them).
    """

    max_pixels: int = MAX_MASK_PIXELS
    polygon_margin: float = 1.0

    def check_size(self, height: int, width: int, masks: int, where: Path, record_name: Any, field: str) -> None:
        if mask_pixels(height, width, masks) > self.max_pixels:
            problem = (f"{height}x{width} image with {masks} mask(s) exceeds the cap of {self.max_pixels} mask "
                       "pixels per sample (data.max_mask_pixels)")
            raise DataError(where, record_name, field, problem)


DEFAULT_LIMITS = Limits()


def read_json(path: Path) -> Any:
    """Parse a JSON file; falls back to cp1252 as LISA does (some ReasonSeg files are not UTF-8)."""
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError as exc:
            raise DataError(path, None, None, f"neither UTF-8 nor cp1252 text ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, None, None, f"invalid JSON ({exc})") from exc
    except RecursionError:
        raise DataError(path, None, None, "invalid JSON (nested too deeply)") from None


class _PlainUnpickler(pickle.Unpickler):
    """Refs files hold only lists, dicts, strings and numbers; refusing every
    class means a tampered download cannot run code while loading."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load class {module}.{name}")


def read_pickle(path: Path) -> Any:
    """Load a REFER-style pickle (plain containers only)."""
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    try:
        with path.open("rb") as f:
            return _PlainUnpickler(f).load()
    except Exception as exc:  # truncated files raise EOFError, garbage any of several errors
        raise DataError(path, None, None, f"not a readable pickle ({type(exc).__name__}: {exc})") from exc


def get(
    record: Any, key: str, where: Path, record_name: Any, kind: type | tuple = object, field: str | None = None
) -> Any:
    """record[key], checked for presence and type; `field` is the name shown in errors."""
    field = field or key
    if not isinstance(record, dict):
        raise DataError(where, record_name, field, f"expected an object holding it, got {type(record).__name__}")
    if key not in record:
        raise DataError(where, record_name, field, "missing")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds and int in kinds):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(where, record_name, field, f"expected {names}, got {type(value).__name__} {value!r:.60}")
    return value


def polygon(points: Any, where: Path, record_name: Any, field: str, size: tuple[int, int],
            limits: Limits) -> np.ndarray:
    """[[x, y], ...] with at least 3 finite numeric points on (or near) an image of ``size``
    (height, width) -> float [N, 2] array."""
    if not isinstance(points, list) or len(points) < 3:
        count = len(points) if isinstance(points, list) else type(points).__name__
        raise DataError(where, record_name, field, f"a polygon needs at least 3 [x, y] points, got {count}")
    (height, width), margin = size, limits.polygon_margin
    for i, p in enumerate(points):
        ok = isinstance(p, list) and len(p) == 2
        if not ok or not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in p):
            raise DataError(where, record_name, field, f"point {i} is {p!r:.60}, expected two finite numbers")
        if not (-margin * width <= p[0] <= (1 + margin) * width and -margin * height <= p[1] <= (1 + margin) * height):
            raise DataError(where, record_name, field, f"point {i} ({p[0]:g}, {p[1]:g}) lies off the {width}x{height} "
                            f"image by more than data.polygon_margin={margin:g} of its size")
    return np.asarray(points, dtype=np.float64)


def image_size(image: Path, where: Path, record_name: Any, limits: Limits, masks: int = 1) -> tuple[int, int]:
    """(height, width) from an image file's header alone, within ``limits`` for ``masks`` masks."""
    try:
        with Image.open(image) as im:
            width, height = im.size
    except FileNotFoundError:
        raise DataError(where, record_name, "image", f"image file not found: {image}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        problem = f"unreadable image {image} ({type(exc).__name__}: {exc})"
        raise DataError(where, record_name, "image", problem.replace("\n", " ")) from None
    limits.check_size(height, width, masks, where, record_name, "image")
    return height, width


def image_ref(image: Path, out_dir: Path, where: Path, record_name: Any) -> str:
    """Path stored in the split file: relative to its folder when possible, else absolute."""
    if not image.is_file():
        raise DataError(where, record_name, "image", f"image file not found: {image}")
    absolute = os.path.abspath(image)
    try:
        return os.path.relpath(absolute, os.path.abspath(out_dir))
    except ValueError:  # Windows: image and split file on different drives
        return absolute
