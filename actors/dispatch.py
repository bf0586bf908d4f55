"""Least-loaded dispatch over a supervised set of actors, shared by the actor pools.

Every actor has a name (``<pool>-<slot>.<incarnation>``) that travels with the calls made
on it, so a failed call can be traced to its actor, and ``replace`` can start a fresh one
in the same slot (and the same placement-group bundle), which first gets the latest
``broadcast`` (the current weights) before any call can reach it. Replacements are
bounded: past ``max_restarts`` the slot is removed, and a pool with no slot left raises.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import ray


class RestartsExhausted(RuntimeError):
    """Every actor of a pool failed more often than its restart budget allows."""


class LeastLoaded:
    """Tracks each actor's unfinished calls; picks the one with the fewest, ties in turn.

    ``factory(**options)`` starts one actor with the Ray options of its slot (``slot_options[slot]``,
    e.g. its placement-group bundle; none when not given). Completion is checked with
    ``fetch_local=False``, so the driver never pulls a result.
    """

    def __init__(self, factory: Callable[..., object], size: int, name: str, *, max_restarts: int = 3,
                 slot_options: Sequence[dict] | None = None):
        if size < 1:
            raise ValueError(f"{name}: need at least one actor, got {size}")
        if slot_options is not None and len(slot_options) != size:
            raise ValueError(f"{name}: {len(slot_options)} slot options for {size} actors")
        self.factory, self.name, self.max_restarts = factory, name, max_restarts
        self.slot_options = slot_options
        self._last_broadcast: tuple[str, tuple] | None = None
        self.actors = [self._start(slot) for slot in range(size)]
        self.names = [f"{name}-{slot}.0" for slot in range(size)]
        self._unfinished: list[list[ray.ObjectRef]] = [[] for _ in self.actors]
        self._turn = 0
        self.restarts = 0

    def dispatch(self, method: str, *args, **kwargs) -> tuple[ray.ObjectRef, str]:
        """Submit ``method`` to the least-loaded actor: (its result ref, the actor's name)."""
        index = self._pick()
        out = getattr(self.actors[index], method).remote(*args, **kwargs)
        self._unfinished[index].append(out)
        return out, self.names[index]

    def broadcast(self, method: str, *args) -> list[tuple[ray.ObjectRef, str]]:
        """Call ``method`` on every actor: (ref, actor name) each; replayed on replacements."""
        self._last_broadcast = (method, args)
        return [(getattr(actor, method).remote(*args), name) for actor, name in zip(self.actors, self.names)]

    def owns(self, name: str) -> bool:
        return name in self.names

    def replace(self, name: str) -> bool:
        """Kill actor ``name`` and start a fresh one in its slot; False if it was already replaced.

        Past the restart budget the slot is dropped instead (RestartsExhausted when none is left).
        """
        if name not in self.names:
            return False
        slot = self.names.index(name)
        ray.kill(self.actors[slot], no_restart=True)
        if self.restarts >= self.max_restarts:
            del self.actors[slot], self.names[slot], self._unfinished[slot]
            if not self.actors:
                raise RestartsExhausted(f"{self.name}: every actor failed; {self.max_restarts} restarts used "
                                        f"(raise cluster.max_actor_restarts or fix the cause in the actor's log)")
            return True
        self.restarts += 1
        number, incarnation = name.rsplit("-", 1)[1].split(".")
        self.actors[slot] = self._start(int(number))
        self.names[slot] = f"{self.name}-{number}.{int(incarnation) + 1}"
        self._unfinished[slot] = []
        if self._last_broadcast is not None:  # queued before any call can reach the new actor
            method, args = self._last_broadcast
            getattr(self.actors[slot], method).remote(*args)
        return True

    def in_flight(self) -> int:
        """Calls submitted and not yet finished, over all actors (read-only: safe beside ``dispatch``)."""
        return sum(len(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[1])
                   for refs in list(self._unfinished) if refs)

    def _start(self, number: int):
        """A fresh actor for slot ``number`` (its number in the names, kept when other slots are dropped)."""
        return self.factory(**(self.slot_options[number] if self.slot_options is not None else {}))

    def kill(self, name: str) -> None:
        """Kill actor ``name`` (a stalled one): its calls fail and the failures replace it."""
        if name in self.names:
            ray.kill(self.actors[self.names.index(name)], no_restart=True)

    def _pick(self) -> int:
        for i, refs in enumerate(self._unfinished):
            if refs:
                _, self._unfinished[i] = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        n = len(self.actors)
        if not n:
            raise RuntimeError(f"the {self.name} was shut down")
        chosen = min(range(n), key=lambda i: (len(self._unfinished[i]), (i - self._turn) % n))
        self._turn = (chosen + 1) % n
        return chosen

    def shutdown(self) -> None:
        """Kill the actors (their queued calls fail); unusable after."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.names, self._unfinished = [], [], []


class SupervisedPool:
    """What every actor pool offers its supervisor (the scheduler's stages), over ``self._dispatch``."""

    _dispatch: LeastLoaded

    @property
    def workers(self) -> list:
        return list(self._dispatch.actors)

    @property
    def restarts(self) -> int:
        return self._dispatch.restarts

    def owns(self, worker: str) -> bool:
        return self._dispatch.owns(worker)

    def in_flight(self) -> int:
        """The pool's calls not finished yet."""
        return self._dispatch.in_flight()

    def replace(self, worker: str) -> bool:
        """Start a fresh actor in place of ``worker`` (dead or stalled); False if already replaced."""
        return self._dispatch.replace(worker)

    def kill(self, worker: str) -> None:
        """Kill a stalled ``worker``; its failing calls then lead to ``replace``."""
        self._dispatch.kill(worker)

    def shutdown(self) -> None:
        """Kill the workers (their queued calls fail); the pool is unusable after."""
        self._dispatch.shutdown()
