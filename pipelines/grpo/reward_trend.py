"""Is a run's training reward rising? Its mean over the first and the last fifth of the steps,
each with its standard error, and their difference.

Every step samples new prompts, so the two windows score different prompts: a difference
smaller than about twice its standard error is what the prompts alone could give (the SFT
model itself, sampled on the first and the last 10 steps' prompts of the tiny main job,
scored 0.501 and 0.485). The error of a window is the spread of its step means over the
square root of its steps (steps draw their prompts independently).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RewardTrend:
    steps: int  # in each window
    first: float
    last: float
    first_se: float
    last_se: float

    @property
    def change(self) -> float:
        return self.last - self.first

    @property
    def change_se(self) -> float:
        return math.hypot(self.first_se, self.last_se)

    def line(self) -> str:
        k = self.steps
        return (f"reward: first {k} steps {self.first:.3f} ± {self.first_se:.3f} -> last {k} steps "
                f"{self.last:.3f} ± {self.last_se:.3f} (change {self.change:+.3f} ± {self.change_se:.3f})")


def _mean_and_se(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def reward_trend(rewards: list[float]) -> RewardTrend:
    """The trend of per-step mean rewards (one window of max(1, n // 5) steps at each end)."""
    if not rewards:
        raise ValueError("no steps: a reward trend needs at least one step's reward")
    k = max(1, len(rewards) // 5)
    (first, first_se), (last, last_se) = _mean_and_se(rewards[:k]), _mean_and_se(rewards[-k:])
    return RewardTrend(k, first, last, first_se, last_se)
