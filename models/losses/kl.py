"""Per-token estimators of KL(π_θ ‖ π_ref) from the log-probabilities of sampled tokens.

Schulman's k1/k2/k3 ("Approximating KL divergence"). Each estimator maps
``(logprobs, ref_logprobs)`` of shape [B, T] to a per-token estimate [B, T]; the caller
masks and averages. ``k3`` is SegCompass eq. 11 and the default.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rewards.registry import Registry

KLEstimator = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")

K3_LOG_RATIO_CLAMP = 10.0
"""|log π_ref/π_θ| bound before exp in ``k3``: beyond it e^x overflows bf16/fp16 activations."""

LOW_VAR_KL_LOG_RATIO_CLAMP = 20.0
LOW_VAR_KL_MAX = 10.0
"""veRL/EasyR1 ``low_var_kl`` (SegCompass's released code): input clamp ±20, output clamp ≤ 10."""


def _k3_of(log_ratio: Tensor) -> Tensor:
    """e^x − x − 1 as expm1(x) − x: exact near 0 and never rounds below zero."""
    return torch.expm1(log_ratio) - log_ratio


@KL_ESTIMATORS.register("k1")
def k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """log π_θ/π_ref: unbiased, high variance, negative on single tokens."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """½ (log π_θ/π_ref)²: biased, low variance, ≥ 0."""
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_ESTIMATORS.register("k3")
def k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Eq. 11: r − log r − 1 with r = π_ref/π_θ; unbiased, low variance, ≥ 0.

    The log ratio is formed in log space and clamped to ±10 before exp, so one token
    with a collapsed π_θ cannot overflow the loss; inside the clamp this is exactly
    eq. 11, outside it the token's KL gradient is zero.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return _k3_of(log_ratio)


@KL_ESTIMATORS.register("low_var_kl")
def low_var_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 as SegCompass's released code computes it: the estimate itself capped at 10.

    Tokens whose KL estimate exceeds the cap stop receiving a KL gradient, which the
    paper's eq. 11 does not do; pick this to reproduce the released runs.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-LOW_VAR_KL_LOG_RATIO_CLAMP, LOW_VAR_KL_LOG_RATIO_CLAMP)
    return _k3_of(log_ratio).clamp(max=LOW_VAR_KL_MAX)
