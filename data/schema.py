"""The canonical sample schema every dataset is converted into.

One row is one (image, query) pair. Masks travel as COCO RLE so a split of any
size stays small on disk and in the object store; they are decoded only where
pixels are needed (rewards, losses, metrics).

Columns (Arrow / Parquet):

| column       | type                          | meaning                                              |
|--------------|-------------------------------|------------------------------------------------------|
| sample_id    | string                        | unique within a split file                           |
| image_id     | string                        | id of the image in its source dataset                |
| image_path   | string                        | image file, relative to the split file's folder or absolute |
| height       | int32                         | image height in pixels                               |
| width        | int32                         | image width in pixels                                |
| question     | string                        | the (implicit) query                                 |
| is_sentence  | bool                          | long reasoning sentence (True) or short phrase       |
| answer_type  | string                        | "single", "multi" or "no_target"                     |
| masks        | list<struct<counts, size>>    | GT instance masks, COCO RLE; empty when no_target    |
| ignore_mask  | struct<counts, size> or null  | pixels excluded from metrics (ReasonSeg "ignore")    |
| no_target    | bool                          | false-premise query: the right answer is no mask     |
| split        | string                        | train / val / test / testA / ...                     |
| dataset      | string                        | dataset of origin (synthetic, reasonseg, refcoco...) |
| reasoning    | string or null                | reference reasoning for the SFT warm start, if known |
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from data.atomic import atomic_path
from data.rle import MAX_MASK_PIXELS, decode_rle

ANSWER_TYPES = ("single", "multi", "no_target")
NULLABLE = ("ignore_mask", "reasoning")

RLE_TYPE = pa.struct([("counts", pa.string()), ("size", pa.list_(pa.int32()))])

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image_id", pa.string()),
        ("image_path", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("question", pa.string()),
        ("is_sentence", pa.bool_()),
        ("answer_type", pa.string()),
        ("masks", pa.list_(RLE_TYPE)),
        ("ignore_mask", RLE_TYPE),
        ("no_target", pa.bool_()),
        ("split", pa.string()),
        ("dataset", pa.string()),
        ("reasoning", pa.string()),
    ]
)


class DataError(ValueError):
    """Bad dataset input; the message names the file, the record and the field."""

    def __init__(self, where: str | Path, record: str | int | None, field_name: str | None, problem: str):
        parts = [str(where)]
        if record is not None:
            parts.append(f"record {record}")
        if field_name is not None:
            parts.append(f"field '{field_name}'")
        super().__init__(": ".join(parts) + f": {problem}")
        self.where, self.record, self.field_name, self.problem = str(where), record, field_name, problem


def encode_mask(mask: np.ndarray) -> dict:
    """Bool/uint8 [H, W] array -> COCO RLE dict with a str `counts` (Arrow-friendly)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(s) for s in rle["size"]]}


def decode_mask(rle: dict, max_pixels: int = MAX_MASK_PIXELS) -> np.ndarray:
    """COCO RLE dict (str or bytes `counts`) -> bool [H, W] array.

    Strict: pycocotools decodes a truncated string into uninitialised memory,
    so our own decoder checks the runs cover the mask exactly.
    """
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return decode_rle({"counts": counts, "size": rle["size"]}, max_pixels)


def mask_pixels(height: int, width: int, masks: int) -> int:
    """Pixels one sample's masks hold together (an image's worth at least): what
    ``max_pixels`` caps, so that no record can make a reader allocate without bound."""
    return height * width * max(1, masks)


