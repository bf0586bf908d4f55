"""Training losses: GRPO (SegCompass eq. 10–11) and the segmentation head's supervised terms.

One backward per step over ``grpo_loss(...)[0] + segmentation_loss(...)[0]`` (A.1).
Policy losses, KL estimators, advantage estimators and aggregations are registries,
selected by name from the config. Torch only: no Ray here.
"""
from models.losses.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from models.losses.aggregation import AGGREGATIONS
from models.losses.grpo import grpo_loss
from models.losses.kl import KL_ESTIMATORS
from models.losses.policy import POLICY_LOSSES, truncated_is_weights
from models.losses.registry import Registry
from models.losses.segmentation import dice_loss, match_slots, segmentation_loss, soft_iou_matrix

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "Registry",
    "compute_advantages",
    "dice_loss",
    "grpo_loss",
    "match_slots",
    "segmentation_loss",
    "soft_iou_matrix",
    "truncated_is_weights",
]
