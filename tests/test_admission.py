"""The staleness controller: hand-written schedules, a state machine and random schedules."""
from __future__ import annotations

import copy
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pipelines.grpo.admission import STALE, AdmissionError, StalenessController


def generate(controller: StalenessController, ids, version: int) -> None:
    for group_id in ids:
        assert controller.on_generated(group_id, version)
        assert controller.on_ready(group_id)


def test_eta0_alternates_one_batch_per_version():
    c = StalenessController(eta=0, batch_size=2)
    assert c.capacity() == 2
    ids = c.admit(2)
    assert ids == [0, 1] and not c.can_admit(1)
    generate(c, [0], 0)
    assert c.next_batch(0) == []  # one ready group is not a batch
    generate(c, [1], 0)
    assert c.next_batch(0) == [0, 1]
    assert c.on_trained(0) == {0: 2}
    assert c.capacity() == 0  # the pool still has version 0: nothing starts before the sync
    c.on_synced(1)
    assert c.admit(2) == [2, 3] and c.capacity() == 0
    generate(c, [2, 3], 1)
    assert c.next_batch(1) == [2, 3] and c.on_trained(1) == {0: 2}
    assert c.stats() == {
        "admitted": 4, "trained": 4, "dropped": 0, "dropped_stale": 0, "drop_reasons": {},
        "in_flight": 0, "ready": 0, "training": 0, "staleness": {0: 4},
        "learner_version": 2, "rollout_version": 1,
    }


def test_admission_mode_neither_waits_for_nor_drops_a_slow_group():
    """AReaL's semantics: the strict controller would hold step 1 for group 0; this one trains what is ready."""
    strict, areal = StalenessController(eta=1, batch_size=2), StalenessController(eta=1, batch_size=2, mode="admission")
    for c in (strict, areal):
        c.admit(4)
        generate(c, [1, 2], 0)
        assert c.next_batch(0) == [1, 2] and c.on_trained(0) == {0: 2}
        c.on_synced(1)
        c.admit(2)  # 4, 5 at version 1
        generate(c, [3], 0)
        generate(c, [4, 5], 1)
    assert strict.next_batch(1) == []  # group 0 (deadline 1) is still in flight
    assert areal.next_batch(1) == [3, 4] and areal.on_trained(1) == {0: 1, 1: 1}
    areal.on_synced(2)
    areal.admit(2)  # 6, 7
    generate(areal, [6, 7], 2)
    assert areal.next_batch(2) == [5, 6]
    areal.on_trained(2)
    generate(areal, [0], 0)  # three versions late: kept, and first in line
    assert areal.next_batch(3) == [0, 7] and areal.on_trained(3) == {1: 1, 3: 1}
    assert areal.stats()["dropped"] == 0 and max(areal.staleness) == 3
    with pytest.raises(ValueError, match="unknown staleness mode"):
        StalenessController(1, 2, mode="loose")


def test_eta1_keeps_two_batches_ahead_and_trains_oldest_first():
    c = StalenessController(eta=1, batch_size=2)
    assert c.admit(4) == [0, 1, 2, 3] and c.capacity() == 0
    generate(c, [2, 3], 0)
    assert c.next_batch(0) == [2, 3]  # 0 and 1 can still make step 1
    assert c.on_trained(0) == {0: 2}
    assert c.capacity() == 0  # learner at 1, pool at 0: the window is (0 + 1 + 1 - 1)·2 = 2
    c.on_synced(1)
    assert c.admit(2) == [4, 5]
    generate(c, [4, 5], 1)
    generate(c, [0, 1], 0)
    assert c.next_batch(1) == [0, 1]  # the version-0 groups first: their deadline is now
    assert c.on_trained(1) == {1: 2}
    c.on_synced(2)
    assert c.next_batch(2) == [4, 5] and c.on_trained(2) == {1: 2}
    assert c.staleness == {0: 2, 1: 4} and c.stats()["dropped"] == 0


def test_learner_waits_for_a_group_at_its_deadline_unless_given_up():
    c = StalenessController(eta=1, batch_size=1)
    c.admit(2)
    generate(c, [1], 0)
    assert c.next_batch(0) == [1]  # group 0 (deadline 1) can still make step 1
    c.on_trained(0)
    c.on_synced(1)
    assert c.admit(1) == [2]
    generate(c, [2], 1)
    assert c.next_batch(1) == []  # training group 2 now would strand group 0
    assert c.next_batch(1, stragglers={0}) == [2]
    c.on_trained(1)
    assert not c.on_generated(0, 0)  # 2 - 0 > 1: dropped on arrival
    assert c.drop_reason(0) == STALE and c.stats()["dropped_stale"] == 1
    assert c.pending == 0 and c.capacity() == 1  # its slot is free again


