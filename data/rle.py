"""Strict decoding of COCO compressed RLE masks that may be malformed.

pycocotools trusts its input: a counts string whose runs sum to less than h·w decodes
without error into a mask whose tail is uninitialised memory (``""`` at 8×8 came back with
14 random pixels set). Trajectory batches cross process boundaries and feed the reward, so
they are decoded here instead: the runs are parsed with numpy, checked to tile the mask
exactly, and expanded without pycocotools. A mask larger than ``MAX_MASK_PIXELS`` is refused
before anything is allocated: a few bytes of counts can claim a 10^6 x 10^6 mask.
"""

from __future__ import annotations

import numpy as np

# A run needs at most 7 characters of 5 bits (areas below 2**34); longer is malformed.
_MAX_CHARS_PER_RUN = 7
_FIRST_CHAR, _LAST_CHAR = 48, 48 + 63

MAX_MASK_PIXELS = 1 << 27
"""The most pixels (height x width) of any mask decoded from outside data, about 134 million
(11585 x 11585): far above COCO's 640 x 640 or a photo's 24 MP, far below what exhausts memory.
The converters take a lower cap from ``data.max_mask_pixels``."""


class RLEError(ValueError):
    """A COCO RLE that does not describe a mask."""


def rle_runs(counts: str) -> np.ndarray:
    """Run lengths (int64, alternating 0s and 1s, column-major) of a compressed counts string.

    The format of pycocotools' ``rleToString``: each run is a little-endian sequence of
    5-bit groups in the characters 48..111, bit 0x20 marking "more follows" and bit 0x10 of
    the last character the sign; from the third run on a run is stored as its difference
    to the run two places back.
    """
    try:
        raw = np.frombuffer(counts.encode("ascii"), np.uint8)
    except (AttributeError, UnicodeEncodeError):
        raise RLEError(f"counts must be an ASCII str, got {counts!r:.40}") from None
    if raw.size == 0:
        return np.zeros(0, np.int64)
    if raw.min() < _FIRST_CHAR or raw.max() > _LAST_CHAR:
        raise RLEError("counts has characters outside the RLE alphabet")
    chars = raw.astype(np.int64) - _FIRST_CHAR
    ends = np.flatnonzero((chars & 0x20) == 0)  # the last character of each run
    if ends.size == 0 or ends[-1] != chars.size - 1:
        raise RLEError("counts ends inside a run")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_CHARS_PER_RUN:
        raise RLEError("counts has a run longer than any mask")
    place = np.arange(chars.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((chars & 0x1F) << (5 * place), starts)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def rle_shape(rle, max_pixels: int = MAX_MASK_PIXELS) -> tuple[int, int]:
    """``(h, w)`` from an RLE's ``size``, or RLEError (also when h x w exceeds ``max_pixels``)."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0 for s in size)
    ):
        raise RLEError(f"RLE size must be [h, w] with h, w >= 0, got {size!r:.60}")
    height, width = int(size[0]), int(size[1])
    if height * width > max_pixels:
        raise RLEError(f"RLE size {height}x{width} exceeds the cap of {max_pixels} pixels")
    return height, width


def decode_rle(rle, max_pixels: int = MAX_MASK_PIXELS) -> np.ndarray:
    """Bool [h, w] mask of a COCO RLE dict with str ``counts``; RLEError if malformed or too large."""
    height, width = rle_shape(rle, max_pixels)
    runs = rle_runs(rle.get("counts"))
    if (runs < 0).any() or int(runs.sum()) != height * width:
        raise RLEError(f"RLE runs do not tile a {height}x{width} mask")
    values = np.arange(runs.size) % 2 == 1  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, runs)
    return np.ascontiguousarray(flat.reshape(width, height).T)  # COCO is column-major
