"""Trajectory batches: the Arrow schema responses travel in between actors.

A trajectory batch is a ``pa.RecordBatch`` with one row per sampled response. Actors pass
it by ObjectRef; Arrow buffers are zero-copy in the object store, so a reader in another
actor gets numpy views of the mask probabilities without a copy or a pickle.

Columns come in stages. Every stage carries the key columns; a stage's schema lists what
its consumer requires, and extra columns are always allowed (``require_columns``), so a
later stage (token ids, logprobs, weights version: the distributed issue) extends a batch
without breaking any reader here.

| column         | type                       | stage    | meaning                                |
|----------------|----------------------------|----------|----------------------------------------|
| sample_id      | string                     | key      | dataset sample the prompt came from    |
| group_id       | string                     | key      | the G responses sampled for one prompt |
| response_index | int32                      | key      | 0 .. group_size - 1 within the group   |
| group_size     | int32                      | scored   | G, the same on every row of a group    |
| text           | string                     | scored   | the response text                      |
| num_slots      | int32                      | scored   | K predicted masks                      |
| mask_height    | int32                      | scored   | H of the mask resolution               |
| mask_width     | int32                      | scored   | W of the mask resolution               |
| mask_probs     | large_list<float32>        | scored   | K·H·W probabilities, row-major [K,H,W] |
| confidences    | list<float32>              | scored   | K slot confidences                     |
| gt_masks       | list<struct<counts, size>> | scored   | GT masks, COCO RLE at H×W (schema.py)  |
| no_target      | bool                       | scored   | the right answer is no mask            |
| format_score   | float32                    | rewarded | null when the row has an error         |
| mask_score     | float32                    | rewarded | null when the row has an error         |
| reward         | float32                    | rewarded | 0 when the row has an error            |
| advantage      | float32                    | rewarded | group-relative advantage               |
| error          | string                     | rewarded | null, or a code from ``ROW_ERRORS``    |

Masks are a flat ``large_list<float32>`` plus per-row K, H, W rather than Arrow's
fixed-shape tensor type: both read back as numpy views, but a fixed-shape tensor bakes
(K, H, W) into the column type, so batches at two resolutions or slot counts would have
different schemas and could not be concatenated. 64-bit offsets because 512 responses of
4 slots at 1024² already exceed the 2³¹ values a ``list`` can address.

The GT masks must be given at the mask resolution (the producer resizes them). A batch
must hold every response of each of its groups: advantages are normalised within a group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipelines.data.rle import RLEError, decode_rle, rle_shape
from pipelines.data.schema import RLE_TYPE, encode_mask

KEY_FIELDS = [
    pa.field("sample_id", pa.string()),
    pa.field("group_id", pa.string()),
    pa.field("response_index", pa.int32()),
]
GROUP_SIZE_FIELD = pa.field("group_size", pa.int32())
SCORED_FIELDS = [
    GROUP_SIZE_FIELD,
    pa.field("text", pa.string()),
    pa.field("num_slots", pa.int32()),
    pa.field("mask_height", pa.int32()),
    pa.field("mask_width", pa.int32()),
    pa.field("mask_probs", pa.large_list(pa.float32())),
    pa.field("confidences", pa.list_(pa.float32())),
    pa.field("gt_masks", pa.list_(RLE_TYPE)),
    pa.field("no_target", pa.bool_()),
]
REWARD_FIELDS = [
    pa.field("format_score", pa.float32()),
    pa.field("mask_score", pa.float32()),
    pa.field("reward", pa.float32()),
    pa.field("advantage", pa.float32()),
    pa.field("error", pa.string()),
]
KEY_COLUMNS = [f.name for f in KEY_FIELDS]
SCORED_SCHEMA = pa.schema(KEY_FIELDS + SCORED_FIELDS)  # reference scorer -> reward workers
REWARDED_SCHEMA = pa.schema(KEY_FIELDS + REWARD_FIELDS)  # reward workers -> learner

# Row error codes: why a row could not be scored (the first failing check wins).
NULL_FIELD = "null_field"  # a required cell is null
MASK_SIZE_MISMATCH = "mask_size_mismatch"  # K, H, W < 1 or len(mask_probs) != K·H·W
CONFIDENCE_COUNT = "confidence_count_mismatch"  # len(confidences) != K
RLE_UNDECODABLE = "rle_undecodable"  # a GT RLE does not describe a mask
GT_SHAPE_MISMATCH = "gt_shape_mismatch"  # a GT mask is not H×W
NO_TARGET_MISMATCH = "no_target_mismatch"  # no_target but GT masks, or neither
MASK_PROBS_INVALID = "mask_probs_invalid"  # NaN, inf or outside [0, 1]
CONFIDENCES_INVALID = "confidences_invalid"  # NaN, inf or outside [0, 1]
ROW_ERRORS = (
    NULL_FIELD,
    MASK_SIZE_MISMATCH,
    CONFIDENCE_COUNT,
    RLE_UNDECODABLE,
    GT_SHAPE_MISMATCH,
    NO_TARGET_MISMATCH,
    MASK_PROBS_INVALID,
    CONFIDENCES_INVALID,
)


class SchemaError(ValueError):
    """A batch lacks a column its consumer needs, or has it with another type."""


class SplitGroupError(ValueError):
    """A batch breaks the group contract: every group complete, keys present and unique."""


class RowError(ValueError):
    """One malformed row; ``code`` is one of ``ROW_ERRORS``."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code


