"""Optimiser and schedule of SegCompass A.2.

AdamW (wd 0.01, betas 0.9/0.999) over per-module parameter groups with differential
learning rates — base 2e-6 for the LLM, ×25 query codebook, ×80 slot mapper, ×10 mask
decoder — a one-cycle schedule (final division 6.7, no warmup) and clip-norm 1.0.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

ONE_CYCLE_INITIAL_DIV = 25.0
"""A warmup starts at max_lr / 25, torch ``OneCycleLR``'s default ``div_factor``."""


def _decays(param: nn.Parameter) -> bool:
    """Weight decay only on matrices and kernels (ndim ≥ 2).

    Biases, norm scales (LayerNorm, RMSNorm, SAM's LayerNorm2d) and scalar gates are
    1-D or 0-D: decay would pull them towards 0, which for a norm scale means turning a
    channel off, not regularising a mapping.
    """
    return param.ndim >= 2


def param_groups(
    named_modules: dict[str, nn.Module],
    base_lr: float,
    multipliers: dict[str, float] | None = None,
    weight_decay: float = 0.01,
) -> list[dict]:
    """AdamW parameter groups: per module ``lr = base_lr · multipliers.get(name, 1.0)``,
    split into a decayed and a non-decayed group (see :func:`_decays`).

    ``named_modules`` maps a role ("lm", "projector", "query_codebook", "slot_mapper",
    "mask_decoder", …) to its module. A multiplier for a role the model lacks is
    ignored (READ has no codebook; config keys are already checked by the schema).
    Frozen parameters (``requires_grad`` False) are left out; a trainable parameter
    reachable from two roles is an error, since its learning rate would be ambiguous.
    Each group carries its ``name`` ("role/decay" or "role/no_decay") for logging.
    """
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    multipliers = multipliers or {}
    owner: dict[int, str] = {}
    groups = []
    for role, module in named_modules.items():
        lr = base_lr * multipliers.get(role, 1.0)
        split: dict[bool, list[nn.Parameter]] = {True: [], False: []}
        for param in module.parameters():
            if not param.requires_grad:
                continue
            if id(param) in owner:
                raise ValueError(f"a parameter of {role!r} is also in {owner[id(param)]!r}")
            owner[id(param)] = role
            split[_decays(param)].append(param)
        for decays, params in split.items():
            if params:
                groups.append({"name": f"{role}/{'decay' if decays else 'no_decay'}", "params": params,
                               "lr": lr, "weight_decay": weight_decay if decays else 0.0})
    assert sum(len(g["params"]) for g in groups) == len(owner), "a trainable parameter is in no group or in two"
    return groups


def build_optimizer(groups: list[dict], betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over ``groups``; every group brings its own lr and weight decay."""
    return torch.optim.AdamW(groups, betas=betas)


def one_cycle_factor(step: int, total_steps: int, final_div: float = 6.7, warmup_steps: int = 0) -> float:
    """Multiplier of each group's max lr at ``step`` (0-based).

    Linear warmup from 1/25 to 1 over ``warmup_steps``, then a cosine from 1 down to
    1/``final_div``, reached at the last step (``total_steps − 1``) and held after it.
    With no warmup, step 0 runs at the max lr, as A.2's "no warmup" asks. Note that
    ``final_div`` divides the max lr here, not the warmup's start as in torch's
    ``OneCycleLR``.
    """
    if step < warmup_steps:
        return 1.0 / ONE_CYCLE_INITIAL_DIV + (1.0 - 1.0 / ONE_CYCLE_INITIAL_DIV) * step / warmup_steps
    anneal_steps = total_steps - 1 - warmup_steps
    if anneal_steps <= 0:  # a run too short to anneal stays at the max lr
        return 1.0
    progress = min(1.0, (step - warmup_steps) / anneal_steps)
    floor = 1.0 / final_div
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def one_cycle(
    optimizer: torch.optim.Optimizer, total_steps: int, final_div: float = 6.7, warmup_fraction: float = 0.0
) -> LambdaLR:
    """LambdaLR applying :func:`one_cycle_factor` to every group, so the per-module lr
    ratios stay fixed through the schedule. Call ``scheduler.step()`` after each
    ``optimizer.step()``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if final_div < 1:
        raise ValueError(f"final_div must be >= 1, got {final_div}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must lie in [0, 1), got {warmup_fraction}")
    warmup_steps = round(warmup_fraction * total_steps)
    return LambdaLR(optimizer, lambda step: one_cycle_factor(step, total_steps, final_div, warmup_steps))


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float = 1.0) -> float:
    """Clip the global gradient norm to ``max_norm``; returns the norm before clipping (to log)."""
    return float(torch.nn.utils.clip_grad_norm_(list(params), max_norm))
