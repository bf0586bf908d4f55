"""Supervised least-loaded dispatch: names, replacement with the latest broadcast, bounded restarts."""
from __future__ import annotations

import asyncio
import time

import pytest
import ray

from actors.dispatch import JOIN_FAILED, JOINED, REMOVED, LeastLoaded, RestartsExhausted


@ray.remote(num_cpus=0)
class Holder:
    """``start``: how its start (``ping``) ends: at once, when a gate opens, or failing."""

    def __init__(self, start=None):
        self.value, self.start = None, start

    def load(self, value):
        self.value = value
        return {"loaded": value}

    def read(self):
        return self.value

    def wait_for(self, gate):
        return ray.get(gate.wait.remote())

    def ping(self):
        if self.start == "broken":
            raise RuntimeError("engine failed to start")
        if self.start is not None:
            ray.get(self.start.wait.remote())
        return True


def test_calls_name_their_actor_and_a_replacement_gets_the_latest_broadcast(ray_cluster):
    pool = LeastLoaded(Holder.remote, 2, "holder", max_restarts=1)
    try:
        assert pool.names == ["holder-0.0", "holder-1.0"]
        assert {pool.dispatch("read")[1] for _ in range(2)} == {"holder-0.0", "holder-1.0"}
        ray.get([ref for ref, _ in pool.broadcast("load", 7)], timeout=30)
        ray.kill(pool.actors[0])
        assert pool.replace("holder-0.0") and not pool.replace("holder-0.0")  # twice: one replacement
        assert pool.names == ["holder-0.1", "holder-1.0"] and pool.restarts == 1
        assert ray.get(pool.actors[0].read.remote(), timeout=30) == 7  # the broadcast was replayed first
    finally:
        pool.shutdown()


def test_past_the_budget_slots_are_dropped_then_the_pool_gives_up(ray_cluster):
    pool = LeastLoaded(Holder.remote, 2, "holder", max_restarts=0)
    try:
        assert pool.replace("holder-1.0") and pool.names == ["holder-0.0"]
        ref, name = pool.dispatch("read")
        assert name == "holder-0.0" and ray.get(ref, timeout=30) is None
        with pytest.raises(RestartsExhausted, match="holder: every actor failed"):
            pool.replace("holder-0.0")
    finally:
        pool.shutdown()



@ray.remote(num_cpus=0)
class Gate:
    def __init__(self):
        self.opened = asyncio.Event()

    async def wait(self):
        await self.opened.wait()

    async def open(self):
        self.opened.set()


def test_in_flight_counts_the_calls_not_yet_finished(ray_cluster):
    pool, gate = LeastLoaded(Holder.remote, 2, "holder"), Gate.remote()
    try:
        ray.get(pool.dispatch("read")[0], timeout=30)
        assert pool.in_flight() == 0
        blocked = [pool.dispatch("wait_for", gate)[0] for _ in range(3)]
        assert pool.in_flight() == 3
        ray.get(gate.open.remote(), timeout=30)
        ray.get(blocked, timeout=30)
        assert pool.in_flight() == 0
    finally:
        pool.shutdown()
        ray.kill(gate)


def settle_until(pool: LeastLoaded, kind: str, timeout_s: float = 30.0) -> list:
    """Settle until an event of ``kind`` arrives: every event seen."""
    deadline, events = time.monotonic() + timeout_s, []
    while not any(e.kind == kind for e in events):
        assert time.monotonic() < deadline, f"no {kind} event within {timeout_s} s: {events}"
        events += pool.settle()
        time.sleep(0.01)
    return events


def test_an_added_actor_joins_with_the_latest_broadcast_and_only_then_gets_calls(ray_cluster):
    gate = Gate.remote()  # the added actor's start waits for it
    pool = LeastLoaded(lambda: Holder.remote(gate), 1, "holder", ready_method="ping")
    try:
        ray.get([ref for ref, _ in pool.broadcast("load", 3)], timeout=30)
        name = pool.add()
        assert name == "holder-1.0" and pool.joining == [name] and pool.serving == ["holder-0.0"]
        acks = pool.broadcast("load", 4)  # a broadcast while it joins does not wait for it...
        assert [n for _, n in acks] == ["holder-0.0"]
        assert {pool.dispatch("read")[1] for _ in range(4)} == {"holder-0.0"}  # ...and it gets no calls yet
        ray.get(gate.open.remote(), timeout=30)
        events = settle_until(pool, JOINED)
        assert [(e.kind, e.name) for e in events] == [(JOINED, name)]
        assert ray.get(pool.actors[1].read.remote(), timeout=30) == 4  # joined with the latest weights
        assert {pool.dispatch("read")[1] for _ in range(4)} == {"holder-0.0", name}
        assert [n for _, n in pool.broadcast("load", 5)] == ["holder-0.0", name]
    finally:
        pool.shutdown()
        ray.kill(gate)


def test_a_retired_actor_finishes_what_it_holds_before_it_is_killed(ray_cluster):
    pool, gate = LeastLoaded(Holder.remote, 2, "holder"), Gate.remote()
    try:
        ray.get([ref for ref, _ in pool.broadcast("load", 1)], timeout=30)
        refs = dict(pool.dispatch("wait_for", gate) for _ in range(2))
        held = next(ref for ref, name in refs.items() if name == "holder-1.0")
        pool.retire("holder-1.0")
        assert pool.names == ["holder-0.0"] and pool.retiring == ["holder-1.0"] and pool.owns("holder-1.0")
        assert {pool.dispatch("read")[1] for _ in range(3)} == {"holder-0.0"}
        assert [n for _, n in pool.broadcast("load", 2)] == ["holder-0.0"]
        time.sleep(0.2)
        assert pool.settle() == [] and pool.unfinished("holder-1.0") == 1  # still holds its blocked call: alive
        with pytest.raises(ValueError, match="last serving actor"):
            pool.retire("holder-0.0")
        ray.get(gate.open.remote(), timeout=30)
        assert ray.get(held, timeout=30) is None  # the held call completed, nothing lost
        events = settle_until(pool, REMOVED)
        assert [(e.kind, e.name) for e in events] == [(REMOVED, "holder-1.0")]
        assert pool.retiring == [] and not pool.owns("holder-1.0")
    finally:
        pool.shutdown()
        ray.kill(gate)


def test_an_actor_that_fails_to_start_never_joins_and_one_retired_while_joining_goes_at_once(ray_cluster):
    starts = iter([None, "broken", None])
    pool = LeastLoaded(lambda: Holder.remote(next(starts)), 1, "holder", ready_method="ping")
    try:
        broken = pool.add()
        events = settle_until(pool, JOIN_FAILED)
        assert [(e.kind, e.name) for e in events] == [(JOIN_FAILED, broken)]
        assert "engine failed to start" in events[0].why and pool.names == ["holder-0.0"]
        late = pool.add()
        pool.retire(late)
        assert [(e.kind, e.name) for e in pool.settle()] == [(REMOVED, late)] and pool.names == ["holder-0.0"]
    finally:
        pool.shutdown()
