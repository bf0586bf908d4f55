"""The GRPO objective of SegCompass eq. 10–11: clipped policy gradient + β·KL to the reference."""
from __future__ import annotations

import torch
from torch import Tensor

from models.losses.aggregation import AGGREGATIONS
from models.losses.kl import KL_ESTIMATORS
from models.losses.policy import LOG_RATIO_CLAMP, POLICY_LOSSES


def _check_shapes(logprobs: Tensor, advantages: Tensor, **per_token: Tensor | None) -> None:
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, tensor in per_token.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, logprobs {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}")


def _valid(values: Tensor, mask: Tensor) -> Tensor:
    """fp32 copy with masked positions set to 0, so padding garbage (even inf/NaN)
    reaches no exp, no sum and no gradient: ``where`` routes a zero gradient to them."""
    return torch.where(mask, values.float(), 0.0)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio: float = 0.2,
    kl_coef: float = 0.2,
    kl_estimator: str = "k3",
    policy_loss: str = "grpo_clip",
    is_weights: Tensor | None = None,
    aggregation: str = "seq_mean_group_mean",
    clip_ratio_high: float | None = None,
    dual_clip_c: float | None = None,
    max_response_length: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Loss to minimise (the negative of eq. 10) and its metrics.

    ``logprobs`` [B, T] are π_θ's (with gradient), ``old_logprobs`` the π_old the clip is
    anchored to, ``ref_logprobs`` the frozen reference's (None only when ``kl_coef`` is
    0), ``advantages`` [B] one per response, ``response_mask`` [B, T] the response tokens.
    ``is_weights`` [B, T] (see :func:`truncated_is_weights`) scale the policy-gradient
    term only: the KL term is an exact penalty on π_θ, not an estimate under the sampler.
    Per-token terms are computed in fp32 and aggregated by ``aggregation`` (which may need
    ``max_response_length``, its constant). ``clip_ratio_high`` and ``dual_clip_c`` go to
    the policy loss (see ``models.losses.policy``).

    Metrics: ``loss``, ``pg_loss``, ``kl`` (aggregated like the loss), ``clip_fraction``,
    ``ratio_mean``, ``ratio_max`` (π_θ/π_old over valid tokens), ``is_weight_mean``.
    """
    _check_shapes(logprobs, advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                  response_mask=response_mask, is_weights=is_weights)
    if not 0.0 < clip_ratio < 1.0:
        raise ValueError(f"clip_ratio must lie in (0, 1), got {clip_ratio}")
    if ref_logprobs is None and kl_coef != 0:
        raise ValueError("ref_logprobs is required when kl_coef != 0")
    pg_fn, aggregate = POLICY_LOSSES.get(policy_loss), AGGREGATIONS.get(aggregation)
    kl_fn = KL_ESTIMATORS.get(kl_estimator)

    mask = response_mask.bool()
    logp = _valid(logprobs, mask)
    log_ratio = logp - _valid(old_logprobs, mask)
    pg_tok, clipped = pg_fn(log_ratio, advantages.float().unsqueeze(-1), clip_ratio, clip_ratio_high, dual_clip_c)
    if is_weights is not None:
        pg_tok = pg_tok * _valid(is_weights, mask).detach()
    pg = aggregate(pg_tok, mask, max_response_length)
    kl = (aggregate(kl_fn(logp, _valid(ref_logprobs, mask)), mask, max_response_length)
          if ref_logprobs is not None else pg.new_zeros(()))
    loss = pg + kl_coef * kl

    with torch.no_grad():
        n_valid = mask.sum().clamp(min=1)
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) * mask
        weights = _valid(is_weights, mask) if is_weights is not None else mask.float()
        values = torch.stack([loss, pg, kl, (clipped & mask).sum() / n_valid, ratio.sum() / n_valid,
                              ratio.max(), weights.sum() / n_valid])
    names = ("loss", "pg_loss", "kl", "clip_fraction", "ratio_mean", "ratio_max", "is_weight_mean")
    return loss, dict(zip(names, values.tolist()))
