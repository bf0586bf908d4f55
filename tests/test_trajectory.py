"""Trajectory schema helpers and strict RLE decoding (no Ray)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data.reference_rows import ReferenceRows, make_reference_batch
from data.rle import RLEError, decode_rle
from data.schema import decode_mask, encode_mask
from data.trajectory import (
    REFERENCE_SCHEMA,
    RowError,
    SchemaError,
    SplitGroupError,
    as_record_batch,
    attach_rewards,
    group_rows,
    require_columns,
)
from rewards.batch import reward_batch


def reference_batch(n=4, k=2, h=3, w=5, group_ids=None, indices=None, sizes=None, probs=None):
    rng = np.random.default_rng(n)
    gt = rng.random((h, w)) < 0.5
    return make_reference_batch(
        sample_ids=[f"s{i}" for i in range(n)],
        group_ids=group_ids or [0] * n,
        response_indices=indices or list(range(n)),
        group_sizes=sizes or n,
        texts=["<think>a</think><SEG>"] * n,
        mask_probs=rng.random((n, k, h, w), dtype=np.float32) if probs is None else probs,
        confidences=np.full((n, k), 0.7),
        gt_masks=[[gt]] * n,
    )


def test_decode_rle_matches_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = rng.integers(1, 30, 2)
        mask = rng.random((h, w)) < rng.random() if trial % 4 else np.full((h, w), trial % 8 == 0)
        rle = encode_mask(mask)
        np.testing.assert_array_equal(decode_rle(rle), mask)
        np.testing.assert_array_equal(decode_rle(rle), decode_mask(rle))


@pytest.mark.parametrize(
    "rle",
    [
        {"counts": "", "size": [8, 8]},  # pycocotools returns uninitialised pixels for these
        {"counts": "0", "size": [8, 8]},
        {"counts": "garbage!!", "size": [8, 8]},
        {"counts": "é", "size": [8, 8]},
        {"counts": "o" * 7 + "0", "size": [8, 8]},  # a run of 8 characters (40 bits)
        {"counts": "oo", "size": [8, 8]},  # ends inside a run
        {"counts": None, "size": [8, 8]},
        {"counts": "j035000>", "size": [8]},
        {"counts": "j035000>", "size": [-8, 8]},
        {"counts": "j035000>", "size": [16, 16]},  # runs tile 8×8, not 16×16
    ],
)
def test_decode_rle_rejects_malformed(rle):
    with pytest.raises(RLEError):
        decode_rle(rle)


def test_mask_probs_read_back_as_views_of_the_batch():
    probs = np.random.default_rng(1).random((4, 2, 3, 5), dtype=np.float32)
    batch = reference_batch(probs=probs)
    assert batch.schema.equals(REFERENCE_SCHEMA)
    rows = ReferenceRows(batch.slice(1))  # a slice keeps its offsets into the shared buffer
    for i in range(3):
        row = rows.row(i)
        np.testing.assert_array_equal(row.mask_probs, probs[i + 1])
        assert np.shares_memory(row.mask_probs, probs) and not row.mask_probs.flags.writeable
        assert row.gt_masks.shape == (1, 3, 5) and row.confidences.shape == (2,)


def test_ragged_rows_and_length_checks():
    batch = make_reference_batch(
        sample_ids=["a", "b"], group_ids=[0, 0], response_indices=[0, 1], group_sizes=2,
        texts=["x", "y"], mask_probs=[np.zeros((1, 2, 2)), np.ones((3, 4, 4))],
        confidences=[[0.1], [0.2, 0.3, 0.4]], gt_masks=[[], []],
    )
    assert batch["num_slots"].to_pylist() == [1, 3] and batch["no_target"].to_pylist() == [True] * 2
    assert ReferenceRows(batch).row(1).mask_probs.shape == (3, 4, 4)
    with pytest.raises(ValueError, match="every column needs 2 entries"):
        make_reference_batch(
            sample_ids=["a"], group_ids=[0, 0], response_indices=[0, 1], group_sizes=2,
            texts=["x", "y"], mask_probs=np.zeros((2, 1, 2, 2)), confidences=[[0.1]] * 2,
            gt_masks=[[], []],
        )


def test_null_cells_are_row_errors():
    batch = reference_batch(n=2)
    probs = pa.array([None, [0.5] * 30], pa.large_list(pa.float32()))
    batch = batch.set_column(batch.schema.get_field_index("mask_probs"), "mask_probs", probs)
    with pytest.raises(RowError) as err:
        ReferenceRows(batch).row(0)
    assert err.value.code == "null_field" and "mask_probs" in str(err.value)
    assert ReferenceRows(batch).row(1).mask_probs.shape == (2, 3, 5)


def test_group_rows_orders_by_response_index():
    batch = reference_batch(n=4, group_ids=[5, 9, 5, 9], indices=[1, 1, 0, 0], sizes=2)
    groups = group_rows(batch)
    assert {g: m.tolist() for g, m in groups.items()} == {5: [2, 0], 9: [3, 1]}


@pytest.mark.parametrize(
    "indices, sizes, message",
    [
        ([0, 1, 2], [4, 4, 4], r"response_index \[0, 1, 2\], group_size \[4\]"),  # missing tail
        ([0, 1, 1], [3, 3, 3], r"response_index \[0, 1, 1\]"),  # duplicate
        ([0, 1, 2], [3, 3, 2], r"group_size \[2, 3\]"),  # disagreement
    ],
)
def test_group_rows_rejects_incomplete_groups(indices, sizes, message):
    with pytest.raises(SplitGroupError, match=message):
        group_rows(reference_batch(n=3, indices=indices, sizes=sizes))


def test_group_rows_rejects_null_keys():
    batch = reference_batch(n=2)
    batch = batch.set_column(1, "group_id", pa.array([0, None], pa.int64()))
    with pytest.raises(SplitGroupError, match="row 1 has a null key"):
        group_rows(batch)


def test_tables_empty_batches_and_joins():
    batch = reference_batch(n=4)
    table = pa.Table.from_batches([batch.slice(0, 2), batch.slice(2)])
    assert as_record_batch(table).equals(batch)
    assert reward_batch(table).equals(reward_batch(batch))
    empty = reward_batch(batch.slice(0, 0))
    assert empty.num_rows == 0
    out = reward_batch(batch)
    with pytest.raises(ValueError, match="disagree on 'response_index'"):
        attach_rewards(reference_batch(n=4, indices=[1, 0, 2, 3]), out)


def test_require_columns_names_wrong_types():
    batch = reference_batch(n=1)
    batch = batch.set_column(2, "response_index", pa.array([0], pa.int64()))
    with pytest.raises(SchemaError, match="'response_index' is int64, expected int32"):
        require_columns(batch, REFERENCE_SCHEMA, "scored batch")
