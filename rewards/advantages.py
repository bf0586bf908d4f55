"""Scalar reward and GRPO group-relative advantages.

GRPO has no critic: a response's advantage is its reward standardised within the group of
responses sampled for the same prompt.
"""

from __future__ import annotations

import numpy as np

from rewards.validate import as_array, positive_int, require_unit_interval, reward_weights

ADVANTAGE_EPS = 1e-6


def total_reward(format, mask, weights=(0.3, 0.7)):
    """``weights[0]·format + weights[1]·mask`` (SegCompass: 0.3·format + 0.7·mask).

    ``format`` and ``mask`` are scores in [0, 1], scalars or arrays of one shape (a
    scalar broadcasts). Returns a float for scalar inputs, else an ndarray.
    """
    w_format, w_mask = reward_weights(weights)
    fmt = as_array("format", format)
    msk = as_array("mask", mask)
    if fmt.ndim and msk.ndim and fmt.shape != msk.shape:
        raise ValueError(f"format has shape {fmt.shape}, but mask has {msk.shape}")
    require_unit_interval("format", fmt)
    require_unit_interval("mask", msk)
    out = w_format * fmt.astype(np.float64) + w_mask * msk.astype(np.float64)
    return float(out) if out.ndim == 0 else out


def group_advantages(rewards, group_size: int) -> np.ndarray:
    """(r − group mean) / (group std + 1e-6) for consecutive groups of ``group_size``.

    ``std`` is the unbiased (ddof = 1) standard deviation, as ``torch.std`` in EasyR1 /
    SegCompass. A group whose rewards are all equal (including any group of size 1, where
    the unbiased std is undefined) gets exact zeros: it carries no learning signal.
    ``rewards`` is 1-D, finite, and its length a multiple of ``group_size``.
    """
    size = positive_int("group_size", group_size)
    values = as_array("rewards", rewards, ndim=1).astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("rewards contains NaN or inf")
    if values.size % size:
        raise ValueError(
            f"len(rewards) = {values.size} is not a multiple of group_size = {size}"
        )
    groups = values.reshape(-1, size)
    if size == 1:
        return np.zeros_like(values)
    mean = groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, ddof=1, keepdims=True)
    adv = (groups - mean) / (std + ADVANTAGE_EPS)
    # max == min is an exact zero-variance test; mean/std rounding is not.
    adv[groups.max(axis=1) == groups.min(axis=1)] = 0.0
    return adv.reshape(-1)