def test_a_group_older_than_its_floor_is_dropped_not_trained():
    c = StalenessController(eta=1, batch_size=1)
    c.admit(2)
    generate(c, [0, 1], 0)
    c.next_batch(0)
    c.on_trained(0)
    c.on_synced(1)
    c.next_batch(1)  # group 1 (version 0, staleness 1)
    c.on_trained(1)
    c.on_synced(2)
    (late,) = c.admit(1)
    assert not c.on_generated(late, 0)  # a pool that missed two syncs: 2 - 0 > 1
    assert c.drop_reason(late) == STALE and c.staleness == {0: 1, 1: 1}


def test_arrival_during_a_step_is_judged_against_the_next_open_step():
    c = StalenessController(eta=1, batch_size=1)
    c.admit(2)
    generate(c, [0], 0)
    assert c.next_batch(0) == [0]  # step 0 runs; group 1 could join step 1 at the earliest
    assert c.on_generated(1, 0) and c.on_ready(1)
    c.on_trained(0)
    assert c.next_batch(1) == [1]


def test_backpressure_and_failures():
    c = StalenessController(eta=1, batch_size=4, max_in_flight=3)
    assert c.capacity() == 3
    c.admit(3)
    with pytest.raises(AdmissionError):
        c.admit(1)
    generate(c, [0], 0)
    assert c.capacity() == 1 and c.in_flight == 2 and c.ready == 1
    c.on_failed(1, "rollout: ActorDiedError")
    c.on_failed(1, "again")  # idempotent: the first reason stays
    assert c.drop_reason(1) == "rollout: ActorDiedError" and c.capacity() == 2
    assert not c.on_ready(1)
    assert c.stats()["drop_reasons"] == {"rollout: ActorDiedError": 1}


def test_misuse_is_rejected():
    c = StalenessController(eta=0, batch_size=1)
    with pytest.raises(ValueError):
        StalenessController(eta=-1, batch_size=1)
    with pytest.raises(ValueError):
        c.next_batch(1)
    with pytest.raises(ValueError):
        c.on_trained(0)
    with pytest.raises(ValueError):
        c.on_synced(1)
    with pytest.raises(KeyError):
        c.on_generated(7, 0)
    c.admit(1)
    with pytest.raises(ValueError):
        c.on_ready(0)
    generate(c, [0], 0)
    assert c.next_batch(0) == [0]
    with pytest.raises(RuntimeError):
        c.next_batch(0)
    with pytest.raises(ValueError):
        c.on_failed(0, "too late: it is training")


class ControllerMachine(RuleBasedStateMachine):
    """Arbitrary interleavings of admissions, arrivals, failures, steps and syncs."""

    @initialize(
        eta=st.integers(0, 3),
        batch=st.integers(1, 4),
        max_in_flight=st.none() | st.integers(1, 12),
    )
    def setup(self, eta, batch, max_in_flight):
        self.c = StalenessController(eta, batch, max_in_flight)
        self.floor, self.version, self.trained_at = {}, {}, {}
        self.ready_ids: set[int] = set()
        self.batch: list[int] = []
        self.gave_up = False

    def _live(self, ready: bool, generated: bool) -> list[int]:
        return [g for g in self.floor if g not in self.trained_at and g not in self.batch
                and self.c.drop_reason(g) is None and (g in self.version) == generated
                and (g in self.ready_ids) == ready]

    @rule(n=st.integers(1, 5))
    def admit(self, n):
        if self.c.can_admit(n):
            for group_id in self.c.admit(n):
                self.floor[group_id] = self.c.rollout_version
        else:
            with pytest.raises(AdmissionError):
                self.c.admit(n)

    @rule(data=st.data())
    def generated(self, data):
        if candidates := self._live(ready=False, generated=False):
            group_id = data.draw(st.sampled_from(candidates))
            version = data.draw(st.integers(self.floor[group_id], self.c.rollout_version))
            self.version[group_id] = version
            self.c.on_generated(group_id, version)

    @rule(data=st.data())
    def ready(self, data):
        if candidates := self._live(ready=False, generated=True):
            group_id = data.draw(st.sampled_from(candidates))
            self.ready_ids.add(group_id)
            self.c.on_ready(group_id)

    @rule(data=st.data())
    def fail(self, data):
        if candidates := self._live(ready=False, generated=False):
            self.c.on_failed(data.draw(st.sampled_from(candidates)), "rollout failed")

    @rule(data=st.data())
    def start_step(self, data):
        if self.batch:
            return
        in_flight = self._live(ready=False, generated=False) + self._live(False, True)
        stragglers = set()
        if in_flight and data.draw(st.booleans()):
            stragglers = data.draw(st.sets(st.sampled_from(in_flight), min_size=1))
            self.gave_up = True
        self.batch = self.c.next_batch(self.c.learner_version, stragglers=stragglers)

    @rule()
    def finish_step(self):
        if self.batch:
            step = self.c.learner_version
            self.c.on_trained(step)
            self.trained_at.update(dict.fromkeys(self.batch, step))
            self.batch = []

    @rule(data=st.data())
    def sync(self, data):
        if self.c.rollout_version < self.c.learner_version:
            lo = self.c.rollout_version + 1
            self.c.on_synced(data.draw(st.integers(lo, self.c.learner_version)))

    @invariant()
    def trained_groups_respect_the_bound(self):
        for group_id, step in self.trained_at.items():
            assert step - self.version[group_id] <= self.c.eta

    @invariant()
    def every_group_is_accounted_for(self):
        dropped = {g for g in self.floor if self.c.drop_reason(g)}
        assert not dropped & set(self.trained_at)
        assert len(self.floor) == self.c.pending + len(self.trained_at) + len(dropped)
        assert self.c.trained == len(self.trained_at)
        only_failures = {g for g in dropped if self.c.drop_reason(g) == "rollout failed"}
        if not self.gave_up:  # versions are never below their floor here
            assert dropped == only_failures

    @invariant()
    def admission_window_and_backpressure_hold(self):
        c = self.c
        window = (c.rollout_version + c.eta + 1 - c.learner_version) * c.batch_size
        assert c.pending <= window
        assert c.max_in_flight is None or c.in_flight <= c.max_in_flight

    @invariant()
    def learner_can_progress_once_everything_is_ready(self):
        c = self.c
        if self.batch or c.in_flight or c.pending < c.batch_size:
            return
        assert copy.deepcopy(c).next_batch(c.learner_version)


ControllerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60,
                                               deadline=None)
TestControllerMachine = ControllerMachine.TestCase


def simulate(eta, batch, steps, delays, learn_ticks, sync_ticks, patience):
    """A discrete-time run: groups take ``delays`` ticks, the learner gives up after ``patience``.

    Returns (controller, {group: trained step}, {group: version}).
    """
    c = StalenessController(eta, batch)
    delay = itertools.cycle(delays)
    arrive, admitted_at, version, trained_at = {}, {}, {}, {}
    syncs, batch_ids, learner_done = [], [], None
    for tick in itertools.count():
        assert tick < 20_000, f"no progress: {c.stats()}"
        for at, v in [s for s in syncs if s[0] <= tick]:
            syncs.remove((at, v))
            c.on_synced(v)
        if batch_ids and learner_done <= tick:
            step = c.learner_version
            c.on_trained(step)
            trained_at.update(dict.fromkeys(batch_ids, step))
            syncs.append((tick + sync_ticks, step + 1))
            batch_ids = []
            if c.learner_version == steps:
                return c, trained_at, version
        for group_id in [g for g, at in arrive.items() if at <= tick]:
            del arrive[group_id]
            if c.on_generated(group_id, version[group_id]):
                c.on_ready(group_id)
        if room := min(c.capacity(), steps * batch - c.pending - c.trained):
            for group_id in c.admit(room):
                admitted_at[group_id], version[group_id] = tick, c.rollout_version
                arrive[group_id] = tick + next(delay)
        if not batch_ids:
            given_up = {g for g in arrive if tick - admitted_at[g] >= patience}
            batch_ids = c.next_batch(c.learner_version, stragglers=given_up)
            learner_done = tick + learn_ticks


schedule = dict(
    eta=st.integers(0, 3), batch=st.integers(1, 4), steps=st.integers(1, 8),
    learn_ticks=st.integers(1, 4), sync_ticks=st.integers(0, 3),
)


def check_run(c, trained_at, version, steps):
    assert all(step - version[g] <= c.eta for g, step in trained_at.items())
    assert len(trained_at) == c.trained == steps * c.batch_size
    dropped = {g for g in version if c.drop_reason(g)}
    assert set(version) == set(trained_at) | dropped and not set(trained_at) & dropped
    assert c.pending == 0


@settings(max_examples=200, deadline=None)
@given(**schedule, patience=st.integers(1, 12), data=st.data())
def test_bounded_delays_train_every_group(eta, batch, steps, learn_ticks, sync_ticks,
                                          patience, data):
    delays = data.draw(st.lists(st.integers(1, patience), min_size=1, max_size=40))
    c, trained_at, version = simulate(eta, batch, steps, delays, learn_ticks, sync_ticks,
                                      patience)
    check_run(c, trained_at, version, steps)
    assert c.stats()["dropped"] == 0


@settings(max_examples=200, deadline=None)
@given(**schedule, patience=st.integers(1, 6),
       delays=st.lists(st.integers(1, 60), min_size=1, max_size=40))
def test_stragglers_are_dropped_never_trained_stale(eta, batch, steps, learn_ticks,
                                                   sync_ticks, patience, delays):
    c, trained_at, version = simulate(eta, batch, steps, delays, learn_ticks, sync_ticks,
                                      patience)
    check_run(c, trained_at, version, steps)
    assert set(c.stats()["drop_reasons"]) <= {STALE}
