"""Per-token policy-gradient surrogates (the first term of SegCompass eq. 10) and the
importance weights that correct them for stale samples.

A policy loss maps ``(log_ratio [B, T], advantages [B, 1], clip_ratio, clip_ratio_high)``
to ``(per-token loss [B, T], clipped [B, T] bool)``, where ``log_ratio`` is
log π_θ − log π_old and ``clipped`` marks tokens whose gradient the clip removed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rewards.registry import Registry

PolicyLoss = Callable[[Tensor, Tensor, float, float | None], tuple[Tensor, Tensor]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")

LOG_RATIO_CLAMP = 20.0
"""|log π_θ/π_old| bound before exp: keeps e^x finite in fp32; such a token is far outside
any trust region, and its clipped branch (when it applies) has zero gradient anyway."""

DAPO_CLIP_HIGH = 0.28
"""Upper ε of clip-higher when none is given (DAPO's value)."""


def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """PPO's pessimistic bound −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A), per token.

    A token is "clipped" when the clipped branch is strictly the larger loss: its ratio
    has already moved past the trust region in the direction the advantage favours, so
    it gets no gradient.
    """
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(loss_unclipped, loss_clipped), loss_clipped > loss_unclipped


@POLICY_LOSSES.register("grpo_clip")
def grpo_clip(log_ratio: Tensor, advantages: Tensor, clip_ratio: float, clip_ratio_high: float | None):
    """Eq. 10's symmetric clip, ε = ``clip_ratio``."""
    if clip_ratio_high is not None and clip_ratio_high != clip_ratio:
        raise ValueError("grpo_clip clips symmetrically; use grpo_clip_higher for a separate clip_ratio_high")
    return clipped_surrogate(log_ratio, advantages, clip_ratio, clip_ratio)


@POLICY_LOSSES.register("grpo_clip_higher")
def grpo_clip_higher(log_ratio: Tensor, advantages: Tensor, clip_ratio: float, clip_ratio_high: float | None):
    """DAPO's clip-higher: ε_low = ``clip_ratio``, ε_high = ``clip_ratio_high`` (0.28 if None).

    A wider upper bound lets low-probability tokens with positive advantage grow,
    which delays entropy collapse.
    """
    high = DAPO_CLIP_HIGH if clip_ratio_high is None else clip_ratio_high
    return clipped_surrogate(log_ratio, advantages, clip_ratio, high)


@torch.no_grad()
def truncated_is_weights(
    behaviour_logprobs: Tensor, proximal_logprobs: Tensor, cap: float = 2.0, mask: Tensor | None = None
) -> Tensor:
    """Truncated importance weights min(π_prox/π_behav, C) per token (TIS; AReaL's decoupled PPO).

    ``behaviour_logprobs`` are what the sampler (vLLM, possibly some versions behind)
    reported; ``proximal_logprobs`` are the learner's recomputation under the weights
    the clip is anchored to (``old_logprobs`` in :func:`grpo_loss`). The weight turns
    an expectation under the behaviour policy into one under the proximal policy; the
    cap bounds the variance a few very stale tokens could add. Constant (no gradient);
    0 at masked positions.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    log_w = proximal_logprobs.float() - behaviour_logprobs.float()
    if mask is not None:
        log_w = torch.where(mask.bool(), log_w, torch.zeros_like(log_w))
    weights = torch.exp(log_w.clamp(max=LOG_RATIO_CLAMP)).clamp(max=cap)
    return weights if mask is None else weights * mask.bool()
