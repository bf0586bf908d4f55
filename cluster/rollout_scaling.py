"""How many rollout engines a run should have: a scaling policy over per-step metrics.

Ray-free, so the rule is testable alone; the caller (``pipelines.grpo.elastic``, after each
learner step) reports the step's metrics and adds or removes engines to meet the target it gets back.

Inputs, per learner step (``StepMetrics``): the engines that served in it, the fraction of
the step the learner waited for data (``learner_idle``), the groups admitted and waiting
for an engine (``queue_depth``, mean over the step), the staleness s - v of the groups it
trained (a histogram), and the fraction of engine time spent generating
(``engine_utilisation``, mean over engines). Settings: ``cluster.rollout_autoscale``
(``min``, ``max``, ``window`` and the thresholds below) and the staleness bound eta.

Window. A decision looks at the last ``window`` steps served by the current number of
engines (means of idle, queue and utilisation; the staleness histograms summed). Steps at
another size say nothing about this one: when the count changes, the window starts again,
and until it is full the policy holds. With ``settle`` k > 0 the first k steps at a new
size are not counted either: the groups they train were admitted, and mostly generated,
before the change (eta is the natural k), so their staleness describes the old size.

Rule. With I, Q, U the window's means and P "staleness presses the bound",

    up   = I >= idle_up  and  Q >= queue_up  and  U >= util_down  and  not P
    down = P  or  (U < util_down  and  I < idle_up)
    grown(E)  = max(E + 1, floor(E * growth))
    shrunk(E) = min(E - 1, ceil(E / shrink))
    target = clamp(grown(E) if up else shrunk(E) if down else E, min, max)

With ``growth`` and ``shrink`` 1 (the defaults) a decision moves one engine; with growth
g > 1 a step up multiplies the count by g (at least one engine), so a pool that must go from
8 to 64 engines gets there in log_g 8 windows rather than 56; ``shrink`` divides likewise.
Near the size where the data starts to crowd the bound the pool alternates between a size
and its step; a small ``shrink`` (1: one engine) after a large ``growth`` keeps that
alternation narrow while the pool still grows fast.

Up: the learner waits for data while admitted groups wait for an engine and the engines are
busy, so generation is the bottleneck, and the data is fresh enough that generating more
ahead stays within the bound. A learner that waits with an empty queue waits on admission
(the staleness window), which more engines cannot widen. Down: engines sit idle while the
learner is fed, or the trained groups crowd the bound (more engines would only make data
older: with ``staleness_mode: strict`` such groups get dropped, with ``admission`` they train
beyond eta). P holds when a trained group is older than eta, or, for eta > 0, when the
groups at s - v >= eta are at least ``press_share`` of those trained; with eta = 0 every
group is at the bound by construction (generation and training alternate), so only an
older group presses it.

Proof of the properties the tests check:
- Bounds: the target is clamped to [min, max] (``min <= max`` is validated), whatever the
  reported engine count.
- One step at a time: up and down exclude each other (up needs not P and U >= util_down;
  down needs P or U < util_down), so a count E within the bounds goes to one of
  clamp(shrunk(E)) <= E <= clamp(grown(E)), one engine away when growth
  and shrink are 1 (floor(E) = E, ceil(E) = E).
- Monotone responses: up is a conjunction of conditions that stay true when I, Q or U grow
  or P becomes false; down is false-preserving in the same directions (its U and I terms
  need them small). Since shrunk(E) < E < grown(E) and clamping keeps order, target is
  non-decreasing in I, Q and U and non-increasing in P.
  Moving trained groups to older staleness never turns P false (the count at s - v >= eta
  and the count beyond eta only grow), so it never raises the target.
- Pace: a change needs a full window at the new size after its ``settle`` steps, so the
  count changes at most once every ``settle + window`` steps; a pool on the edge of a
  threshold may alternate between two sizes at that pace, no faster.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from config import Config
from config.schema import RolloutAutoscaleConfig


@dataclass(frozen=True)
class StepMetrics:
    """What one learner step reports to the policy (fractions in [0, 1])."""

    engines: int
    learner_idle: float
    queue_depth: float
    staleness: Mapping[int, int]  # s - v -> groups trained in the step
    engine_utilisation: float

    def __post_init__(self) -> None:
        if self.engines < 0 or self.queue_depth < 0 or any(k < 0 or n < 0 for k, n in self.staleness.items()):
            raise ValueError(f"negative engines, queue depth or staleness in {self}")
        if not (0.0 <= self.learner_idle <= 1.0 and 0.0 <= self.engine_utilisation <= 1.0):
            raise ValueError(f"learner_idle and engine_utilisation must lie in [0, 1]: {self}")


@dataclass(frozen=True)
class Decision:
    """The engine count to aim for, and why (for the run's metrics)."""

    target: int
    reason: str


def presses_bound(staleness: Mapping[int, int], eta: int, press_share: float) -> bool:
    """Whether the trained groups crowd the staleness bound (P in the module docstring)."""
    trained = sum(staleness.values())
    beyond = sum(n for k, n in staleness.items() if k > eta)
    at_least = sum(n for k, n in staleness.items() if k >= eta)
    return beyond > 0 or (eta > 0 and trained > 0 and at_least >= press_share * trained)


def grown(engines: int, growth: float) -> int:
    """The count after a step up: times ``growth``, at least one more."""
    return max(engines + 1, math.floor(engines * growth))


def shrunk(engines: int, shrink: float) -> int:
    """The count after a step down: divided by ``shrink``, at least one fewer."""
    return min(engines - 1, math.ceil(engines / shrink))


def decide(engines: int, idle: float, queue: float, utilisation: float, pressing: bool,
           settings: RolloutAutoscaleConfig) -> Decision:
    """The rule of the module docstring on a full window's means."""
    s = settings
    up = idle >= s.idle_up and queue >= s.queue_up and utilisation >= s.util_down and not pressing
    down = pressing or (utilisation < s.util_down and idle < s.idle_up)
    moved = grown(engines, s.growth) if up else shrunk(engines, s.shrink) if down else engines
    target = min(max(moved, s.min), s.max)
    seen = f"learner idle {idle:.2f}, queue {queue:.1f}, engine utilisation {utilisation:.2f}"
    if target > engines:
        return Decision(target, f"up: the learner waits for data while groups wait for busy engines ({seen})")
    if target < engines and pressing:
        return Decision(target, "down: trained groups crowd the staleness bound")
    if target < engines:
        return Decision(target, f"down: engines idle while the learner is fed ({seen})")
    why = "at max" if up else "at min" if down else "within thresholds"
    return Decision(target, f"hold: {why} ({seen})")


class RolloutScalingPolicy:
    """Turns each step's metrics into a target engine count (the rule in the module docstring)."""

    def __init__(self, settings: RolloutAutoscaleConfig, eta: int):
        if eta < 0:
            raise ValueError(f"need eta >= 0, got {eta}")
        self.settings, self.eta = settings, eta
        self._window: deque[StepMetrics] = deque(maxlen=settings.window)
        self._size, self._at_size = -1, 0  # the engine count of the last step, and its steps so far

    @classmethod
    def from_config(cls, config: Config) -> RolloutScalingPolicy:
        settings = config.cluster.rollout_autoscale
        if settings is None:
            raise ValueError("cluster.rollout_autoscale is not set: the rollout pool has a fixed size")
        return cls(settings, config.train.staleness)

    def observe(self, step: StepMetrics) -> Decision:
        """Record one step; the engine count to aim for now."""
        s = self.settings
        if step.engines != self._size:
            self._size, self._at_size = step.engines, 0
            self._window.clear()
        self._at_size += 1
        if self._at_size > s.settle:
            self._window.append(step)
        if not s.min <= step.engines <= s.max:
            bound = s.min if step.engines < s.min else s.max
            return Decision(bound, f"{'up' if bound > step.engines else 'down'}: {step.engines} engines is outside "
                                   f"[{s.min}, {s.max}]")
        if len(self._window) < s.window:
            return Decision(step.engines, f"hold: {len(self._window)} of {s.window} steps seen at {step.engines} "
                                          "engines")
        steps = len(self._window)
        staleness: dict[int, int] = {}
        for m in self._window:
            for k, n in m.staleness.items():
                staleness[k] = staleness.get(k, 0) + n
        return decide(step.engines, sum(m.learner_idle for m in self._window) / steps,
                      sum(m.queue_depth for m in self._window) / steps,
                      sum(m.engine_utilisation for m in self._window) / steps,
                      presses_bound(staleness, self.eta, s.press_share), s)
