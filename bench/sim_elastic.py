"""The simulated pool behind the elastic driver: what ``pipelines.grpo.elastic.ElasticRollouts`` drives.

``SimPool`` has the surface of ``actors.rollout_pool.RolloutPool`` that the driver uses
(``engines``, ``starting``, ``add_engine``, ``retire_engine``, ``settle``) over the engines of
``bench.sim_stages.RolloutPoolSim``; ``SimPlacement`` stands for ``cluster.topology.Placement``
(the run's plan, a placement group per added engine, freed on removal) and records the
autoscaler hints (``request``) instead of sending them. So the bench runs the training
driver's own resize code; only the cluster under it is simulated.
"""
from __future__ import annotations

import ray

from actors.dispatch import JOINED, REMOVED, SlotEvent
from bench.sim_profile import Profile
from cluster.placement import KindPlan, Plan
from pipelines.grpo.elastic import ROLLOUT_KIND

TIMEOUT_S = 60.0


class SimPool:
    """Engine names over the bank's engine indices (an index is reused once its engine is removed)."""

    def __init__(self, actor, engines: int):
        self.actor = actor
        self._names = {i: f"engine-{i}" for i in range(engines)}  # index -> name, while not removed
        self._options: dict[str, dict] = {name: {} for name in self._names.values()}
        self._serving = set(self._names.values())
        self._starting: list[str] = []
        self._dropped: set[str] = set()  # retired while starting
        self._added = engines

    @property
    def engines(self) -> int:
        """Engines given work now (not those still starting or retiring)."""
        return len(self._serving)

    @property
    def starting(self) -> list[str]:
        return list(self._starting)

    def add_engine(self, options: dict | None = None) -> str:
        index = ray.get(self.actor.add_engine.remote(), timeout=TIMEOUT_S)
        name, self._added = f"engine-{self._added}", self._added + 1
        self._names[index], self._options[name] = name, options or {}
        self._starting.append(name)
        return name

    def retire_engine(self, name: str | None = None) -> str:
        """Stop engine ``name``; by default the newest starting one, else the least busy serving one."""
        if name is None and self._starting:
            name = self._starting[-1]
        index = None if name is None else self._index(name)
        index = ray.get(self.actor.retire_engine.remote(index), timeout=TIMEOUT_S)
        name = self._names[index]
        if name in self._starting:
            self._starting.remove(name)
            self._dropped.add(name)
        self._serving.discard(name)
        return name

    def settle(self) -> list[SlotEvent]:
        """Engines that joined or were removed since the last call."""
        events = []
        for kind, index in ray.get(self.actor.changes.remote(), timeout=TIMEOUT_S):
            name = self._names[index]
            if kind == JOINED:
                if name in self._starting:
                    self._starting.remove(name)
                    self._serving.add(name)
                else:  # retired as it joined: it leaves once its (no) work is done
                    self._dropped.discard(name)
                events.append(SlotEvent(JOINED, name, self._options[name]))
            else:
                why = "retired before it joined" if name in self._dropped else ""
                self._dropped.discard(name)
                del self._names[index]
                events.append(SlotEvent(REMOVED, name, self._options.pop(name), why))
        return events

    def _index(self, name: str) -> int:
        return next(i for i, n in self._names.items() if n == name)


def sim_plan(profile: Profile, actors: int, engines: int) -> Plan:
    """The simulated cluster's plan: one GPU per engine; learner, reference and reward sized for ``actors``."""
    services = profile.services(actors)
    learner_gpus = round(profile.learner_gpus_per_actor * actors)
    kinds = [("rollout", engines, {"GPU": 1.0, "CPU": 1.0}, "STRICT_PACK", 1),
             ("learner", learner_gpus, {"GPU": 1.0, "CPU": 1.0}, "PACK", learner_gpus),
             ("reference", services["reference"].servers, {"GPU": 1.0, "CPU": 1.0}, "PACK", 1),
             ("reward", services["reward"].servers, {"CPU": 1.0}, "PACK", services["reward"].servers)]
    return Plan(tuple(KindPlan(kind, count, bundle.get("GPU", 0.0), bundle["CPU"], (bundle,), strategy, per_group,
                               0.0, bundle.get("GPU", 0.0)) for kind, count, bundle, strategy, per_group in kinds))


class SimPlacement:
    """Placement groups as counters; ``requests``: every autoscaler hint, as the GPUs it asks for."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.groups: dict[str, set[int]] = {}
        self.requests: list[float] = []
        self._next = 0

    def add_group(self, kind: str) -> dict:
        if self.plan.kind(kind).per_group != 1:
            raise ValueError(f"{kind} actors share placement groups; only a kind with a group per actor can grow")
        self._next += 1
        self.groups.setdefault(kind, set()).add(self._next)
        return {"placement_group": self._next}

    def release(self, kind: str, options: dict) -> None:
        self.groups.get(kind, set()).discard(options.get("placement_group"))

    def request(self, bundles: list[dict[str, float]]) -> None:
        self.requests.append(sum(b.get("GPU", 0.0) for b in bundles))

    @property
    def rollout_groups(self) -> int:
        return len(self.groups.get(ROLLOUT_KIND, ()))
