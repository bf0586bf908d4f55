"""Converters from upstream dataset formats into canonical split files.

Each converter reads one split of one upstream layout and yields canonical
Samples; `convert` writes them with `write_samples`, so every dataset reaches
training and evaluation through the same validated schema. Outside data is held
to `Limits` (image size, polygon points) before any mask is drawn.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from data.converters import grefcoco, reasonseg, refer
from data.converters.sources import DEFAULT_LIMITS, Limits
from data.schema import DataError, Sample, write_samples

__all__ = ["CONVERTERS", "Limits", "convert"]

# (src, split, out_dir, image_root, limits) -> samples
Converter = Callable[[Path, str, Path, Path | None, Limits], Iterable[Sample]]

CONVERTERS: dict[str, Converter] = {
    "reasonseg": reasonseg.convert_split,
    **{name: partial(refer.convert_split, dataset=name) for name in refer.REFS_FILES},
    "grefcoco": grefcoco.convert_split,
}


def convert(fmt: str, src: str | Path, split: str, out_file: str | Path, image_root: str | Path | None = None,
            limits: Limits = DEFAULT_LIMITS) -> Path:
    """Convert one split of `src` (format `fmt`) into the canonical file `out_file`.

    Image paths are stored relative to `out_file`'s folder when possible. Masks are
    encoded sample by sample; the file is written once, whole, after the last sample.
    """
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(CONVERTERS)}")
    out_file = Path(out_file)
    if out_file.is_dir():
        raise DataError(out_file, None, "--out", "is a folder; give the .parquet file to write")
    blocked = next((p for p in out_file.parents if p.exists()), None)
    if blocked is not None and not blocked.is_dir():
        raise DataError(out_file, None, "--out", f"{blocked} is a file, not a folder")
    root = None if image_root is None else Path(image_root)
    samples = CONVERTERS[fmt](Path(src), split, out_file.parent, root, limits)
    return write_samples(samples, out_file, limits.max_pixels)
