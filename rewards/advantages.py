"""Scalar reward and GRPO group-relative advantages (GRPO has no critic), in numpy.

An advantage estimator maps ``(rewards [N], group_size)`` — N a multiple of the group
size, each group the consecutive responses to one prompt — to advantages [N] (float64).
Flat groups (all rewards equal, a group of one included) get exact zeros: they carry no
learning signal, and ``max == min`` is an exact test where ``std == 0`` is not after
rounding. The reward workers select one by name (``grpo.advantage_estimator``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rewards.registry import Registry
from rewards.validate import as_array, positive_int, require_unit_interval, reward_weights

ADVANTAGE_EPS = 1e-6
AdvantageEstimator = Callable[[np.ndarray, int], np.ndarray]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


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


def _groups(rewards, group_size: int) -> np.ndarray:
    """[N] → [N / G, G] float64, after checking the contract."""
    size = positive_int("group_size", group_size)
    values = as_array("rewards", rewards, ndim=1).astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("rewards contains NaN or inf")
    if values.size % size:
        raise ValueError(f"len(rewards) = {values.size} is not a multiple of group_size = {size}")
    return values.reshape(-1, size)


def _zero_flat_groups(groups: np.ndarray, adv: np.ndarray) -> np.ndarray:
    adv[groups.max(axis=1) == groups.min(axis=1)] = 0.0
    return adv.reshape(-1)


def _standardised(rewards, group_size: int, ddof: int) -> np.ndarray:
    groups = _groups(rewards, group_size)
    if groups.shape[1] == 1:  # std undefined: a lone response has no baseline to beat
        return np.zeros(groups.size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    return _zero_flat_groups(groups, centred / (groups.std(axis=1, ddof=ddof, keepdims=True) + ADVANTAGE_EPS))


@ADVANTAGE_ESTIMATORS.register("grpo")
def group_advantages(rewards, group_size: int) -> np.ndarray:
    """(r − mean) / (std + 1e-6) with the unbiased (n − 1) std, as EasyR1/SegCompass's ``torch.std``."""
    return _standardised(rewards, group_size, ddof=1)


@ADVANTAGE_ESTIMATORS.register("grpo_population_std")
def grpo_population_std(rewards, group_size: int) -> np.ndarray:
    """(r − mean) / (std + 1e-6) with the population (n) std, as the GRPO paper's formula reads."""
    return _standardised(rewards, group_size, ddof=0)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo(rewards, group_size: int) -> np.ndarray:
    """r − mean, no std division (Dr. GRPO): low-variance groups are not up-weighted."""
    groups = _groups(rewards, group_size)
    return _zero_flat_groups(groups, groups - groups.mean(axis=1, keepdims=True))
