"""Defensive reading of upstream annotation files.

Every failure becomes a DataError naming the file, the record and the field, so
one bad record among 100k is found from the message alone, never from a
KeyError deep inside a converter.
"""
from __future__ import annotations

import json
import math
import os
import pickle
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from data.schema import DataError


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
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(where, record_name, field, f"expected {names}, got {type(value).__name__} {value!r:.60}")
    return value


def polygon(points: Any, where: Path, record_name: Any, field: str) -> np.ndarray:
    """[[x, y], ...] with at least 3 finite numeric points -> float [N, 2] array."""
    if not isinstance(points, list) or len(points) < 3:
        count = len(points) if isinstance(points, list) else type(points).__name__
        raise DataError(where, record_name, field, f"a polygon needs at least 3 [x, y] points, got {count}")
    for i, p in enumerate(points):
        ok = isinstance(p, list) and len(p) == 2
        if not ok or not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in p):
            raise DataError(where, record_name, field, f"point {i} is {p!r:.60}, expected two finite numbers")
    return np.asarray(points, dtype=np.float64)


def image_ref(image: Path, out_dir: Path, where: Path, record_name: Any) -> str:
    """Path stored in the split file: relative to its folder when possible, else absolute."""
    if not image.is_file():
        raise DataError(where, record_name, "image", f"image file not found: {image}")
    absolute = os.path.abspath(image)
    try:
        return os.path.relpath(absolute, os.path.abspath(out_dir))
    except ValueError:  # Windows: image and split file on different drives
        return absolute
