"""Supervised losses of the segmentation head (SegCompass A.1).

Dice + BCE on the mask logits against the ground truth and, for K slots, a confidence
loss on which slots were matched to an object. The caller adds the result to the GRPO
loss and calls backward once: total = grpo + segmentation_loss(...). The weights map
field for field onto ``SegLossConfig`` (SegCompass's released code: seg 0.3, conf 0.2).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

DICE_SMOOTH = 1.0
"""Added to Dice's numerator and denominator: an empty target with an empty prediction
scores a perfect 0 loss instead of 0/0."""


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """[N, H, W] logits and {0, 1} targets → [N] of 1 − (2Σpg + s) / (Σp + Σg + s), p = σ(logits)."""
    probs, targets = torch.sigmoid(logits).flatten(1), targets.flatten(1)
    overlap = (probs * targets).sum(dim=1)
    return 1.0 - (2.0 * overlap + DICE_SMOOTH) / (probs.sum(dim=1) + targets.sum(dim=1) + DICE_SMOOTH)


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """[N, H, W] → [N]: per-pixel binary cross-entropy, mean over the pixels of each mask."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(dim=1)


def soft_iou_matrix(probs: Tensor, targets: Tensor) -> Tensor:
    """[K, G] Σpg / (Σp + Σg − Σpg) of every slot against every GT mask; 1 where both are empty."""
    p, g = probs.flatten(1), targets.flatten(1)
    inter = p @ g.T
    union = p.sum(dim=1, keepdim=True) + g.sum(dim=1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.ones_like(inter))


@torch.no_grad()
def match_slots(mask_logits: Tensor, gt_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Hungarian assignment of K slots to G objects minimising Σ(1 − soft IoU).

    Returns (slot indices, object indices), min(K, G) pairs in slot order. The match is
    a constant: gradients flow through the matched losses, not through the assignment.
    """
    cost = 1.0 - soft_iou_matrix(torch.sigmoid(mask_logits.float()), gt_masks.float())
    rows, cols = linear_sum_assignment(cost.cpu().numpy().astype(np.float64))
    device = mask_logits.device
    return (torch.as_tensor(rows, device=device, dtype=torch.long),
            torch.as_tensor(cols, device=device, dtype=torch.long))


def _check(mask_logits: Tensor, gt_masks: Tensor, confidence_logits: Tensor | None) -> None:
    if mask_logits.ndim != 3 or mask_logits.shape[0] < 1:
        raise ValueError(f"mask_logits must be [K >= 1, H, W], got {tuple(mask_logits.shape)}")
    if gt_masks.ndim != 3 or gt_masks.shape[1:] != mask_logits.shape[1:]:
        raise ValueError(f"gt_masks must be [G, {mask_logits.shape[1]}, {mask_logits.shape[2]}], "
                         f"got {tuple(gt_masks.shape)}")
    if confidence_logits is not None and confidence_logits.shape != mask_logits.shape[:1]:
        raise ValueError(f"confidence_logits must be [K] = [{mask_logits.shape[0]}], "
                         f"got {tuple(confidence_logits.shape)}")


def _pairs(logits: Tensor, gt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(predicted logits, targets, slot indices) of the supervised slot/target pairs.

    K = 1 is the single-object path: the one slot learns the union of the objects (an
    empty target when there are none). K > 1 learns the Hungarian pairs only; the
    unmatched slots are taught by the confidence loss alone.
    """
    if logits.shape[0] == 1:
        target = gt.amax(dim=0, keepdim=True) if gt.shape[0] else torch.zeros_like(logits)
        return logits, target, torch.zeros(1, dtype=torch.long, device=logits.device)
    rows, cols = match_slots(logits, gt)
    return logits[rows], gt[cols], rows


def segmentation_loss(
    mask_logits: Tensor,
    gt_masks: Tensor,
    confidence_logits: Tensor | None = None,
    *,
    seg_coef: float = 1.0,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    conf_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """seg_coef·(dice_weight·Dice + bce_weight·BCE) + conf_weight·confidence BCE, one sample.

    ``mask_logits`` [K, H, W] (SAM decoder output at the GT resolution), ``gt_masks``
    [G, H, W] binary (G may be 0: a false premise or an empty reference), and
    ``confidence_logits`` [K] or None. Mask terms are means over the supervised pairs;
    Dice is skipped for an empty target (BCE alone pushes the mask to empty). Confidence
    targets are 1 for slots that supervise an object and 0 otherwise (all 0 when G = 0).
    Metrics: ``seg_loss``, ``dice``, ``bce``, ``conf`` and ``num_matched``.
    """
    _check(mask_logits, gt_masks, confidence_logits)
    logits, gt = mask_logits.float(), gt_masks.float()
    has_objects = gt.shape[0] > 0
    if has_objects or logits.shape[0] == 1:
        pred, target, slots = _pairs(logits, gt)
        dice = dice_loss(pred, target).mean() if has_objects else logits.sum() * 0.0
        bce = bce_loss(pred, target).mean()
    else:  # K slots, nothing to find: only the confidences learn; zeros keep the head in the graph
        slots = torch.zeros(0, dtype=torch.long, device=logits.device)
        dice = bce = logits.sum() * 0.0
    loss = seg_coef * (dice_weight * dice + bce_weight * bce)
    conf = loss.new_zeros(())
    if confidence_logits is not None:
        conf_target = torch.zeros_like(confidence_logits, dtype=torch.float32)
        conf_target[slots] = float(has_objects)
        conf = F.binary_cross_entropy_with_logits(confidence_logits.float(), conf_target)
        loss = loss + conf_weight * conf
    metrics = dict(zip(("seg_loss", "dice", "bce", "conf"), torch.stack([loss, dice, bce, conf]).detach().tolist()))
    metrics["num_matched"] = float(slots.numel()) if has_objects else 0.0
    return loss, metrics
