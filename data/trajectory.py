"""Trajectory batches: the one Arrow column table a sample travels in, stage by stage.

A batch is a ``pa.RecordBatch`` with one row per prompt (prompt stage) or per sampled
response (every later stage). Actors pass it by ObjectRef; Arrow buffers are zero-copy in
the object store, so a reader in another actor gets numpy views without a copy or a
pickle. Bulk per-image data never travels here: actors read the cached vision features
and SAM embedding from the feature store by ``image_hash``.

Each stage adds its columns; a consumer checks only what it needs (``require_columns``)
and extra columns are always allowed.

| column           | type                       | stage     | meaning                                         |
|------------------|----------------------------|-----------|-------------------------------------------------|
| sample_id        | string                     | prompt    | dataset sample (key)                            |
| image_hash       | string                     | prompt    | feature-store key of the image                  |
| prompt_ids       | list<int32>                | prompt    | chat prompt with one image token                |
| gt_masks         | list<struct<counts, size>> | prompt    | GT masks, COCO RLE in SAM's low-res frame (H×W) |
| no_target        | bool                       | prompt    | false premise: the right answer is no mask      |
| group_id         | int64                      | prompt    | the ledger's group id (key): one per admission  |
| response_index   | int32                      | rollout   | 0 .. group_size - 1 within the group (key)      |
| group_size       | int32                      | rollout   | G, the same on every row of a group             |
| response_ids     | list<int32>                | rollout   | sampled tokens (EOS included when it was hit)   |
| rollout_logprobs | list<float32>              | rollout   | behaviour log-probabilities, one per token      |
| weights_version  | int32                      | rollout   | learner version of the weights that sampled it  |
| text             | string                     | rollout   | decoded response (special tokens skipped)       |
| ref_logprobs     | list<float32>              | reference | frozen reference policy's log-probabilities    |
| num_slots        | int32                      | reference | K predicted masks                               |
| mask_height      | int32                      | reference | H of the mask resolution                        |
| mask_width       | int32                      | reference | W of the mask resolution                        |
| mask_probs       | large_list<float32>        | reference | K·H·W probabilities, row-major [K, H, W]        |
| confidences      | list<float32>              | reference | K slot confidences                              |
| format_score     | float32                    | reward    | null when the row has an error                  |
| mask_score       | float32                    | reward    | null when the row has an error                  |
| reward           | float32                    | reward    | 0 when the row has an error                     |
| advantage        | float32                    | reward    | group-relative advantage                        |
| error            | string                     | reward    | null, or a code from ``ROW_ERRORS``             |

The reward workers read ``REFERENCE_SCHEMA`` (keys, group size, text, masks, GT) and
return only the keys and the reward columns (``REWARD_SCHEMA``); ``attach_rewards`` joins
them. The learner's batch drops ``LEARNER_DROPS`` and the learner reads
``LEARNER_COLUMNS``.

Masks are a flat ``large_list<float32>`` plus per-row K, H, W rather than Arrow's
fixed-shape tensor type: both read back as numpy views, but a fixed-shape tensor bakes
(K, H, W) into the column type, so batches at two resolutions or slot counts would have
different schemas and could not be concatenated. 64-bit offsets because 512 responses of
4 slots at 1024² already exceed the 2³¹ values a ``list`` can address.

The GT masks must be given at the mask resolution (the producer resizes them). A batch
must hold every response of each of its groups: advantages are normalised within a group.
A prompt row is one group the scheduler admitted: its ``group_id`` is the ledger's (never
reused in a run) and the rollout copies it to every response, so any row can be traced.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data.schema import RLE_TYPE

GROUP_ID_FIELD = pa.field("group_id", pa.int64())
PROMPT_FIELDS = [
    pa.field("sample_id", pa.string()),
    pa.field("image_hash", pa.string()),
    pa.field("prompt_ids", pa.list_(pa.int32())),
    pa.field("gt_masks", pa.list_(RLE_TYPE)),
    pa.field("no_target", pa.bool_()),
    GROUP_ID_FIELD,
]
ROLLOUT_FIELDS = [
    pa.field("response_index", pa.int32()),
    pa.field("group_size", pa.int32()),
    pa.field("response_ids", pa.list_(pa.int32())),
    pa.field("rollout_logprobs", pa.list_(pa.float32())),
    pa.field("weights_version", pa.int32()),
    pa.field("text", pa.string()),
]
REF_LOGPROBS_FIELD = pa.field("ref_logprobs", pa.list_(pa.float32()))
KEY_FIELDS = [
    pa.field("sample_id", pa.string()),
    GROUP_ID_FIELD,
    pa.field("response_index", pa.int32()),
]
GROUP_SIZE_FIELD = pa.field("group_size", pa.int32())
REFERENCE_FIELDS = [
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
PROMPT_SCHEMA = pa.schema(PROMPT_FIELDS)  # driver -> rollout
ROLLOUT_SCHEMA = pa.schema(PROMPT_FIELDS + ROLLOUT_FIELDS)  # rollout -> reference
REFERENCE_SCHEMA = pa.schema(KEY_FIELDS + REFERENCE_FIELDS)  # reference -> reward
REWARD_SCHEMA = pa.schema(KEY_FIELDS + REWARD_FIELDS)  # reward -> learner (joined by attach_rewards)
LEARNER_DROPS = ("mask_probs", "confidences", "text")  # bulk the learner does not need
LEARNER_COLUMNS = ("group_id", "image_hash", "prompt_ids", "response_ids", "rollout_logprobs", "ref_logprobs",
                   "gt_masks", "advantage", "error")  # what a learner rank reads of each row

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


def group_rows(batch: pa.RecordBatch) -> dict[int, np.ndarray]:
    """Row indices of each group, in response_index order; SplitGroupError if incomplete.

    The contract: keys and group_size are never null, a group's rows agree on group_size,
    and their response_index values are exactly 0 .. group_size - 1.
    """
    require_columns(batch, pa.schema(KEY_FIELDS + [GROUP_SIZE_FIELD]), "trajectory batch")
    names = KEY_COLUMNS + [GROUP_SIZE_FIELD.name]
    sample_ids, group_ids, indices, sizes = (batch.column(n).to_pylist() for n in names)
    members: dict[int, list[int]] = {}
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


def attach_rewards(batch: pa.RecordBatch, rewarded: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with the reward columns of ``rewarded`` appended (zero-copy).

    Both must list the same responses in the same order (checked on the key columns).
    """
    require_columns(batch, pa.schema(KEY_FIELDS), "batch")
    require_columns(rewarded, REWARD_SCHEMA, "rewarded batch")
    for name in KEY_COLUMNS:
        if not batch.column(name).equals(rewarded.column(name)):
            raise ValueError(f"the batches disagree on {name!r}: not the same rows in order")
    names = [f.name for f in REWARD_FIELDS]
    kept = [f.name for f in batch.schema if f.name not in names]
    return pa.RecordBatch.from_arrays(
        [batch.column(n) for n in kept] + [rewarded.column(n) for n in names],
        names=kept + names,
    )


def make_prompt_batch(rows: list[dict]) -> pa.RecordBatch:
    """Rows with the PROMPT_FIELDS keys -> a validated prompt batch."""
    return pa.RecordBatch.from_pylist(rows, schema=PROMPT_SCHEMA)
