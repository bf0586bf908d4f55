"""Reward workers on the session's local Ray cluster: exact rewards, bad rows, refs, pool."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import ray

from actors.reward import RewardWorker
from actors.reward_pool import RewardPool
from data.reference_rows import make_reference_batch
from data.trajectory import (
    REFERENCE_SCHEMA,
    REWARD_SCHEMA,
    ROW_ERRORS,
    SchemaError,
    SplitGroupError,
    attach_rewards,
)
from rewards import group_advantages
from rewards.batch import reward_batch

H = W = 4
CLEAN = "<think>look</think> <SEG>"  # format 1.0 under both presets
PREFIXED = "Sure. <think>look</think><SEG>"  # 0.9 under both: text before <think>
TRAILING = "<think>look</think><SEG> done"  # paper 0.9 (text after token), code 1.0
NO_TAGS = "no tags here"  # 0.0


def cols(*columns: int) -> np.ndarray:
    """A 4×4 mask that is set on the given columns."""
    mask = np.zeros((H, W), np.float32)
    mask[:, list(columns)] = 1
    return mask


LEFT, RIGHT = cols(0, 1), cols(2, 3)  # two GT objects of 8 pixels


def group(group_id, texts, probs, confs, gts, **extra):
    """Keyword arguments of make_reference_batch for one complete group."""
    n = len(texts)
    return dict(
        sample_ids=[f"s-{group_id}"] * n, group_ids=[group_id] * n, response_indices=list(range(n)),
        group_sizes=n, texts=texts, mask_probs=[np.asarray(p, np.float32) for p in probs],
        confidences=confs, gt_masks=gts, **extra,
    )


def batch_of(*groups) -> pa.RecordBatch:
    merged = {k: [v for g in groups for v in g[k]] for k in groups[0] if k != "group_sizes"}
    merged["group_sizes"] = [len(g["texts"]) for g in groups for _ in g["texts"]]
    return make_reference_batch(**merged)


# Hand-computed (format, mask) per row; soft IoU = Σpg / (Σp + Σg − Σpg).
SINGLE = group(
    0,
    [CLEAN, PREFIXED, NO_TAGS, CLEAN],
    [[LEFT], [cols(1, 2)], [0.5 * LEFT], [np.full((H, W), 0.5)]],
    [[0.9], [0.9], [0.9], [0.1]],  # K = G = 1 is plain soft IoU: the 0.1 gates nothing
    [[LEFT]] * 4,
)
SINGLE_SCORES = [(1.0, 1.0), (0.9, 4 / 12), (0.0, 4 / 8), (1.0, 4 / 12)]
MULTI = group(
    1,
    [CLEAN, CLEAN, TRAILING],
    [[RIGHT, LEFT], [LEFT, RIGHT], [LEFT, RIGHT]],
    [[0.9, 0.8], [0.9, 0.2], [0.1, 0.1]],
    [[LEFT, RIGHT]] * 3,
)
MULTI_SCORES = {  # one confident perfect slot of two objects: paper 1/1, code 1/max(1, 2)
    "paper": [(1.0, 1.0), (1.0, 1.0), (0.9, 0.0)],
    "segcompass-code": [(1.0, 1.0), (1.0, 0.5), (1.0, 0.0)],
}
NONE = group(2, [CLEAN, CLEAN], [[LEFT, RIGHT]] * 2, [[0.1, 0.2], [0.9, 0.1]], [[], []])
NONE_SCORES = [(1.0, 1.0), (1.0, 0.0)]  # no target: any confident slot scores 0


@pytest.fixture(scope="module")
def worker(ray_cluster):
    actor = RewardWorker.options(num_cpus=0.5).remote()
    yield actor
    ray.kill(actor)


def expected_rewards(scores, weights=(0.3, 0.7)):
    return np.array([weights[0] * f + weights[1] * m for f, m in scores])


def hand_advantages(rewards):
    rewards = np.asarray(rewards, np.float64)
    if rewards.max() == rewards.min():
        return np.zeros_like(rewards)
    return (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-6)


@pytest.mark.parametrize("preset", ["paper", "segcompass-code"])
def test_known_masks_give_exact_rewards_and_advantages(worker, preset):
    out = ray.get(worker.reward.remote(batch_of(SINGLE, MULTI, NONE), preset=preset))
    groups = [SINGLE_SCORES, MULTI_SCORES[preset], NONE_SCORES]
    scores = [s for g in groups for s in g]
    rewards = [expected_rewards(g) for g in groups]
    fmt, mask = np.float32(scores).T
    np.testing.assert_array_equal(out["format_score"].to_numpy(), fmt)
    np.testing.assert_array_equal(out["mask_score"].to_numpy(), mask)
    np.testing.assert_array_equal(out["reward"].to_numpy(), np.float32(np.concatenate(rewards)))
    advantage = out["advantage"].to_numpy()
    pure = np.concatenate([group_advantages(r, len(r)) for r in rewards])
    np.testing.assert_array_equal(advantage, pure.astype(np.float32))
    np.testing.assert_allclose(advantage, np.concatenate([hand_advantages(r) for r in rewards]),
                               rtol=1e-6, atol=1e-6)
    assert out["error"].null_count == out.num_rows
    assert abs(out["reward"][1].as_py() - (0.3 * 0.9 + 0.7 / 3)) < 1e-6


def test_configured_advantage_estimator_is_used(worker):
    """dr_grpo centres each group's rewards without dividing by their std."""
    out = ray.get(worker.reward.remote(batch_of(SINGLE, NONE), advantage_estimator="dr_grpo"))
    rewards = [expected_rewards(SINGLE_SCORES), expected_rewards(NONE_SCORES)]
    centred = np.concatenate([r - r.mean() for r in rewards])
    np.testing.assert_allclose(out["advantage"].to_numpy(), centred, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="advantage estimator"):
        reward_batch(batch_of(SINGLE), advantage_estimator="ppo")


