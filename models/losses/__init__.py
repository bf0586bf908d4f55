"""Training losses: GRPO (SegCompass eq. 10–11) and the segmentation head's supervised terms.

One backward per step over ``grpo_loss(...)[0] + segmentation_loss(...)[0]`` (A.1).
Policy losses, KL estimators and aggregations are registries (advantage estimators: ``rewards``),
selected by name from the config. Torch only: no Ray here.
"""
from models.losses.aggregation import AGGREGATIONS
from models.losses.grpo import grpo_loss
from models.losses.kl import KL_ESTIMATORS
from models.losses.policy import POLICY_LOSSES, truncated_is_weights
from models.losses.segmentation import dice_loss, match_slots, segmentation_loss, soft_iou_matrix

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "dice_loss",
    "grpo_loss",
    "match_slots",
    "segmentation_loss",
    "soft_iou_matrix",
    "truncated_is_weights",
]
