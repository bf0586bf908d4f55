"""Evaluation metrics for (generalised) referring and reasoning segmentation.

Peers disagree on conventions (research note §2): LISA/GSVA score an empty prediction on an
empty target as IoU 1, Seg-Zero as 0; GSVA adds a prediction's area on a no-target sample to
Σunion. ``SegMetrics`` makes the empty/empty value explicit and follows LISA/GSVA otherwise:

- gIoU: mean of the per-sample IoU (one sample = one expression), ``empty_empty_iou`` when
  the sample's union is empty.
- cIoU: Σ intersection / Σ union over all samples; a prediction on a no-target sample
  enlarges Σ union. A ``None`` prediction (the model declined) is an empty mask, so on a
  target sample it adds the GT area to Σ union.
- Ignored pixels (e.g. ReasonSeg's 255 label) are removed before anything is counted, so
  emptiness of the GT and of the prediction is judged on the remaining pixels too.
- N-acc: share of no-target samples predicted empty or None; T-acc: share of target samples
  predicted non-empty (decided by mask emptiness, not by a reject token).
- Multi-object samples ([N, H, W] masks) are compared as their merged (union) masks.

Counts are exact Python ints, so meters from parallel workers merge without drift.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from rewards.validate import real_scalar


def _bool_mask(name: str, value) -> np.ndarray:
    """A bool [H, W] mask; a bool [N, H, W] stack is merged into its union."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a numpy bool array, got {type(value).__name__}")
    if value.dtype != np.bool_:
        raise ValueError(f"{name} must have dtype bool, got {value.dtype}")
    if value.ndim == 3:
        return value.any(axis=0)  # G = 0 gives an all-false mask: a no-target sample
    if value.ndim != 2:
        raise ValueError(f"{name} must be [H, W] or [N, H, W], got shape {value.shape}")
    return value


@dataclass
class _Tally:
    """Running sums behind the summary; all additive so meters merge by addition."""

    count: int = 0
    iou_sum: float = 0.0
    intersection: int = 0
    union: int = 0
    no_target: int = 0
    no_target_hits: int = 0  # no-target samples predicted empty or None
    target: int = 0
    target_hits: int = 0  # target samples predicted non-empty

    def __add__(self, other: "_Tally") -> "_Tally":
        return _Tally(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


class SegMetrics:
    """Accumulates gIoU, cIoU, N-acc and T-acc over samples; meters merge for parallel eval."""

    def __init__(self, empty_empty_iou: float = 1.0) -> None:
        self.empty_empty_iou = real_scalar("empty_empty_iou", empty_empty_iou, lo=0.0, hi=1.0)
        self._tally = _Tally()

    def add(self, pred_mask, gt_mask, ignore=None) -> float:
        """Add one sample and return its IoU.

        ``pred_mask``: bool [H, W] (or [K, H, W]) or None; ``gt_mask``: bool [H, W] (or
        [G, H, W]), all-false for a no-target sample; ``ignore``: optional bool [H, W] of
        pixels that count in neither intersection nor union.
        """
        gt = _bool_mask("gt_mask", gt_mask)
        pred = np.zeros_like(gt) if pred_mask is None else _bool_mask("pred_mask", pred_mask)
        if pred.shape != gt.shape:
            raise ValueError(f"pred_mask has shape {pred.shape}, but gt_mask has {gt.shape}")
        if ignore is not None:
            valid = ~_bool_mask("ignore", ignore)
            if valid.shape != gt.shape:
                raise ValueError(f"ignore has shape {valid.shape}, but gt_mask has {gt.shape}")
            gt, pred = gt & valid, pred & valid
        inter = int(np.count_nonzero(pred & gt))
        union = int(np.count_nonzero(pred | gt))
        iou = inter / union if union else self.empty_empty_iou
        has_target, predicted = bool(gt.any()), bool(pred.any())
        t = self._tally
        t.count += 1
        t.iou_sum += iou
        t.intersection += inter
        t.union += union
        t.target += has_target
        t.target_hits += has_target and predicted
        t.no_target += not has_target
        t.no_target_hits += not has_target and not predicted
        return iou

    def merge(self, other: "SegMetrics") -> "SegMetrics":
        """A new meter equal to one that saw both meters' samples; inputs are unchanged."""
        if not isinstance(other, SegMetrics):
            raise ValueError(f"other must be a SegMetrics, got {type(other).__name__}")
        if other.empty_empty_iou != self.empty_empty_iou:
            raise ValueError(
                "cannot merge meters with different empty_empty_iou: "
                f"{self.empty_empty_iou} vs {other.empty_empty_iou}"
            )
        merged = SegMetrics(self.empty_empty_iou)
        merged._tally = self._tally + other._tally
        return merged

    def summary(self) -> dict[str, float | int]:
        """``giou``, ``ciou``, ``n_acc``, ``t_acc`` (NaN when undefined) and ``count``.

        cIoU is ``empty_empty_iou`` when every sample had an empty union (Σ union = 0).
        """
        t = self._tally
        nan = float("nan")
        if t.union:
            ciou = t.intersection / t.union
        else:
            ciou = self.empty_empty_iou if t.count else nan
        return {
            "giou": t.iou_sum / t.count if t.count else nan,
            "ciou": ciou,
            "n_acc": t.no_target_hits / t.no_target if t.no_target else nan,
            "t_acc": t.target_hits / t.target if t.target else nan,
            "count": t.count,
        }
