"""An elastic rollout pool: the scaling policy's decisions carried out while a run goes on.

After every learner step (a ``RunLog`` hook, so the step's metrics carry what happened) the
pool reports its changes (engines that joined, failed to start, or were removed once their
batches were done: their placement groups are freed), the step's figures go to the policy
(``cluster.rollout_scaling``), and the pool is moved toward the target it returns:

- up: first Ray's autoscaler is asked for the whole run's resources at the new size
  (``request_resources``: on KubeRay the nodes start while the engine's placement group
  waits), then the engine gets a placement group of its own and starts; it is given batches
  only once it has started and loaded the current weights (``actors.dispatch``). One still
  not serving after ``join_timeout_s`` is given up and its group freed.
- down: a starting engine is dropped first, else the least busy serving one stops getting
  batches and is killed once its batches are done, so no group is lost or trained twice.

Engines still starting count toward the target, so a pending add is never repeated, and a
hold (a target equal to the serving engines: the policy's window is filling or nothing
calls for a change) leaves them starting: when several engines are added at once, the
first to join changes the count and restarts the window, which must not cancel the rest. The
policy's inputs per step: the learner's idle fraction (its wait before the step over wait
plus step), the time-weighted mean of rollout calls in flight over the step (the scheduler's
``rollout`` gauge) against the serving engines E: utilisation min(1, calls / E), groups
waiting for an engine max(0, calls - E) * groups_per_call (the dispatcher spreads calls
evenly, and an engine runs one call at a time), and the staleness of the trained groups.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from actors.dispatch import JOIN_FAILED, JOINED, REMOVED
from cluster.placement import Plan
from cluster.rollout_scaling import Decision, RolloutScalingPolicy, StepMetrics
from config import Config
from pipelines.grpo.handoff import ROLLOUT, StepRecord

ROLLOUT_KIND = "rollout"


def scaling_inputs(record: StepRecord, engines: int, mean_calls: float, groups_per_call: int) -> StepMetrics:
    """The policy's view of one step (rule in the module docstring)."""
    step_s = record.wait_s + record.learn_s
    return StepMetrics(engines=engines, learner_idle=record.wait_s / step_s if step_s > 0 else 0.0,
                       queue_depth=max(0.0, mean_calls - engines) * groups_per_call,
                       staleness=dict(record.staleness),
                       engine_utilisation=min(1.0, mean_calls / engines) if engines else 0.0)


def run_bundles(plan: Plan, engines: int) -> list[dict[str, float]]:
    """Every bundle of the run with ``engines`` rollout engines: what the autoscaler must make room for."""
    return [dict(b) for k in plan.kinds for _ in range(engines if k.kind == ROLLOUT_KIND else k.count)
            for b in k.bundles]


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Ray's autoscaler hint (persistent until the next call; an empty list withdraws it)."""
    from ray.autoscaler.sdk import request_resources as request

    request(bundles=bundles)


class ElasticRollouts:
    """The ``RunLog`` hook that resizes ``pool`` (an ``actors.rollout_pool.RolloutPool``) by ``policy``.

    ``placement``: a ``cluster.topology.Placement`` (``add_group``/``release``); ``timer``: the
    scheduler's ``PhaseTimer``; ``request``: the autoscaler hint (``request_resources``).
    """

    def __init__(self, policy: RolloutScalingPolicy, pool, placement, timer, groups_per_call: int,
                 join_timeout_s: float, request: Callable[[list], None] = request_resources,
                 clock: Callable[[], float] = time.monotonic):
        self.policy, self.pool, self.placement, self.timer = policy, pool, placement, timer
        self.groups_per_call, self.join_timeout_s, self.request, self.clock = (
            groups_per_call, join_timeout_s, request, clock)
        self._reading = timer.integral(ROLLOUT)
        self._added: dict[str, float] = {}  # starting engine -> when it was added
        self._requested = False

    @classmethod
    def from_config(cls, config: Config, topology, timer) -> ElasticRollouts | None:
        """None for a fixed pool (no ``cluster.rollout_autoscale``)."""
        if config.cluster.rollout_autoscale is None:
            return None
        c = config.cluster
        return cls(RolloutScalingPolicy.from_config(config), topology.rollout, topology.placement, timer,
                   config.train.groups_per_call, c.placement_timeout_s + c.start_timeout_s)

    def __call__(self, record: StepRecord) -> dict:
        """Settle, decide, act: the step's ``rollout`` metrics (engine counts, scale events)."""
        events = self._settle()
        now, area = self.timer.integral(ROLLOUT)
        mean_calls = (area - self._reading[1]) / max(now - self._reading[0], 1e-9)
        self._reading = (now, area)
        engines = self.pool.engines
        decision = self.policy.observe(scaling_inputs(record, engines, mean_calls, self.groups_per_call))
        events += self._apply(decision)
        return {"rollout": {"engines": engines, "engines_starting": len(self.pool.starting),
                            "engines_target": decision.target, "scale_events": events}}

    def _apply(self, decision: Decision) -> list[dict]:
        planned = self.pool.engines + len(self.pool.starting)
        if decision.target in (planned, self.pool.engines):
            return []
        self.request(run_bundles(self.placement.plan, decision.target))
        self._requested = True
        events = []
        for _ in range(decision.target - planned):
            name = self.pool.add_engine(self.placement.add_group(ROLLOUT_KIND))
            self._added[name] = self.clock()
            events.append({"event": "add", "engine": name, "reason": decision.reason})
        for _ in range(planned - decision.target):
            name = self.pool.retire_engine()
            events.append({"event": "retire", "engine": name, "reason": decision.reason})
        return events

    def _settle(self) -> list[dict]:
        """The pool's changes since the last step; engines that did not start in time are given up."""
        now = self.clock()
        events = []
        for name in [n for n in self.pool.starting if now - self._added.get(n, now) > self.join_timeout_s]:
            self.pool.retire_engine(name)
            events.append({"event": "retire", "engine": name,
                           "reason": f"not serving {self.join_timeout_s:g} s after it was added "
                                     "(cluster.placement_timeout_s + start_timeout_s)"})
        for change in self.pool.settle():
            self._added.pop(change.name, None)
            if change.kind in (JOIN_FAILED, REMOVED):
                self.placement.release(ROLLOUT_KIND, change.options)
            reason = {JOINED: "started with the current weights", JOIN_FAILED: change.why,
                      REMOVED: change.why or "its batches were done"}[change.kind]
            events.append({"event": change.kind, "engine": change.name, "reason": reason})
        return events

    def close(self) -> None:
        """Withdraw the autoscaler hint, so that the run's nodes can go."""
        if self._requested:
            self.request([])
