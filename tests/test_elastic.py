"""The elastic rollout pool's driver side: the policy's inputs from a step, and its decisions carried out
(autoscaler hint, a placement group per added engine, freed when the engine goes, no repeated adds)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.dispatch import JOIN_FAILED, JOINED, REMOVED, SlotEvent
from cluster.placement import plan
from cluster.rollout_scaling import Decision, RolloutScalingPolicy
from config import load_config
from config.schema import RolloutAutoscaleConfig
from pipelines.grpo.elastic import ElasticRollouts, run_bundles, scaling_inputs
from pipelines.grpo.handoff import ROLLOUT, StepRecord
from pipelines.grpo.phase_timer import PhaseTimer


def record(step: int, wait_s: float = 1.0, learn_s: float = 1.0, staleness=None) -> StepRecord:
    return StepRecord(step=step, metrics={}, staleness=staleness or {0: 2}, rewards=[], groups=2,
                      wait_s=wait_s, learn_s=learn_s)


class Pool:
    """The RolloutPool's elastic surface, with the changes ``settle`` reports set by the test."""

    def __init__(self, engines: int):
        self.serving = [f"rollout-{n}.0" for n in range(engines)]
        self.starting: list[str] = []
        self.options: dict[str, dict] = {}
        self.changes: list[SlotEvent] = []
        self.retired: list[str] = []

    @property
    def engines(self) -> int:
        return len(self.serving)

    def add_engine(self, options: dict) -> str:
        name = f"rollout-{len(self.serving) + len(self.starting) + len(self.retired)}.0"
        self.starting.append(name)
        self.options[name] = options
        return name

    def retire_engine(self, name: str | None = None) -> str:
        name = name or (self.starting[-1] if self.starting else self.serving[-1])
        (self.starting if name in self.starting else self.serving).remove(name)
        self.retired.append(name)
        return name

    def settle(self) -> list[SlotEvent]:
        changes, self.changes = self.changes, []
        return changes


class Placement:
    def __init__(self, config):
        self.plan, self.groups, self.released = plan(config), 0, []

    def add_group(self, kind: str) -> dict:
        self.groups += 1
        return {"group": self.groups}

    def release(self, kind: str, options: dict) -> None:
        self.released.append(options["group"])


class Script:
    """A policy that answers the targets it is given, in turn."""

    def __init__(self, *targets: int):
        self.targets, self.seen = list(targets), []

    def observe(self, metrics):
        self.seen.append(metrics)
        return Decision(self.targets.pop(0), "scripted")


@pytest.fixture
def world():
    config = load_config("configs/tiny.yaml")
    now = [0.0]
    timer = PhaseTimer(clock=lambda: now[0])
    requests: list[list] = []

    def make(policy, engines=1, join_timeout_s=100.0):
        pool, placement = Pool(engines), Placement(config)
        elastic = ElasticRollouts(policy, pool, placement, timer, 2, join_timeout_s, request=requests.append,
                                  clock=lambda: now[0])
        return elastic, pool, placement

    return make, now, timer, requests


def test_inputs_of_a_step_are_exact_and_bounded():
    m = scaling_inputs(record(0, wait_s=3.0, learn_s=1.0, staleness={1: 2}), engines=2, mean_calls=3.0,
                       groups_per_call=4)
    assert (m.learner_idle, m.engine_utilisation, m.queue_depth, dict(m.staleness)) == (0.75, 1.0, 4.0, {1: 2})
    light = scaling_inputs(record(0), engines=4, mean_calls=1.0, groups_per_call=1)
    assert (light.engine_utilisation, light.queue_depth) == (0.25, 0.0)


@given(st.floats(0, 1e4), st.floats(0, 1e4), st.integers(0, 64), st.floats(0, 1e3), st.integers(1, 16))
def test_inputs_stay_within_the_policys_ranges(wait_s, learn_s, engines, calls, per_call):
    m = scaling_inputs(record(0, wait_s, learn_s), engines, calls, per_call)
    assert 0.0 <= m.learner_idle <= 1.0 and 0.0 <= m.engine_utilisation <= 1.0 and m.queue_depth >= 0.0


def test_run_bundles_hold_the_whole_run_at_the_new_size():
    config = load_config("configs/tiny.yaml")
    p = plan(config)
    rollout = p.kind("rollout")
    base = run_bundles(p, 0)
    assert run_bundles(p, 3) == [dict(b) for b in rollout.bundles] * 3 + base  # rollout is the first kind
    assert len(base) == sum(k.count * len(k.bundles) for k in p.kinds if k.kind != "rollout")


