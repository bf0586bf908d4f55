"""How masked per-token loss terms [B, T] become one scalar.

An aggregation maps ``(values [B, T], mask [B, T] bool)`` to a 0-d tensor. Masked
positions must already hold finite values (the caller zeroes them); they are excluded
from sums and counts.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from rewards.registry import Registry

Aggregation = Callable[[Tensor, Tensor], Tensor]
AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")


@AGGREGATIONS.register("seq_mean_group_mean")
def seq_mean_group_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Eq. 10's 1/|o| Σ_t then 1/G Σ_i: a token-mean per response, then a mean over responses.

    Every group has G responses, so the mean of the group means is the mean over
    responses; that form also holds for micro-batches that split a group. A response
    with no valid token has no term and is left out of the count.
    """
    counts = mask.sum(dim=-1)
    per_seq = (values * mask).sum(dim=-1) / counts.clamp(min=1)
    has_tokens = counts > 0
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)


@AGGREGATIONS.register("token_mean")
def token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """One mean over every valid token of the batch (DAPO): long responses weigh more."""
    return (values * mask).sum() / mask.sum().clamp(min=1)
