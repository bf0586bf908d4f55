"""How masked per-token loss terms [B, T] become one scalar.

An aggregation maps ``(values [B, T], mask [B, T] bool, max_length)`` to a 0-d tensor.
Masked positions must already hold finite values (the caller zeroes them); they are
excluded from sums and counts. ``max_length`` is the longest response the rollout may
produce (``data.max_response_length``): the constant of aggregations that normalise by
one, ignored by the others.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from rewards.registry import Registry

Aggregation = Callable[[Tensor, Tensor, int | None], Tensor]
AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")


def _mean_over_responses(per_seq: Tensor, counts: Tensor) -> Tensor:
    """Mean of per-response terms over the responses with a valid token.

    Every group has G responses, so this equals the mean of the group means; that form
    also holds for micro-batches that split a group.
    """
    has_tokens = counts > 0
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)


@AGGREGATIONS.register("seq_mean_group_mean")
def seq_mean_group_mean(values: Tensor, mask: Tensor, max_length: int | None = None) -> Tensor:
    """Eq. 10's 1/|o| Σ_t then 1/G Σ_i: a token-mean per response, then a mean over responses.

    A response with no valid token has no term and is left out of the count.
    """
    counts = mask.sum(dim=-1)
    return _mean_over_responses((values * mask).sum(dim=-1) / counts.clamp(min=1), counts)


@AGGREGATIONS.register("token_mean")
def token_mean(values: Tensor, mask: Tensor, max_length: int | None = None) -> Tensor:
    """One mean over every valid token of the batch (DAPO): long responses weigh more."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(values: Tensor, mask: Tensor, max_length: int | None = None) -> Tensor:
    """Dr. GRPO: Σ_t per response over the constant ``max_length``, then a mean over responses.

    Dividing by |o| makes a wrong long answer cost less per token than a wrong short
    one (a length bias); a constant divisor weighs every token alike within and across
    responses. Responses without a valid token are left out of the mean, as above.
    """
    if max_length is None or max_length < 1:
        raise ValueError(f"seq_mean_token_sum_norm needs max_length >= 1 (the max response length), got {max_length}")
    counts = mask.sum(dim=-1)
    return _mean_over_responses((values * mask).sum(dim=-1) / max_length, counts)
