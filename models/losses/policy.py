"""Per-token policy-gradient surrogates (the first term of SegCompass eq. 10) and the
importance weights that correct them for stale samples.

A policy loss maps ``(log_ratio [B, T], advantages [B, 1], clip_ratio, clip_ratio_high,
dual_clip_c)`` to ``(per-token loss [B, T], clipped [B, T] bool)``, where ``log_ratio`` is
log π_θ − log π_old and ``clipped`` marks tokens whose gradient a clip removed. Options a
loss does not use must be None, so a config that sets one for the wrong loss fails.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rewards.registry import Registry

PolicyLoss = Callable[[Tensor, Tensor, float, float | None, float | None], tuple[Tensor, Tensor]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")

LOG_RATIO_CLAMP = 20.0
"""|log π_θ/π_old| bound before exp: keeps e^x finite in fp32; such a token is far outside
any trust region, and its clipped branch (when it applies) has zero gradient anyway."""

DAPO_CLIP_HIGH = 0.28
"""Upper ε of clip-higher when none is given (DAPO's value)."""

DUAL_CLIP_C = 3.0
"""Dual-clip bound c when none is given (verl's ``clip_ratio_c`` default)."""


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


def _no_dual_clip(name: str, dual_clip_c: float | None) -> None:
    if dual_clip_c is not None:
        raise ValueError(f"{name} has no dual clip; use grpo_dual_clip for dual_clip_c")


@POLICY_LOSSES.register("grpo_clip")
def grpo_clip(log_ratio: Tensor, advantages: Tensor, clip_ratio: float, clip_ratio_high: float | None,
              dual_clip_c: float | None = None):
    """Eq. 10's symmetric clip, ε = ``clip_ratio``."""
    if clip_ratio_high is not None and clip_ratio_high != clip_ratio:
        raise ValueError("grpo_clip clips symmetrically; use grpo_clip_higher for a separate clip_ratio_high")
    _no_dual_clip("grpo_clip", dual_clip_c)
    return clipped_surrogate(log_ratio, advantages, clip_ratio, clip_ratio)


@POLICY_LOSSES.register("grpo_clip_higher")
def grpo_clip_higher(log_ratio: Tensor, advantages: Tensor, clip_ratio: float, clip_ratio_high: float | None,
                     dual_clip_c: float | None = None):
    """DAPO's clip-higher: ε_low = ``clip_ratio``, ε_high = ``clip_ratio_high`` (0.28 if None).

    A wider upper bound lets low-probability tokens with positive advantage grow,
    which delays entropy collapse.
    """
    _no_dual_clip("grpo_clip_higher", dual_clip_c)
    high = DAPO_CLIP_HIGH if clip_ratio_high is None else clip_ratio_high
    return clipped_surrogate(log_ratio, advantages, clip_ratio, high)


@POLICY_LOSSES.register("grpo_dual_clip")
def grpo_dual_clip(log_ratio: Tensor, advantages: Tensor, clip_ratio: float, clip_ratio_high: float | None,
                   dual_clip_c: float | None = None):
    """PPO dual-clip (Ye et al. 2020, as verl): the clip, then for A < 0 the loss is capped at c·|A|.

    With a negative advantage the pessimistic bound grows with the ratio without limit, so
    one token whose probability rose far under stale weights could dominate the step; past
    r = c it contributes the constant c·|A| and no gradient. ε_high defaults to ε (symmetric).
    """
    c = DUAL_CLIP_C if dual_clip_c is None else dual_clip_c
    if c <= 1:
        raise ValueError(f"dual_clip_c must be > 1, got {c}")
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    loss, clipped = clipped_surrogate(log_ratio, advantages, clip_ratio, high)
    cap = -advantages * c
    dual = (advantages < 0) & (loss > cap)
    return torch.where(dual, cap.expand_as(loss), loss), clipped | dual


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
