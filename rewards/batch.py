"""The reward role's core, Ray-free: a reference batch in, rewards and advantages out.

The reward worker actor is a shell over ``reward_batch``. Input is a ``REFERENCE_SCHEMA``
batch, output a ``REWARD_SCHEMA`` batch: the key columns and the reward columns only, in the input's row order.
The masks are not sent back: the learner does not need them, and returning them would copy the bulk of
the batch into the object store a second time (``attach_rewards`` joins the two batches).

Per row:
- mask score: soft IoU of the single slot when K = G = 1 (no confidence gate), else the
  Hungarian multi-object score of the preset, slots gated by ``threshold`` (this includes
  a no-target row: G = 0);
- format score of the text under the preset (a text without the reference token is a
  "no such object" answer and is scored by ``response_format_score`` as a refusal),
  reward ``w_format·format + w_mask·mask``;
- advantage: the configured estimator (``rewards.advantages.ADVANTAGE_ESTIMATORS``: grpo,
  grpo_population_std, dr_grpo) over the group's rows in ``response_index`` order.

A malformed row (see ``data.trajectory.ROW_ERRORS``) gets reward 0, null format and
mask scores and its error code, and it still counts in its group's advantage as a response
with reward 0, like any failed response; the learner may drop rows whose ``error`` is set.
A batch that splits a group, or settings that are wrong (unknown preset, bad threshold),
raise: those are caller bugs, not bad data. The worker process never dies of either.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data.reference_rows import ReferenceRow, ReferenceRows
from data.trajectory import (
    CONFIDENCES_INVALID,
    KEY_COLUMNS,
    MASK_PROBS_INVALID,
    REWARD_SCHEMA,
    RowError,
    as_record_batch,
    group_rows,
)
from rewards.advantages import ADVANTAGE_ESTIMATORS, total_reward
from rewards.format import format_score, response_format_score
from rewards.masks import mask_score
from rewards.presets import DEFAULT_PRESET, get_preset
from rewards.validate import real_scalar, reward_weights

DEFAULT_REF_TOKEN = "<SEG>"



def check_settings(
    preset: str, ref_token: str, threshold: float, weights=None, advantage_estimator: str = "grpo"
) -> tuple[float, float]:
    """Validate the scoring settings; return the (format, mask) weights to use.

    ``weights=None`` means the preset's own. Raises ValueError on a bad setting, so a
    wrong config fails once and loudly instead of as an error on every row.
    """
    chosen = get_preset(preset).weights if weights is None else reward_weights(weights)
    format_score("", ref_token, preset)  # raises on a bad ref_token
    real_scalar("threshold", threshold, lo=0.0, hi=1.0)
    ADVANTAGE_ESTIMATORS.get(advantage_estimator)  # raises, naming the known ones
    return chosen


def _row_scores(row: ReferenceRow, preset: str, ref_token: str, threshold: float):
    """(format score, mask score) of one well-formed row; RowError for bad values."""
    conf = row.confidences
    if not ((conf >= 0) & (conf <= 1)).all():  # NaN fails both comparisons
        raise RowError(CONFIDENCES_INVALID, f"confidences {conf.tolist()}")
    try:
        mask = mask_score(row.mask_probs, conf, row.gt_masks, threshold, preset)
    except ValueError as exc:  # every other input is checked: the probabilities are bad
        raise RowError(MASK_PROBS_INVALID, str(exc)) from None
    return response_format_score(row.text, ref_token, preset), mask


def reward_batch(
    batch: pa.RecordBatch | pa.Table,
    preset: str = DEFAULT_PRESET,
    ref_token: str = DEFAULT_REF_TOKEN,
    threshold: float = 0.5,
    weights=None,
    advantage_estimator: str = "grpo",
) -> pa.RecordBatch:
    """The ``REWARD_SCHEMA`` batch of a ``REFERENCE_SCHEMA`` batch (module docstring).

    Raises SchemaError (missing / mistyped column), SplitGroupError (a group incomplete)
    or ValueError (bad settings); malformed rows are reported in the ``error`` column.
    """
    weights = check_settings(preset, ref_token, threshold, weights, advantage_estimator)
    estimate = ADVANTAGE_ESTIMATORS.get(advantage_estimator)
    batch = as_record_batch(batch)
    groups = group_rows(batch)
    rows = ReferenceRows(batch)
    n_rows = len(rows)
    fmt, mask = np.zeros(n_rows), np.zeros(n_rows)
    errors: list[str | None] = [None] * n_rows
    for i in range(n_rows):
        try:
            fmt[i], mask[i] = _row_scores(rows.row(i), preset, ref_token, threshold)
        except RowError as exc:
            errors[i] = exc.code
    failed = np.array([e is not None for e in errors], bool)
    reward = np.where(failed, 0.0, total_reward(fmt, mask, weights))
    advantage = np.zeros(n_rows)
    for members in groups.values():
        advantage[members] = estimate(reward[members], len(members))
    rewards = [
        pa.array(fmt.astype(np.float32), mask=failed),
        pa.array(mask.astype(np.float32), mask=failed),
        pa.array(reward.astype(np.float32)),
        pa.array(advantage.astype(np.float32)),
        pa.array(errors, pa.string()),
    ]
    keys = [batch.column(name) for name in KEY_COLUMNS]
    return pa.RecordBatch.from_arrays(keys + rewards, schema=REWARD_SCHEMA)


