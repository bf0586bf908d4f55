"""Building and reading reference-stage trajectory batches (``data.trajectory``'s mask columns).

``make_reference_batch`` builds one from Python / numpy values; ``ReferenceRows`` reads its
rows as numpy views for the reward workers and names the first problem of a malformed row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from data.rle import RLEError, decode_rle, rle_shape
from data.schema import encode_mask
from data.trajectory import (
    CONFIDENCE_COUNT,
    GT_SHAPE_MISMATCH,
    MASK_SIZE_MISMATCH,
    NO_TARGET_MISMATCH,
    NULL_FIELD,
    REFERENCE_SCHEMA,
    RLE_UNDECODABLE,
    RowError,
    require_columns,
)


def mask_list_array(mask_probs) -> tuple[pa.Array, list[tuple[int, int, int]]]:
    """large_list<float32> of [R, K, H, W] (zero-copy when float32) or of R [K, H, W] arrays."""
    if isinstance(mask_probs, np.ndarray) and mask_probs.ndim == 4:
        rows = [mask_probs.shape[1:]] * mask_probs.shape[0]
        flat = np.ascontiguousarray(mask_probs, np.float32).reshape(-1)
    else:
        arrays = [np.asarray(m, np.float32) for m in mask_probs]
        if any(a.ndim != 3 for a in arrays):
            raise ValueError("mask_probs must be [R, K, H, W] or a sequence of [K, H, W]")
        rows = [a.shape for a in arrays]
        flat = np.concatenate([a.reshape(-1) for a in arrays] or [np.zeros(0, np.float32)])
    sizes = [int(np.prod(shape)) for shape in rows]
    offsets = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)), rows


def make_reference_batch(
    *,
    sample_ids: Sequence[str],
    group_ids: Sequence[int],
    response_indices: Sequence[int],
    group_sizes: int | Sequence[int],
    texts: Sequence[str],
    mask_probs,
    confidences,
    gt_masks: Sequence[Sequence],
    no_target: Sequence[bool] | None = None,
) -> pa.RecordBatch:
    """A ``REFERENCE_SCHEMA`` batch from Python / numpy values, one entry per response.

    ``mask_probs`` is [R, K, H, W] or R arrays [K, H, W]; ``confidences`` [R, K] or R
    sequences; ``gt_masks`` R sequences of COCO RLE dicts or bool [H, W] arrays (encoded
    here); ``no_target`` defaults to "the row has no GT masks". Contents are not checked
    (the reward workers report malformed rows), only that every column has R entries.
    """
    masks, shapes = mask_list_array(mask_probs)
    n_rows = len(shapes)
    if isinstance(group_sizes, (int, np.integer)):
        group_sizes = [int(group_sizes)] * n_rows
    gt_rles = [[m if isinstance(m, dict) else encode_mask(np.asarray(m)) for m in masks_of_row]
               for masks_of_row in gt_masks]
    if no_target is None:
        no_target = [not row for row in gt_rles]
    columns = {
        "sample_id": sample_ids,
        "group_id": group_ids,
        "response_index": response_indices,
        "group_size": group_sizes,
        "text": texts,
        "num_slots": [s[0] for s in shapes],
        "mask_height": [s[1] for s in shapes],
        "mask_width": [s[2] for s in shapes],
        "mask_probs": masks,
        "confidences": [np.asarray(c, np.float32) for c in confidences],
        "gt_masks": gt_rles,
        "no_target": no_target,
    }
    wrong = {name: len(values) for name, values in columns.items() if len(values) != n_rows}
    if wrong:
        raise ValueError(f"every column needs {n_rows} entries (one per mask row), got {wrong}")
    arrays = [
        columns[f.name] if f.name == "mask_probs" else pa.array(columns[f.name], f.type)
        for f in REFERENCE_SCHEMA
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=REFERENCE_SCHEMA)


def _list_parts(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column as numpy; values is a view unless it has nulls."""
    values = column.values.to_numpy(zero_copy_only=False)  # null floats read as NaN
    return values, column.offsets.to_numpy()


