"""Mask scores: soft IoU, pairwise soft IoU and the Hungarian multi-object score.

The reward workers score a whole GRPO group (responses × K slots) against one set of GT
masks, so the hot path is ``score_group``: every slot of every response is flattened into
one matrix and streamed once through a matmul against the GT masks (plus a row of ones, so
the same pass yields Σp). The value-range check follows while the group is still in the
last-level cache, so contract checking costs no second trip to DRAM.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from rewards.presets import DEFAULT_PRESET, get_preset
from rewards.validate import (
    as_array,
    real_scalar,
    require_binary,
    require_same_spatial,
    require_unit_interval,
    unit_interval_ok,
)

# Bytes of predictions per matmul block. One big skinny sgemm (N = G + 1 <= 5) spends its
# time packing; a batch of 512 KiB blocks (half of L2) runs ~2-3x faster (measured, OpenBLAS).
_BLOCK_BYTES = 1 << 19
_MIN_BLOCK_PIXELS = 1024


def _compute_dtype(arr: np.ndarray) -> np.dtype:
    """float64 stays float64; everything else (bool, ints, float16/32) is scored in float32."""
    return np.dtype(np.float64) if arr.dtype == np.float64 else np.dtype(np.float32)


def _pred_matrix(pred: np.ndarray) -> np.ndarray:
    """``pred`` [..., H, W] as a [rows, H*W] float matrix (a view when already float)."""
    rows = int(np.prod(pred.shape[:-2], dtype=np.int64))
    pixels = pred.shape[-2] * pred.shape[-1]
    return pred.astype(_compute_dtype(pred), copy=False).reshape(rows, pixels)


def _gt_matrix(gt: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """GT [G, H, W] as a [G + 1, H*W] matrix whose last row is ones, and the GT areas [G]."""
    n_gt = gt.shape[0]
    rows = np.empty((n_gt + 1, gt.shape[1] * gt.shape[2]), dtype)
    rows[:n_gt] = gt.reshape(n_gt, rows.shape[1])
    rows[n_gt] = 1
    # A dot with the ones row counts the 0/1 pixels (exact in float32 below 2**24 pixels)
    # ~6x faster than count_nonzero along an axis.
    return rows, (rows[:n_gt] @ rows[n_gt]).astype(np.float64)


def _blocks(matrix: np.ndarray, block: int) -> np.ndarray:
    """[n_blocks, rows, block] view of the leading whole blocks of a [rows, pixels] matrix."""
    windows = np.lib.stride_tricks.sliding_window_view(matrix, block, axis=1)
    return windows[:, ::block].transpose(1, 0, 2)


def _overlaps(name: str, pred: np.ndarray, gt_rows: np.ndarray) -> np.ndarray:
    """[rows, G + 1]: Σ(p·g) against each GT row, and Σp in the last column.

    One batched matmul over pixel blocks (summed in float64), then the range check of
    ``pred``; an invalid input raises before the product is used.
    """
    n_rows, n_pix = pred.shape
    block = max(_MIN_BLOCK_PIXELS, _BLOCK_BYTES // max(1, n_rows * pred.itemsize))
    whole = n_pix - n_pix % block
    out = np.zeros((n_rows, gt_rows.shape[0]), np.float64)
    with np.errstate(invalid="ignore"):  # inf·0 from a bad input: reported just below
        if whole:
            pred_blocks = _blocks(pred, block)
            gt_blocks = _blocks(gt_rows, block).transpose(0, 2, 1)
            out += np.matmul(pred_blocks, gt_blocks).sum(axis=0, dtype=np.float64)
        if whole < n_pix:
            out += pred[:, whole:] @ gt_rows[:, whole:].T
    _check_probabilities(name, pred)
    return out


def _check_probabilities(name: str, pred: np.ndarray) -> None:
    if not unit_interval_ok(pred):
        require_unit_interval(name, pred)


def _iou_from_overlaps(overlaps: np.ndarray, gt_area: np.ndarray) -> np.ndarray:
    """Soft IoU matrix from intersections, Σp and Σg; 1.0 where both masks are empty."""
    inter, pred_area = overlaps[:, :-1], overlaps[:, -1:]
    union = pred_area + gt_area[None, :] - inter
    iou = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
    return np.minimum(iou, 1.0, out=iou)  # summation order can push a ratio an ulp past 1


def _soft_iou_matrix(name: str, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """[rows, G] soft IoU of every slot of ``pred`` [..., H, W] against every GT mask."""
    flat = _pred_matrix(pred)
    if gt.shape[0] == 0:  # nothing to intersect; the slots must still meet the contract
        _check_probabilities(name, flat)
        return np.zeros((flat.shape[0], 0))
    gt_rows, gt_area = _gt_matrix(gt, flat.dtype)
    return _iou_from_overlaps(_overlaps(name, flat, gt_rows), gt_area)


def _checked_pred_gt(pred_probs, gt_masks, pred_ndim: int) -> tuple[np.ndarray, np.ndarray]:
    pred = as_array("pred_probs", pred_probs, ndim=pred_ndim)
    gt = as_array("gt_masks", gt_masks, ndim=3)
    require_same_spatial("gt_masks", gt, "pred_probs", pred)
    require_binary("gt_masks", gt)
    return pred, gt


def pairwise_soft_iou(pred_probs, gt_masks) -> np.ndarray:
    """[K, G] soft IoU of every predicted slot [K, H, W] against every GT mask [G, H, W]."""
    pred, gt = _checked_pred_gt(pred_probs, gt_masks, pred_ndim=3)
    return _soft_iou_matrix("pred_probs", pred, gt)


def soft_iou(pred, gt) -> float:
    """Σ(p·g) / (Σp + Σg − Σ(p·g)) of a [H, W] probability map and a binary [H, W] mask.

    1.0 when both are empty. Single-object scoring is this function (K = G = 1).
    """
    pred_arr = as_array("pred", pred, ndim=2)
    gt_arr = as_array("gt", gt, ndim=2)
    if pred_arr.shape != gt_arr.shape:
        raise ValueError(f"pred has shape {pred_arr.shape}, but gt has {gt_arr.shape}")
    require_binary("gt", gt_arr)
    return float(_soft_iou_matrix("pred", pred_arr[None], gt_arr[None])[0, 0])


def _matched_score(iou: np.ndarray, divisor: str) -> float:
    """Hungarian match maximising total IoU on a K'×G matrix, averaged per ``divisor``."""
    n_pred, n_gt = iou.shape
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    rows, cols = linear_sum_assignment(iou, maximize=True)
    total = float(iou[rows, cols].sum())
    return total / (len(rows) if divisor == "matched" else max(n_pred, n_gt))