def require_columns(batch: pa.RecordBatch, schema: pa.Schema, what: str) -> None:
    """Raise SchemaError unless ``batch`` has every field of ``schema`` with its type."""
    problems = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            problems.append(f"missing {field.name!r}")
        elif not batch.schema.field(index).type.equals(field.type):
            got = batch.schema.field(index).type
            problems.append(f"{field.name!r} is {got}, expected {field.type}")
    if problems:
        raise SchemaError(f"{what}: " + "; ".join(problems))


def as_record_batch(data: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """One RecordBatch from a batch or a table (a multi-chunk table is combined once)."""
    if isinstance(data, pa.RecordBatch):
        return data
    if isinstance(data, pa.Table):
        columns = [column.combine_chunks() for column in data.columns]
        return pa.RecordBatch.from_arrays(columns, schema=data.schema)
    raise TypeError(f"expected a pyarrow RecordBatch or Table, got {type(data).__name__}")


def group_rows(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """Row indices of each group, in response_index order; SplitGroupError if incomplete.

    The contract: keys and group_size are never null, a group's rows agree on group_size,
    and their response_index values are exactly 0 .. group_size - 1.
    """
    require_columns(batch, pa.schema(KEY_FIELDS + [GROUP_SIZE_FIELD]), "trajectory batch")
    names = KEY_COLUMNS + [GROUP_SIZE_FIELD.name]
    sample_ids, group_ids, indices, sizes = (batch.column(n).to_pylist() for n in names)
    members: dict[str, list[int]] = {}
    for row, cells in enumerate(zip(sample_ids, group_ids, indices, sizes)):
        if None in cells:
            raise SplitGroupError(f"row {row} has a null key or group_size: {cells}")
        members.setdefault(group_ids[row], []).append(row)
    out = {}
    for group, rows in members.items():
        group_sizes = {sizes[r] for r in rows}
        got = sorted(indices[r] for r in rows)
        if len(group_sizes) != 1 or got != list(range(next(iter(group_sizes)))):
            raise SplitGroupError(
                f"group {group!r} is not complete in this batch: response_index {got}, "
                f"group_size {sorted(group_sizes)}; a batch must hold every response of "
                "each of its groups exactly once"
            )
        out[group] = np.array(sorted(rows, key=indices.__getitem__), np.int64)
    return out


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


def make_scored_batch(
    *,
    sample_ids: Sequence[str],
    group_ids: Sequence[str],
    response_indices: Sequence[int],
    group_sizes: int | Sequence[int],
    texts: Sequence[str],
    mask_probs,
    confidences,
    gt_masks: Sequence[Sequence],
    no_target: Sequence[bool] | None = None,
) -> pa.RecordBatch:
    """A ``SCORED_SCHEMA`` batch from Python / numpy values, one entry per response.

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
        for f in SCORED_SCHEMA
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=SCORED_SCHEMA)


def _list_parts(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column as numpy; values is a view unless it has nulls."""
    values = column.values.to_numpy(zero_copy_only=False)  # null floats read as NaN
    return values, column.offsets.to_numpy()


@dataclass(frozen=True)
class ScoredRow:
    """One response ready for scoring: probs [K, H, W] (a view), confidences [K], GT [G, H, W]."""

    text: str
    mask_probs: np.ndarray
    confidences: np.ndarray
    gt_masks: np.ndarray


class ScoredRows:
    """Reads the rows of a ``SCORED_SCHEMA`` batch; a malformed row raises RowError.

    The probability masks are numpy views into the batch's Arrow buffer (read-only, no
    copy). GT masks are decoded once per distinct RLE: a group shares one GT set.
    """

    def __init__(self, batch: pa.RecordBatch):
        require_columns(batch, SCORED_SCHEMA, "scored batch")
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

    def row(self, i: int) -> ScoredRow:
        """Row ``i`` with its arrays; RowError names the first check it fails."""
        cells = {name: values[i] for name, values in self._cells.items()}
        nulls = [name for name, value in cells.items() if value is None]
        nulls += [name for name, null in self._list_nulls.items() if null[i]]
        if nulls:
            raise RowError(NULL_FIELD, ", ".join(nulls))
        shape = (cells["num_slots"], cells["mask_height"], cells["mask_width"])
        return ScoredRow(
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


def attach_rewards(batch: pa.RecordBatch, rewarded: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with the reward columns of ``rewarded`` appended (zero-copy).

    Both must list the same responses in the same order (checked on the key columns).
    """
    require_columns(batch, pa.schema(KEY_FIELDS), "batch")
    require_columns(rewarded, REWARDED_SCHEMA, "rewarded batch")
    for name in KEY_COLUMNS:
        if not batch.column(name).equals(rewarded.column(name)):
            raise ValueError(f"the batches disagree on {name!r}: not the same rows in order")
    names = [f.name for f in REWARD_FIELDS]
    kept = [f.name for f in batch.schema if f.name not in names]
    return pa.RecordBatch.from_arrays(
        [batch.column(n) for n in kept] + [rewarded.column(n) for n in names],
        names=kept + names,
    )