def test_scaling_up_asks_the_autoscaler_then_adds_one_engine_in_its_own_group_once(world):
    make, now, timer, requests = world
    elastic, pool, placement = make(Script(2, 2, 2))
    timer.begin(ROLLOUT)
    timer.begin(ROLLOUT)  # two calls in flight for the whole step, on one engine
    now[0] = 10.0
    out = elastic(record(0))["rollout"]
    assert elastic.policy.seen[0].queue_depth == 2.0 and elastic.policy.seen[0].engine_utilisation == 1.0
    assert requests == [run_bundles(placement.plan, 2)]
    assert out["engines"] == 1 and out["engines_starting"] == 1 and out["engines_target"] == 2
    assert [(e["event"], e["engine"]) for e in out["scale_events"]] == [("add", "rollout-1.0")]
    assert pool.options["rollout-1.0"] == {"group": 1}
    now[0] = 20.0
    assert elastic(record(1))["rollout"]["scale_events"] == []  # still starting: counted, not added again
    pool.starting.remove("rollout-1.0")
    pool.serving.append("rollout-1.0")
    pool.changes = [SlotEvent(JOINED, "rollout-1.0", {"group": 1})]
    now[0] = 30.0
    out = elastic(record(2))["rollout"]
    assert out["engines"] == 2 and [e["event"] for e in out["scale_events"]] == ["joined"]
    assert placement.released == [] and len(requests) == 1


def test_scaling_down_retires_and_frees_the_group_once_the_engine_is_removed(world):
    make, now, _, requests = world
    elastic, pool, placement = make(Script(1, 1), engines=2)
    now[0] = 5.0
    out = elastic(record(0))["rollout"]
    assert [(e["event"], e["engine"]) for e in out["scale_events"]] == [("retire", "rollout-1.0")]
    assert requests == [run_bundles(placement.plan, 1)] and placement.released == []
    pool.changes = [SlotEvent(REMOVED, "rollout-1.0", {"group": 7})]
    now[0] = 6.0
    out = elastic(record(1))["rollout"]
    assert [e["event"] for e in out["scale_events"]] == ["removed"] and placement.released == [7]
    elastic.close()
    assert requests[-1] == []  # the hint is withdrawn at the end of the run


def test_an_engine_not_serving_in_time_is_given_up_and_a_failed_start_frees_its_group(world):
    make, now, _, _ = world
    elastic, pool, placement = make(Script(2, 1, 2, 2), join_timeout_s=50.0)
    elastic(record(0))
    now[0] = 60.0
    out = elastic(record(1))["rollout"]
    assert [(e["event"], e["engine"]) for e in out["scale_events"]] == [("retire", "rollout-1.0")]
    assert "not serving 50 s after it was added" in out["scale_events"][0]["reason"]
    assert pool.starting == []
    now[0] = 61.0
    out = elastic(record(2))["rollout"]
    (added,) = out["scale_events"]
    pool.starting.remove(added["engine"])
    pool.changes = [SlotEvent(JOIN_FAILED, added["engine"], {"group": 2}, "RayActorError: no GPU")]
    out = elastic(record(3))["rollout"]
    assert [(e["event"], e["reason"]) for e in out["scale_events"][:1]] == [("join_failed", "RayActorError: no GPU")]
    assert placement.released == [2]


def test_the_real_policy_adds_an_engine_when_the_learner_waits_on_busy_engines(world):
    make, now, timer, _ = world
    settings = RolloutAutoscaleConfig(min=1, max=2, window=2)
    elastic, pool, _ = make(RolloutScalingPolicy(settings, eta=1))
    for _ in range(3):
        timer.begin(ROLLOUT)  # three calls queued on one engine, all along
    targets = []
    for step in range(3):
        now[0] += 10.0
        targets.append(elastic(record(step, wait_s=5.0, learn_s=1.0, staleness={0: 2}))["rollout"]["engines_target"])
    assert targets == [1, 2, 2] and pool.starting == ["rollout-1.0"]


def test_a_hold_while_several_engines_start_keeps_the_ones_not_joined_yet(world):
    """Four engines added at once; the first to join changes the count, and the policy holds at it."""
    make, now, _, requests = world
    elastic, pool, _ = make(Script(4, 2, 2, 1), engines=1)
    elastic(record(0))
    assert pool.starting == ["rollout-1.0", "rollout-2.0", "rollout-3.0"]
    pool.starting.remove("rollout-1.0")
    pool.serving.append("rollout-1.0")
    pool.changes = [SlotEvent(JOINED, "rollout-1.0", {"group": 1})]
    now[0] = 10.0
    out = elastic(record(1))["rollout"]
    assert [e["event"] for e in out["scale_events"]] == ["joined"] and len(pool.starting) == 2
    assert elastic(record(2))["rollout"]["scale_events"] == [] and len(requests) == 1
    out = elastic(record(3))["rollout"]  # a real step down: the starting engines go first
    assert [(e["event"], e["engine"]) for e in out["scale_events"]] == [("retire", "rollout-3.0"),
                                                                         ("retire", "rollout-2.0"),
                                                                         ("retire", "rollout-1.0")]
