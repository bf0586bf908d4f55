"""Group-relative advantages from scalar rewards (GRPO's critic-free baseline), in torch.

An estimator maps ``(rewards [N], group_size)`` — N a multiple of the group size, each
group the consecutive responses to one prompt — to advantages [N]. ``"grpo"`` agrees
with :func:`rewards.advantages.group_advantages` (the numpy version the reward workers
use): unbiased std, ε = 1e-6, flat groups → exact zeros.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.losses.registry import Registry

AdvantageEstimator = Callable[[Tensor, int], Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")

ADVANTAGE_EPS = 1e-6


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """[N] → [N / G, G] in float64, so the statistics match numpy's to the last bits."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ValueError(f"len(rewards) = {rewards.numel()} is not a multiple of group_size = {group_size}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contains NaN or inf")
    return rewards.to(torch.float64).reshape(-1, group_size)


def _zero_flat_groups(groups: Tensor, adv: Tensor) -> Tensor:
    """[N / G, G] → [N] with exact zeros for groups whose rewards are all equal: they
    carry no learning signal. ``max == min`` is an exact test; ``std == 0`` is not after
    mean rounding.
    """
    flat = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv).reshape(-1)


def _standardised(rewards: Tensor, group_size: int, correction: int) -> Tensor:
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if group_size == 1:  # std undefined: a lone response has no baseline to beat
        return torch.zeros_like(rewards, dtype=torch.float64)
    std = groups.std(dim=1, correction=correction, keepdim=True)
    return _zero_flat_groups(groups, centred / (std + ADVANTAGE_EPS))


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo(rewards: Tensor, group_size: int) -> Tensor:
    """(r − mean) / (std + 1e-6) with the unbiased (n − 1) std, as EasyR1/SegCompass's ``torch.std``."""
    return _standardised(rewards, group_size, correction=1)


@ADVANTAGE_ESTIMATORS.register("grpo_population_std")
def grpo_population_std(rewards: Tensor, group_size: int) -> Tensor:
    """(r − mean) / (std + 1e-6) with the population (n) std, as the GRPO paper's formula reads."""
    return _standardised(rewards, group_size, correction=0)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo(rewards: Tensor, group_size: int) -> Tensor:
    """r − mean, no std division (Dr. GRPO): low-variance groups are not up-weighted."""
    groups = _groups(rewards, group_size)
    return _zero_flat_groups(groups, groups - groups.mean(dim=1, keepdim=True))


def compute_advantages(rewards: Tensor, group_size: int, estimator: str = "grpo") -> Tensor:
    """Advantages [N] in the rewards' float dtype (float32 for integer rewards)."""
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return ADVANTAGE_ESTIMATORS.get(estimator)(rewards, group_size).to(out_dtype)
