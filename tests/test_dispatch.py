"""Supervised least-loaded dispatch: names, replacement with the latest broadcast, bounded restarts."""
from __future__ import annotations

import asyncio

import pytest
import ray

from actors.dispatch import LeastLoaded, RestartsExhausted


@ray.remote(num_cpus=0)
class Holder:
    def __init__(self):
        self.value = None

    def load(self, value):
        self.value = value
        return {"loaded": value}

    def read(self):
        return self.value

    def wait_for(self, gate):
        return ray.get(gate.wait.remote())


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
