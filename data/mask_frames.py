"""Mask geometry between the image frame and SAM's low-resolution mask frame.

SAM sees the image resized so its longest side is `img_size`, padded at the
bottom/right to a square; its mask decoder predicts at `lowres` = 4x the
embedding grid over that square (`lowres_side`). GT masks go image -> low-res
for losses and rewards (soft, as SegCompass's `mask_float_256`); predictions
go low-res -> image for metrics (as `Sam.postprocess_masks`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from data.features import sam_input_size_of


def lowres_side(sam_embedding: torch.Tensor) -> int:
    """Side of the low-res mask frame of a SAM image embedding [..., C, h, w] (the decoder upscales 4x)."""
    return 4 * sam_embedding.shape[-1]


def lowres_gt(gt: np.ndarray, features: dict[str, torch.Tensor], img_size: int) -> torch.Tensor:
    """``gt_to_lowres`` for an image with cached features (``data.features``): its SAM embedding
    fixes the frame's side, its ``sam_input_size`` where the image lies in SAM's square."""
    return gt_to_lowres(gt, sam_input_size_of(features), img_size, lowres_side(features["sam"]))


def gt_to_lowres(masks: np.ndarray | torch.Tensor, input_size: tuple[int, int], img_size: int,
                 lowres: int) -> torch.Tensor:
    """[G, H, W] bool GT -> [G, lowres, lowres] float in [0, 1] in SAM's padded frame."""
    m = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
    if m.ndim != 3:
        raise ValueError(f"masks must be [G, H, W], got shape {tuple(m.shape)}")
    if m.shape[0] == 0:
        return torch.zeros(0, lowres, lowres)
    h, w = input_size
    resized = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)
    padded = F.pad(resized, (0, img_size - w, 0, img_size - h))
    return F.interpolate(padded, size=(lowres, lowres), mode="area")[:, 0].clamp(0, 1)


def lowres_to_image(logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int],
                    img_size: int) -> torch.Tensor:
    """[K, lowres, lowres] logits -> [K, H, W] logits in the image frame."""
    up = F.interpolate(logits[:, None], size=(img_size, img_size), mode="bilinear", align_corners=False)
    h, w = input_size
    return F.interpolate(up[..., :h, :w], size=tuple(original_size), mode="bilinear", align_corners=False)[:, 0]


def slot_targets(gt_lowres: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Binary training targets [G', L, L] from soft low-res GT [G, L, L].

    With one slot a multi-object query is one mask, the union of its objects, as the
    metrics score it (gIoU/cIoU take the union); with K slots each object stays its
    own target for the Hungarian matching. Objects that vanish at low resolution are
    dropped, so a target is never empty.
    """
    masks = gt_lowres >= 0.5
    if num_slots == 1 and masks.shape[0] > 1:
        masks = masks.any(0, keepdim=True)
    return masks[masks.flatten(1).any(1)].float()
