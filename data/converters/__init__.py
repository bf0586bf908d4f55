"""Converters from upstream dataset formats into canonical split files.

Each converter reads one split of one upstream layout and returns canonical
Samples; `convert` writes them with `write_samples`, so every dataset reaches
training and evaluation through the same validated schema.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from data.converters import grefcoco, reasonseg, refer
from data.schema import Sample, write_samples

# (src, split, out_dir, image_root) -> samples
Converter = Callable[[Path, str, Path, Path | None], list[Sample]]

CONVERTERS: dict[str, Converter] = {
    "reasonseg": reasonseg.convert_split,
    **{name: partial(refer.convert_split, dataset=name) for name in refer.REFS_FILES},
    "grefcoco": grefcoco.convert_split,
}


def convert(fmt: str, src: str | Path, split: str, out_file: str | Path, image_root: str | Path | None = None) -> Path:
    """Convert one split of `src` (format `fmt`) into the canonical file `out_file`.

    Image paths are stored relative to `out_file`'s folder when possible.
    Note: all of a split's Samples (decoded masks) are held in memory before writing.
    """
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(CONVERTERS)}")
    out_file = Path(out_file)
    root = None if image_root is None else Path(image_root)
    return write_samples(CONVERTERS[fmt](Path(src), split, out_file.parent, root), out_file)