@dataclass
class Sample:
    """One canonical row; `masks` are bool [H, W] arrays (encoded on write)."""

    sample_id: str
    image_id: str
    image_path: str
    height: int
    width: int
    question: str
    split: str
    dataset: str
    masks: list[np.ndarray] = field(default_factory=list)
    ignore_mask: np.ndarray | None = None
    no_target: bool = False
    is_sentence: bool = False
    reasoning: str | None = None

    @property
    def gt_stack(self) -> np.ndarray:
        """[G, H, W] bool GT (G = 0 for a no-target sample)."""
        return np.stack(self.masks) if self.masks else np.zeros((0, self.height, self.width), bool)

    @property
    def answer_type(self) -> str:
        if self.no_target:
            return "no_target"
        return "multi" if len(self.masks) > 1 else "single"

    def check(self, where: str | Path = "<memory>", max_pixels: int = MAX_MASK_PIXELS) -> None:
        """Raise DataError if the sample breaks the schema's invariants or its masks exceed ``max_pixels``."""
        hw = (self.height, self.width)
        if self.height <= 0 or self.width <= 0:
            raise DataError(where, self.sample_id, "height/width", f"image size must be positive, got {hw}")
        masks = len(self.masks) + (self.ignore_mask is not None)
        if mask_pixels(self.height, self.width, masks) > max_pixels:
            raise DataError(where, self.sample_id, "height/width", f"{self.height}x{self.width} image with {masks} "
                            f"mask(s) exceeds the cap of {max_pixels} mask pixels per sample")
        if not self.question.strip():
            raise DataError(where, self.sample_id, "question", "empty question")
        if self.no_target and self.masks:
            raise DataError(where, self.sample_id, "masks", "a no-target sample must have no masks")
        if not self.no_target and not self.masks:
            raise DataError(where, self.sample_id, "masks", "a target sample needs at least one mask")
        for i, m in enumerate(self.masks + ([self.ignore_mask] if self.ignore_mask is not None else [])):
            if m.shape != hw:
                raise DataError(where, self.sample_id, "masks", f"mask {i} has shape {m.shape}, image is {hw}")
        for i, m in enumerate(self.masks):
            if not m.any():
                raise DataError(where, self.sample_id, "masks", f"mask {i} is empty")

    def to_row(self) -> dict:
        return {
            "sample_id": self.sample_id,
            "image_id": self.image_id,
            "image_path": self.image_path,
            "height": self.height,
            "width": self.width,
            "question": self.question,
            "is_sentence": self.is_sentence,
            "answer_type": self.answer_type,
            "masks": [encode_mask(m) for m in self.masks],
            "ignore_mask": None if self.ignore_mask is None else encode_mask(self.ignore_mask),
            "no_target": self.no_target,
            "split": self.split,
            "dataset": self.dataset,
            "reasoning": self.reasoning,
        }

    @classmethod
    def from_row(cls, row: dict, where: str | Path = "<memory>") -> "Sample":
        """A row of a split file, checked before any mask is decoded: no nulls outside NULLABLE,
        the size within MAX_MASK_PIXELS, answer_type one of ANSWER_TYPES and true to the masks."""
        record = row.get("sample_id")
        for name in SCHEMA.names:
            if row.get(name) is None and name not in NULLABLE:
                raise DataError(where, record, name, "missing (null)")
        masks = len(row["masks"]) + (row["ignore_mask"] is not None)
        if row["height"] <= 0 or row["width"] <= 0 or mask_pixels(row["height"], row["width"], masks) > MAX_MASK_PIXELS:
            raise DataError(where, record, "height/width", f"{row['height']}x{row['width']} with {masks} mask(s) is "
                            f"not a usable image size (positive, at most {MAX_MASK_PIXELS} mask pixels per sample)")
        expected = "no_target" if row["no_target"] else "multi" if len(row["masks"]) > 1 else "single"
        if row["answer_type"] != expected:
            problem = (f"{row['answer_type']!r} is not one of {', '.join(ANSWER_TYPES)}"
                       if row["answer_type"] not in ANSWER_TYPES else
                       f"{row['answer_type']!r} but no_target={row['no_target']} with {len(row['masks'])} mask(s) "
                       f"makes it {expected!r}")
            raise DataError(where, record, "answer_type", problem)

        def decode(rle: dict, name: str) -> np.ndarray:
            try:
                return decode_mask(rle)
            except Exception as exc:  # pycocotools raises bare exceptions on garbage
                raise DataError(where, record, name, f"undecodable RLE ({exc})") from exc

        return cls(
            sample_id=row["sample_id"],
            image_id=row["image_id"],
            image_path=row["image_path"],
            height=row["height"],
            width=row["width"],
            question=row["question"],
            split=row["split"],
            dataset=row["dataset"],
            masks=[decode(r, "masks") for r in row["masks"] or []],
            ignore_mask=None if row["ignore_mask"] is None else decode(row["ignore_mask"], "ignore_mask"),
            no_target=row["no_target"],
            is_sentence=row["is_sentence"],
            reasoning=row["reasoning"],
        )


def samples_to_table(samples: Iterable[Sample], where: str | Path = "<memory>",
                     max_pixels: int = MAX_MASK_PIXELS) -> pa.Table:
    """Validate samples (unique ids, invariants, ``max_pixels``) and build the canonical table.

    Each sample is encoded as it comes, so a generator of samples (a converter) holds one
    sample's decoded masks at a time, not a whole split's.
    """
    seen: set[str] = set()
    rows = []
    for s in samples:
        s.check(where, max_pixels)
        if s.sample_id in seen:
            raise DataError(where, s.sample_id, "sample_id", "duplicate sample id")
        seen.add(s.sample_id)
        rows.append(s.to_row())
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_samples(samples: Iterable[Sample], path: str | Path, max_pixels: int = MAX_MASK_PIXELS) -> Path:
    """Write one split file atomically (a crash leaves no half-written Parquet), each page with its CRC:
    without one, a third of single bit flips in a split's pages read back as other values, unnoticed."""
    path = Path(path)
    table = samples_to_table(samples, path, max_pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
    return path


def read_table(path: str | Path) -> pa.Table:
    """Read a split file (page CRCs checked where it has them) and check its columns against SCHEMA."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except Exception as exc:
        raise DataError(path, None, None, f"not a readable Parquet file ({exc})") from exc
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise DataError(path, None, ", ".join(missing), "missing column(s)")
    table = table.select(SCHEMA.names)
    if not table.schema.equals(SCHEMA):
        for got, want in zip(table.schema, SCHEMA):
            if not got.type.equals(want.type):
                raise DataError(path, None, want.name, f"type {got.type}, expected {want.type}")
    return table


def read_samples(path: str | Path) -> list[Sample]:
    """Read a split file into decoded Samples, validating each record and the ids' uniqueness."""
    path = Path(path)
    samples, seen = [], set()
    for row in read_table(path).to_pylist():
        sample = Sample.from_row(row, path)
        sample.check(path)
        if sample.sample_id in seen:
            raise DataError(path, sample.sample_id, "sample_id", "duplicate sample id")
        seen.add(sample.sample_id)
        samples.append(sample)
    return samples


def split_images(path: str | Path) -> list[Path]:
    """The image file of every row of a split file, read without decoding any mask."""
    path = Path(path)
    table = read_table(path)
    images = table.column("image_path").to_pylist()
    for sample_id, image in zip(table.column("sample_id").to_pylist(), images):
        if not image:
            raise DataError(path, sample_id, "image_path", "missing (null or empty)")
    return [resolve_image(path, image) for image in images]


def resolve_image(split_file: str | Path, image_path: str) -> Path:
    """Image paths are relative to the split file's folder unless absolute."""
    p = Path(image_path)
    return p if p.is_absolute() else Path(split_file).parent / p
