"""Pure reward functions and evaluation metrics for reasoning segmentation (numpy + scipy).

No Ray and no torch here: the reward workers and the evaluator wrap these functions.
"""

from rewards.advantages import ADVANTAGE_ESTIMATORS, group_advantages, total_reward
from rewards.format import format_score, refusal_format_score, response_format_score
from rewards.masks import mask_score, multi_object_score, pairwise_soft_iou, score_group, soft_iou
from rewards.metrics import SegMetrics
from rewards.presets import (
    DEFAULT_PRESET,
    RewardPreset,
    get_preset,
    preset_names,
    register_preset,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "DEFAULT_PRESET",
    "RewardPreset",
    "SegMetrics",
    "format_score",
    "refusal_format_score",
    "response_format_score",
    "get_preset",
    "group_advantages",
    "mask_score",
    "multi_object_score",
    "pairwise_soft_iou",
    "preset_names",
    "register_preset",
    "score_group",
    "soft_iou",
    "total_reward",
]