@dataclass(frozen=True)
class ReferenceRow:
    """One response ready for scoring: probs [K, H, W] (a view), confidences [K], GT [G, H, W]."""

    text: str
    mask_probs: np.ndarray
    confidences: np.ndarray
    gt_masks: np.ndarray


class ReferenceRows:
    """Reads the rows of a ``REFERENCE_SCHEMA`` batch; a malformed row raises RowError.

    The probability masks are numpy views into the batch's Arrow buffer (read-only, no
    copy). GT masks are decoded once per distinct RLE: a group shares one GT set.
    """

    def __init__(self, batch: pa.RecordBatch):
        require_columns(batch, REFERENCE_SCHEMA, "scored batch")
        self._probs, self._probs_at = _list_parts(batch.column("mask_probs"))
        self._conf, self._conf_at = _list_parts(batch.column("confidences"))
        small = ("text", "num_slots", "mask_height", "mask_width", "gt_masks", "no_target")
        self._cells = {name: batch.column(name).to_pylist() for name in small}
        self._list_nulls = {
            name: batch.column(name).is_null().to_numpy(zero_copy_only=False)
            for name in ("mask_probs", "confidences")
        }
        self._decoded: dict[tuple, np.ndarray | RowError] = {}

    def __len__(self) -> int:
        return len(self._cells["text"])

    def row(self, i: int) -> ReferenceRow:
        """Row ``i`` with its arrays; RowError names the first check it fails."""
        cells = {name: values[i] for name, values in self._cells.items()}
        nulls = [name for name, value in cells.items() if value is None]
        nulls += [name for name, null in self._list_nulls.items() if null[i]]
        if nulls:
            raise RowError(NULL_FIELD, ", ".join(nulls))
        shape = (cells["num_slots"], cells["mask_height"], cells["mask_width"])
        return ReferenceRow(
            text=cells["text"],
            mask_probs=self._mask_probs(i, shape),
            confidences=self._confidences(i, shape[0]),
            gt_masks=self._gt_masks(cells["gt_masks"], shape[1:], cells["no_target"]),
        )

    def _mask_probs(self, i: int, shape: tuple[int, int, int]) -> np.ndarray:
        start, stop = self._probs_at[i], self._probs_at[i + 1]
        if min(shape) < 1 or stop - start != np.prod(shape, dtype=np.int64):
            detail = f"{stop - start} values for [K, H, W] = {list(shape)}"
            raise RowError(MASK_SIZE_MISMATCH, detail)
        return self._probs[start:stop].reshape(shape)

    def _confidences(self, i: int, slots: int) -> np.ndarray:
        start, stop = self._conf_at[i], self._conf_at[i + 1]
        if stop - start != slots:
            raise RowError(CONFIDENCE_COUNT, f"{stop - start} confidences for {slots} slots")
        return self._conf[start:stop]

    def _gt_masks(self, rles: list, shape: tuple[int, int], no_target: bool) -> np.ndarray:
        if no_target == bool(rles):
            raise RowError(NO_TARGET_MISMATCH, f"no_target={no_target} with {len(rles)} GT masks")
        masks = [self._decode(rle, shape) for rle in rles]
        return np.stack(masks) if masks else np.zeros((0, *shape), bool)

    def _decode(self, rle: dict | None, shape: tuple[int, int]) -> np.ndarray:
        key = None if rle is None else (rle.get("counts"), tuple(rle.get("size") or ()))
        if key not in self._decoded:
            self._decoded[key] = _checked_decode(rle, shape)
        result = self._decoded[key]
        if isinstance(result, RowError):
            raise result
        return result


def _checked_decode(rle: dict | None, shape: tuple[int, int]) -> np.ndarray | RowError:
    """The decoded GT mask, or the RowError saying why it is unusable (cached either way)."""
    try:
        if rle_shape(rle) != tuple(shape):
            return RowError(GT_SHAPE_MISMATCH, f"GT {rle_shape(rle)}, masks {tuple(shape)}")
        return decode_rle(rle)
    except RLEError as exc:
        return RowError(RLE_UNDECODABLE, str(exc))