def score_group(
    pred_probs,
    confidences,
    gt_masks,
    threshold: float = 0.5,
    preset: str = DEFAULT_PRESET,
) -> np.ndarray:
    """Multi-object scores [R] of R responses sharing one GT set, in one pass over memory.

    ``pred_probs`` [R, K, H, W] in [0, 1], ``confidences`` [R, K] in [0, 1], ``gt_masks``
    [G, H, W] of {0, 1}. Element r equals
    ``multi_object_score(pred_probs[r], confidences[r], gt_masks, threshold, preset)``.
    """
    divisor = get_preset(preset).divisor
    thr = real_scalar("threshold", threshold, lo=0.0, hi=1.0)
    pred, gt = _checked_pred_gt(pred_probs, gt_masks, pred_ndim=4)
    conf = as_array("confidences", confidences, ndim=2)
    if conf.shape != pred.shape[:2]:
        raise ValueError(
            f"confidences must have shape {pred.shape[:2]} (responses, slots) "
            f"to match pred_probs, got {conf.shape}"
        )
    require_unit_interval("confidences", conf)
    iou = _soft_iou_matrix("pred_probs", pred, gt).reshape(pred.shape[:2] + gt.shape[:1])
    keep = conf >= thr
    return np.array(
        [_matched_score(iou[r][keep[r]], divisor) for r in range(pred.shape[0])],
        dtype=np.float64,
    )


def multi_object_score(
    pred_probs,
    confidences,
    gt_masks,
    threshold: float = 0.5,
    preset: str = DEFAULT_PRESET,
) -> float:
    """Hungarian soft-IoU score of K slots [K, H, W] against G GT masks [G, H, W].

    Slots with confidence >= ``threshold`` are kept. Both sides empty → 1.0; exactly one
    side empty → 0.0; otherwise the K'×G soft-IoU matrix is matched to maximise the total,
    and ``"paper"`` averages over the matched pairs while ``"segcompass-code"`` divides the
    matched sum by max(K', G), so surplus slots and missed objects cost reward.
    """
    pred = as_array("pred_probs", pred_probs, ndim=3)
    conf = as_array("confidences", confidences, ndim=1)
    if conf.shape != pred.shape[:1]:
        raise ValueError(
            f"confidences must have shape {pred.shape[:1]} (one per slot), got {conf.shape}"
        )
    return float(score_group(pred[None], conf[None], gt_masks, threshold, preset)[0])


def mask_score(pred_probs, confidences, gt_masks, threshold: float = 0.5, preset: str = DEFAULT_PRESET) -> float:
    """The mask reward of one response: K slots [K, H, W] with confidences [K] vs G GT masks.

    One slot against one object is plain ``soft_iou`` (no confidence gate); anything else,
    a no-target GT (G = 0) included, is ``multi_object_score``.
    """
    pred = as_array("pred_probs", pred_probs, ndim=3)
    gt = as_array("gt_masks", gt_masks, ndim=3)
    if pred.shape[0] == 1 and gt.shape[0] == 1:
        return soft_iou(pred[0], gt[0])
    return multi_object_score(pred, confidences, gt, threshold, preset)
