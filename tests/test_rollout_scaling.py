"""The rollout scaling policy: its decisions on scripted metric sequences, and its properties (within
[min, max], one step at a time (one engine with growth 1), monotone in every input, one change per
window at most)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.rollout_scaling import (
    RolloutScalingPolicy,
    StepMetrics,
    decide,
    grown,
    presses_bound,
    shrunk,
)
from config import ConfigError, load_config
from config.schema import RolloutAutoscaleConfig

BOUNDS = RolloutAutoscaleConfig(min=1, max=3, window=2)  # idle_up 0.1, queue_up 1, util_down 0.5, press 0.5
STARVED = {"learner_idle": 0.6, "queue_depth": 4.0, "staleness": {0: 6, 1: 2}, "engine_utilisation": 0.95}
FED_IDLE_ENGINES = {"learner_idle": 0.0, "queue_depth": 0.0, "staleness": {0: 8}, "engine_utilisation": 0.2}
BALANCED = {"learner_idle": 0.05, "queue_depth": 0.5, "staleness": {0: 5, 1: 3}, "engine_utilisation": 0.8}


def run(policy: RolloutScalingPolicy, script: list[dict], engines: int) -> list[tuple[int, int]]:
    """Feed ``script`` step by step to a pool that meets every target at once: (engines, target) per step."""
    out = []
    for metrics in script:
        target = policy.observe(StepMetrics(engines=engines, **metrics)).target
        out.append((engines, target))
        engines = target
    return out


def test_a_starved_learner_grows_the_pool_one_engine_per_window_up_to_max():
    steps = run(RolloutScalingPolicy(BOUNDS, eta=1), [STARVED] * 7, engines=1)
    assert [t for _, t in steps] == [1, 2, 2, 3, 3, 3, 3]


def test_idle_engines_under_a_fed_learner_shrink_the_pool_down_to_min():
    steps = run(RolloutScalingPolicy(BOUNDS, eta=1), [FED_IDLE_ENGINES] * 6, engines=3)
    assert [t for _, t in steps] == [3, 2, 2, 1, 1, 1]


def test_with_growth_and_shrink_2_the_pool_doubles_and_halves_within_the_bounds():
    wide = RolloutAutoscaleConfig(min=8, max=64, window=2, growth=2.0, shrink=2.0)
    up = run(RolloutScalingPolicy(wide, eta=1), [STARVED] * 8, engines=8)
    assert [t for _, t in up] == [8, 16, 16, 32, 32, 64, 64, 64]
    down = run(RolloutScalingPolicy(wide, eta=1), [FED_IDLE_ENGINES] * 8, engines=64)
    assert [t for _, t in down] == [64, 32, 32, 16, 16, 8, 8, 8]
    uneven = RolloutAutoscaleConfig(min=1, max=64, window=1, growth=1.5)
    assert [t for _, t in run(RolloutScalingPolicy(uneven, eta=1), [STARVED] * 6, engines=1)] == [2, 3, 4, 6, 9, 13]
    assert (grown(1, 1.2), shrunk(2, 1.2), grown(27, 1.5), shrunk(40, 1.5)) == (2, 1, 40, 27)
    fast_up = RolloutAutoscaleConfig(min=8, max=64, window=1, growth=2.0)  # shrink 1: one engine down
    assert [t for _, t in run(RolloutScalingPolicy(fast_up, eta=1), [STARVED] * 3 + [FED_IDLE_ENGINES] * 2,
                              engines=8)] == [16, 32, 64, 63, 62]


def test_settle_steps_at_a_new_size_are_not_counted():
    """The first eta steps after a change train groups of the old size: they neither decide nor fill the window."""
    policy = RolloutScalingPolicy(RolloutAutoscaleConfig(min=1, max=4, window=2, settle=2), eta=2)
    crowded = dict(STARVED, staleness={2: 8})  # what a bigger pool left behind
    targets = [policy.observe(StepMetrics(engines=2, **m)).target for m in (crowded, crowded, STARVED, STARVED)]
    assert targets == [2, 2, 2, 3]
    decision = policy.observe(StepMetrics(engines=3, **STARVED))
    assert decision.reason == "hold: 0 of 2 steps seen at 3 engines"


def test_balanced_pool_holds():
    assert {t for _, t in run(RolloutScalingPolicy(BOUNDS, eta=1), [BALANCED] * 6, engines=2)} == {2}


def test_a_learner_waiting_on_admission_not_on_engines_gets_no_engine():
    """The learner waits but nothing waits for an engine: the staleness window, not the pool, limits it."""
    admission_bound = dict(STARVED, queue_depth=0.0)
    assert {t for _, t in run(RolloutScalingPolicy(BOUNDS, eta=1), [admission_bound] * 4, engines=2)} == {2}


def test_staleness_at_the_bound_shrinks_the_pool_even_while_the_learner_waits():
    crowded = dict(STARVED, staleness={0: 1, 1: 3})  # 3 of 4 trained groups at s - v = eta = 1
    policy = RolloutScalingPolicy(BOUNDS, eta=1)
    decisions = [policy.observe(StepMetrics(engines=3, **crowded)) for _ in range(2)]
    assert decisions[-1].target == 2 and decisions[-1].reason == "down: trained groups crowd the staleness bound"


def test_with_eta_0_only_a_group_beyond_the_bound_presses_it():
    assert not presses_bound({0: 8}, eta=0, press_share=0.5)
    assert presses_bound({0: 7, 1: 1}, eta=0, press_share=0.5)  # admission mode trained one beyond eta
    steps = run(RolloutScalingPolicy(BOUNDS, eta=0), [dict(STARVED, staleness={0: 8})] * 3, engines=1)
    assert steps[-1] == (2, 2) and steps[1] == (1, 2)


def test_the_window_averages_and_restarts_when_the_pool_changes():
    policy = RolloutScalingPolicy(RolloutAutoscaleConfig(min=1, max=4, window=3), eta=1)
    first = [policy.observe(StepMetrics(engines=2, **m)) for m in (STARVED, BALANCED, BALANCED)]
    assert [d.target for d in first] == [2, 2, 3]  # one starved step in three: the learner waited 23% on average
    assert first[-1].reason == ("up: the learner waits for data while groups wait for busy engines "
                                "(learner idle 0.23, queue 1.7, engine utilisation 0.85)")
    after = [policy.observe(StepMetrics(engines=3, **BALANCED)) for _ in range(3)]
    assert [d.target for d in after] == [3, 3, 3] and after[0].reason == "hold: 1 of 3 steps seen at 3 engines"
    assert after[-1].reason.startswith("hold: within thresholds")


def test_the_first_steps_at_a_size_only_hold_and_say_so():
    policy = RolloutScalingPolicy(RolloutAutoscaleConfig(min=1, max=4, window=3), eta=1)
    decision = policy.observe(StepMetrics(engines=2, **STARVED))
    assert decision == type(decision)(2, "hold: 1 of 3 steps seen at 2 engines")
    assert policy.observe(StepMetrics(engines=5, **BALANCED)).target == 4  # outside the bounds: back at once


def test_bad_metrics_and_settings_are_refused():
    with pytest.raises(ValueError, match="must lie in"):
        StepMetrics(engines=1, **dict(STARVED, learner_idle=1.5))
    with pytest.raises(ValueError, match="negative"):
        StepMetrics(engines=1, **dict(STARVED, staleness={-1: 2}))
    with pytest.raises(ValueError, match="not set"):
        RolloutScalingPolicy.from_config(load_config("configs/tiny.yaml"))
    with pytest.raises(ConfigError, match=r"rollout_actors \(1\) must lie within rollout_autoscale's"):
        load_config("configs/tiny.yaml", ["cluster.rollout_autoscale={min: 2, max: 3}"])
    with pytest.raises(ConfigError, match="growth"):
        load_config("configs/tiny.yaml", ["cluster.rollout_autoscale={min: 1, max: 2, growth: 0.5}"])
    with pytest.raises(ConfigError, match=r"min \(3\) must not exceed max \(2\)"):
        load_config("configs/tiny.yaml", ["cluster.rollout_autoscale={min: 3, max: 2}", "cluster.rollout_actors=2"])
    config = load_config("configs/tiny.yaml", ["cluster.rollout_autoscale.max=2", "train.staleness=2"])
    policy = RolloutScalingPolicy.from_config(config)
    assert (policy.settings.min, policy.settings.max, policy.eta) == (1, 2, 2)


# --- properties ----------------------------------------------------------------------------------------

fraction = st.floats(0.0, 1.0)
histogram = st.dictionaries(st.integers(0, 4), st.integers(0, 8), max_size=5)
metrics = st.builds(dict, learner_idle=fraction, queue_depth=st.floats(0.0, 10.0), staleness=histogram,
                    engine_utilisation=fraction)
bounds = st.integers(1, 6).flatmap(lambda lo: st.builds(
    RolloutAutoscaleConfig, min=st.just(lo), max=st.integers(lo, 8), window=st.integers(1, 3),
    idle_up=st.floats(0.01, 1.0), queue_up=st.floats(0.1, 5.0), util_down=fraction, press_share=st.floats(0.01, 1.0),
    growth=st.one_of(st.just(1.0), st.floats(1.0, 4.0)), shrink=st.one_of(st.just(1.0), st.floats(1.0, 4.0)),
    settle=st.integers(0, 2)))


def one_step_away(b: RolloutAutoscaleConfig, engines: int, target: int) -> bool:
    """``target`` is the count within the bounds, or one step (down or up) from it."""
    def clamp(n: int) -> int:
        return min(max(n, b.min), b.max)
    steps = {clamp(shrunk(engines, b.shrink)), clamp(engines), clamp(grown(engines, b.growth))}
    return target in steps and (target <= clamp(engines) or b.growth > 1 or target - clamp(engines) <= 1) and (
        target >= clamp(engines) or b.shrink > 1 or clamp(engines) - target <= 1)


@settings(max_examples=200, deadline=None)
@given(bounds, st.integers(0, 3), st.integers(0, 10), st.lists(st.tuples(metrics, st.booleans()), max_size=20))
def test_every_target_lies_within_bounds_and_one_step_away(b, eta, start, script):
    """Also for a pool that lags its target (the bool: the pool met the last target or not)."""
    policy, engines = RolloutScalingPolicy(b, eta), start
    for m, follows in script:
        target = policy.observe(StepMetrics(engines=engines, **m)).target
        assert b.min <= target <= b.max
        if b.min <= engines <= b.max:
            assert one_step_away(b, engines, target)
        engines = target if follows else engines


@settings(max_examples=200, deadline=None)
@given(bounds, st.integers(0, 3), st.lists(metrics, min_size=1, max_size=20))
def test_the_count_changes_at_most_once_per_window(b, eta, script):
    policy, engines, since_change = RolloutScalingPolicy(b, eta), b.min, 0
    for m in script:
        since_change += 1
        target = policy.observe(StepMetrics(engines=engines, **m)).target
        if target != engines:
            assert since_change >= b.settle + b.window
            engines, since_change = target, 0


def _target(b, eta, engines, m) -> int:
    policy = RolloutScalingPolicy(b, eta)
    return [policy.observe(StepMetrics(engines=engines, **m)) for _ in range(b.settle + b.window)][-1].target


@settings(max_examples=300, deadline=None)
@given(bounds, st.integers(0, 3), st.integers(1, 8), metrics,
       st.sampled_from(["learner_idle", "queue_depth", "engine_utilisation"]), st.floats(0.0, 1.0))
def test_more_idle_learner_queue_or_utilisation_never_lowers_the_target(b, eta, engines, m, field, more):
    higher = dict(m, **{field: min(m[field] + more, 1.0) if field != "queue_depth" else m[field] + more})
    assert _target(b, eta, engines, higher) >= _target(b, eta, engines, m)


@settings(max_examples=300, deadline=None)
@given(bounds, st.integers(0, 3), st.integers(1, 8), metrics, st.integers(0, 4), st.integers(1, 3))
def test_older_trained_groups_never_raise_the_target(b, eta, engines, m, age, by):
    """Moving the groups of one staleness to an older one (toward and past the bound)."""
    staleness = dict(m["staleness"])
    moved = staleness.pop(age, 0)
    staleness[age + by] = staleness.get(age + by, 0) + moved
    assert _target(b, eta, engines, dict(m, staleness=staleness)) <= _target(b, eta, engines, m)


@settings(max_examples=300, deadline=None)
@given(bounds, st.integers(1, 8), fraction, st.floats(0.0, 10.0), fraction, st.booleans())
def test_decide_never_both_grows_and_shrinks(b, engines, idle, queue, util, pressing):
    """Pressing only ever lowers the decision; and a decision moves the count by one step at most."""
    calm, pressed = decide(engines, idle, queue, util, False, b), decide(engines, idle, queue, util, True, b)
    assert pressed.target <= calm.target
    assert one_step_away(b, engines, calm.target) and one_step_away(b, engines, pressed.target)