def test_object_ref_input_and_weights(worker):
    batch = batch_of(SINGLE)
    out = ray.get(worker.reward.remote(ray.put(batch), weights=(0.0, 1.0)))
    np.testing.assert_array_equal(out["reward"].to_numpy(), out["mask_score"].to_numpy())
    by_value = ray.get(worker.reward.remote(batch))
    assert by_value.equals(reward_batch(batch))


def test_output_schema_keys_and_join(worker):
    batch = batch_of(SINGLE, NONE)
    out = ray.get(worker.reward.remote(ray.put(batch)))
    assert out.schema.equals(REWARD_SCHEMA)
    for key in ("sample_id", "group_id", "response_index"):
        assert out.column(key).equals(batch.column(key))
    joined = attach_rewards(batch, out)
    assert joined.schema.names == REFERENCE_SCHEMA.names + REWARD_SCHEMA.names[3:]
    with pytest.raises(SchemaError, match="missing 'gt_masks'"):
        reward_batch(batch.drop_columns(["gt_masks"]))


def test_workers_run_single_threaded(worker):
    env = ray.get(worker.__ray_call__.remote(lambda self: dict(os.environ)))
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "1"


def with_cell(batch: pa.RecordBatch, name: str, row: int, value) -> pa.RecordBatch:
    """``batch`` with one cell of column ``name`` replaced."""
    values = batch.column(name).to_pylist()
    values[row] = value
    index = batch.schema.get_field_index(name)
    field = batch.schema.field(index)
    return batch.set_column(index, field, pa.array(values, field.type))


def test_malformed_rows_get_zero_reward_and_an_error_code(worker):
    nan = LEFT.copy()
    nan[0, 0] = np.nan
    rows = [  # (text, probs, confidences, GT masks, expected error)
        (CLEAN, [LEFT], [0.9], [LEFT], None),
        (CLEAN, [LEFT], [0.9], [{"counts": "garbage!!", "size": [H, W]}], "rle_undecodable"),
        (CLEAN, [LEFT], [0.9], [{"counts": "0", "size": [H, W]}], "rle_undecodable"),  # truncated
        (CLEAN, [LEFT], [0.9], [np.ones((8, 8), bool)], "gt_shape_mismatch"),
        (CLEAN, [nan], [0.9], [LEFT], "mask_probs_invalid"),
        (CLEAN, [LEFT, RIGHT], [0.9], [LEFT], "confidence_count_mismatch"),
        (CLEAN, [LEFT, RIGHT], [0.9, np.nan], [LEFT], "confidences_invalid"),
        (CLEAN, [LEFT], [0.9], [LEFT], "mask_size_mismatch"),  # num_slots edited below
        (CLEAN, [LEFT], [0.9], [LEFT], "no_target_mismatch"),  # no_target edited below
        (None, [LEFT], [0.9], [LEFT], "null_field"),
        (CLEAN, [0.5 * LEFT], [0.9], [LEFT], None),
    ]
    texts, probs, confs, gts, codes = zip(*rows)
    assert set(codes) - {None} == set(ROW_ERRORS)  # every code is exercised
    batch = make_reference_batch(**group(3, list(texts), probs, confs, list(gts)))
    batch = with_cell(with_cell(batch, "num_slots", 7, 3), "no_target", 8, True)

    out = ray.get(worker.reward.remote(ray.put(batch)))

    assert out["error"].to_pylist() == list(codes)
    reward = np.zeros(len(rows))
    reward[0], reward[-1] = 1.0, 0.3 + 0.7 * 0.5
    np.testing.assert_array_equal(out["reward"].to_numpy(), reward.astype(np.float32))
    np.testing.assert_array_equal(out["advantage"].to_numpy(),
                                  group_advantages(reward, len(rows)).astype(np.float32))
    assert out["mask_score"].to_pylist()[1:-1] == [None] * (len(rows) - 2)
    assert out["format_score"].null_count == len(rows) - 2


def test_split_group_is_reported_and_the_worker_survives(worker):
    pair = group(7, [CLEAN, CLEAN], [[LEFT]] * 2, [[0.9]] * 2, [[LEFT]] * 2)
    split = make_reference_batch(**{**pair, "response_indices": [0, 2]})
    with pytest.raises(SplitGroupError, match=r"group 7 is not complete.*\[0, 2\]"):
        ray.get(worker.reward.remote(ray.put(split)))
    assert ray.get(worker.reward.remote(batch_of(NONE))).num_rows == 2


def test_pool_scores_batches_by_ref(ray_cluster):
    batches = [batch_of(SINGLE), batch_of(MULTI), batch_of(NONE), batch_of(SINGLE, NONE)]
    pool = RewardPool(2, num_cpus=0.5, preset="segcompass-code")
    try:
        outs = [pool.dispatch(ray.put(b))[0] for b in batches]
        assert all(isinstance(ref, ray.ObjectRef) for ref in outs)
        for batch, out in zip(batches, ray.get(outs)):
            assert out.equals(reward_batch(batch, preset="segcompass-code"))
    finally:
        pool.shutdown()


def test_pool_rejects_bad_settings_before_starting_workers(ray_cluster):
    with pytest.raises(ValueError, match="unknown reward preset"):
        RewardPool(2, preset="nope")
    with pytest.raises(ValueError, match="threshold"):
        RewardPool(1, threshold=1.5)
