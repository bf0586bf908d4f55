"""bench/autoscale.py: its reporting on hand-made steps, then the simulated pool resized by the training driver.

The Ray tests run a tiny simulated cluster on the session's Ray cluster (seconds); they check
behaviour (the pool grows and shrinks, the driver's policy changes the engine count, the
figures are consistent), never a performance threshold: those live in the bench's printout.
"""
from __future__ import annotations

import dataclasses
import time

import pytest
import ray

from actors.dispatch import JOINED, REMOVED
from bench.autoscale import (
    Run,
    Sample,
    decisions,
    engine_hours,
    learner_idle,
    simulate,
    staleness_histogram,
    steady_rate,
    summarise,
)
from bench.sim_elastic import SimPlacement, SimPool, sim_plan
from bench.sim_profile import Profile
from bench.sim_stages import SimStages
from config.schema import RolloutAutoscaleConfig


def sample(step, now, finished, engine_s, wait_s=1.0, learn_s=3.0, staleness=None, engines=2):
    return Sample(step, now, finished, engines, engines, engine_s, wait_s, learn_s, staleness or {})


def test_reporting_on_hand_made_steps():
    steps = [sample(0, 0.0, 0, 0.0, 0.0, 0.0),
             sample(1, 100.0, 40, 200.0, 3.0, 1.0, {0: 4}),
             sample(2, 150.0, 90, 300.0, 1.0, 3.0, {0: 2, 1: 2}),
             sample(3, 250.0, 120, 500.0, 0.0, 4.0, {1: 4})]
    # 2 steps of 40 responses in 100 s trained, 30 generated in them: the lower counts
    assert steady_rate(steps, responses_per_step=40, window=2) == pytest.approx(80 / 150)
    assert steady_rate(steps, responses_per_step=10, window=1) == pytest.approx(10 / 100)
    assert learner_idle(steps[1:]) == pytest.approx(4.0 / 12.0)
    assert staleness_histogram(steps) == {0: 6, 1: 6}
    assert engine_hours(steps) == pytest.approx(500 / 3600)
    summary = summarise(Run("hand-made", steps), steps=2, window=1, responses_per_step=20)
    assert summary["rate"] == pytest.approx(min(20, 50) / 50) and summary["staleness"] == {0: 6, 1: 2}
    assert summary["engine_hours"] == pytest.approx(300 / 3600) and summary["idle"] == pytest.approx(0.25)
    events = [{"event": "add", "step": 3, "reason": "up"}, {"event": "add", "step": 3, "reason": "up"},
              {"event": "joined", "step": 4, "reason": "started"}, {"event": "retire", "step": 6, "reason": "down"}]
    assert decisions(events) == ["  after step 3: 2 x add (up)", "  after step 6: 1 x retire (down)"]


# a call of 2 groups of 4 fills an engine's 8 slots; engines start in 2 simulated seconds
TINY = dataclasses.replace(Profile(), group_size=4, groups_per_actor=2, groups_per_call=2, max_seqs=8,
                           median_tokens=400.0, sigma=0.5, max_new_tokens=2000, node_start_s=1.0,
                           engine_start_s=1.0, time_scale=1 / 50)


@pytest.fixture(scope="module")
def sim(ray_cluster):
    stages = SimStages()
    yield stages
    stages.shutdown()


def _settle_until(pool: SimPool, kind: str, timeout_s: float = 10.0) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = pool.settle()
        if events:
            return events
        ray.get(pool.actor.stats.remote())
        time.sleep(0.02)
    raise AssertionError(f"no {kind} event in {timeout_s} s")


def test_the_sim_pool_grows_and_shrinks(sim):
    sim.configure(TINY, 2, engines=1, capacity=3, serial=True)
    pool = SimPool(sim.pool, engines=1)
    placement = SimPlacement(sim_plan(TINY, actors=2, engines=1))
    name = pool.add_engine(placement.add_group("rollout"))
    assert (pool.engines, pool.starting, placement.rollout_groups) == (1, [name], 1)
    (joined,) = _settle_until(pool, JOINED)
    assert (joined.kind, joined.name, pool.engines, pool.starting) == (JOINED, name, 2, [])
    assert sim.pool_stats()["engines"] == 2
    retired = pool.retire_engine()
    assert pool.engines == 1
    (removed,) = _settle_until(pool, REMOVED)  # it held no work: it goes at once
    assert (removed.kind, removed.name) == (REMOVED, retired)
    placement.release("rollout", removed.options)
    dropped = pool.retire_engine(pool.add_engine({}))  # retired while starting
    assert [(e.kind, e.name, e.why) for e in pool.settle()] == [(REMOVED, dropped, "retired before it joined")]
    assert sim.pool_stats()["paid"] == 1


def test_the_training_driver_resizes_a_simulated_run(sim):
    """A pool too small for the learner grows (the staleness may crowd eta only if every group sits at it)."""
    scaling = RolloutAutoscaleConfig(min=1, max=3, window=1, growth=2.0, press_share=1.0)
    run = simulate(sim, TINY, "policy", engines=1, steps=6, eta=2, scaling=scaling, actors=2)
    serving = [s.engines for s in run.samples]
    assert serving[0] == 1 and max(serving) > 1, run.events  # the policy added engines and they joined
    adds = [e for e in run.events if e["event"] == "add"]
    assert adds and all(e["reason"].startswith("up") for e in adds)
    assert any(e["event"] == "joined" for e in run.events)
    summary = summarise(run, steps=6, window=2, responses_per_step=TINY.batch_groups(2) * TINY.group_size)
    assert summary["rate"] > 0 and 0.0 <= summary["idle"] <= 1.0
    assert sum(summary["staleness"].values()) == 6 * TINY.batch_groups(2) and max(summary["staleness"]) <= 2
    hours = run.samples[6].now / 3600
    assert 1 * hours <= summary["engine_hours"] <= 3 * hours
