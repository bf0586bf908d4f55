"""Least-loaded dispatch over a supervised, resizable set of actors, shared by the actor pools.

Every actor has a name (``<pool>-<slot>.<incarnation>``) that travels with the calls made
on it, so a failed call can be traced to its actor, and ``replace`` can start a fresh one
in the same slot (and the same placement-group bundle), which first gets the latest
``broadcast`` (the current weights) before any call can reach it. Replacements are
bounded: past ``max_restarts`` the slot is removed, and a pool with no slot left raises.

The set can grow and shrink while calls go on. ``add`` starts an actor in a new slot that
*joins*: it gets the latest broadcast (and every later one) and its ``ready_method`` is
called, and only once all of those have returned is it given calls; until then broadcasts
do not wait on it (their acks name only the serving actors), so a slow start never holds
up a weight sync. ``retire`` takes an actor out of dispatch and broadcasts at once; it is
killed by ``settle`` only when every call it holds and its last broadcast have finished, so
nothing it was given is lost. ``settle`` reports these transitions as ``SlotEvent``s.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayError

JOINED, JOIN_FAILED, REMOVED = "joined", "join_failed", "removed"


class RestartsExhausted(RuntimeError):
    """Every actor of a pool failed more often than its restart budget allows."""


@dataclass(frozen=True)
class SlotEvent:
    """A change of the set: an added actor ``joined`` or failed to (``join_failed``, with why),
    a retired one was ``removed``; ``options`` are its slot's Ray options (to free its placement)."""

    kind: str
    name: str
    options: dict
    why: str = ""


@dataclass(eq=False)
class _Slot:
    name: str
    actor: object
    options: dict
    unfinished: list[ray.ObjectRef] = field(default_factory=list)
    ack: ray.ObjectRef | None = None  # its latest broadcast call
    joining: list[ray.ObjectRef] | None = None  # what must finish before it gets calls (None: serving)


class LeastLoaded:
    """Tracks each actor's unfinished calls; picks the serving one with the fewest, ties in turn.

    ``factory(**options)`` starts one actor with the Ray options of its slot (``slot_options[slot]``,
    e.g. its placement-group bundle; none when not given). Completion is checked with
    ``fetch_local=False``, so the driver never pulls a result. ``ready_method``: called on an
    added actor before it joins (e.g. a ping that returns once its engine has started).
    """

    def __init__(self, factory: Callable[..., object], size: int, name: str, *, max_restarts: int = 3,
                 slot_options: Sequence[dict] | None = None, ready_method: str | None = None):
        if size < 1:
            raise ValueError(f"{name}: need at least one actor, got {size}")
        if slot_options is not None and len(slot_options) != size:
            raise ValueError(f"{name}: {len(slot_options)} slot options for {size} actors")
        self.factory, self.name, self.max_restarts, self.ready_method = factory, name, max_restarts, ready_method
        self._last_broadcast: tuple[str, tuple] | None = None
        options = list(slot_options) if slot_options is not None else [{}] * size
        self._slots = [_Slot(f"{name}-{n}.0", factory(**options[n]), options[n]) for n in range(size)]
        self._retiring: list[_Slot] = []
        self._events: list[SlotEvent] = []
        self._next_number = size
        self._turn = 0
        self.restarts = 0

    @property
    def actors(self) -> list:
        """Every actor that gets broadcasts: serving and joining."""
        return [s.actor for s in self._slots]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._slots]

    @property
    def serving(self) -> list[str]:
        """The actors given calls now."""
        return [s.name for s in self._slots if s.joining is None]

    @property
    def joining(self) -> list[str]:
        return [s.name for s in self._slots if s.joining is not None]

    @property
    def retiring(self) -> list[str]:
        return [s.name for s in self._retiring]

    def dispatch(self, method: str, *args, **kwargs) -> tuple[ray.ObjectRef, str]:
        """Submit ``method`` to the least-loaded serving actor: (its result ref, the actor's name)."""
        slot = self._pick()
        out = getattr(slot.actor, method).remote(*args, **kwargs)
        slot.unfinished.append(out)
        return out, slot.name

    def broadcast(self, method: str, *args) -> list[tuple[ray.ObjectRef, str]]:
        """Call ``method`` on every actor: (ref, actor name) of each serving one; joining ones get it
        too (they join once it has returned); replayed on replacements and added actors."""
        self._last_broadcast = (method, args)
        acks = []
        for slot in self._slots:
            slot.ack = getattr(slot.actor, method).remote(*args)
            if slot.joining is None:
                acks.append((slot.ack, slot.name))
            else:
                slot.joining.append(slot.ack)
        return acks

    def owns(self, name: str) -> bool:
        return any(s.name == name for s in self._slots + self._retiring)

    def replace(self, name: str) -> bool:
        """Kill actor ``name`` and start a fresh one in its slot; False if it was already replaced
        (or retired). Past the restart budget the slot is dropped instead (RestartsExhausted when
        none is left)."""
        slot = next((s for s in self._slots if s.name == name), None)
        if slot is None:
            return False
        ray.kill(slot.actor, no_restart=True)
        if self.restarts >= self.max_restarts:
            self._slots.remove(slot)
            if not self.serving:
                raise RestartsExhausted(f"{self.name}: every actor failed; {self.max_restarts} restarts used "
                                        f"(raise cluster.max_actor_restarts or fix the cause in the actor's log)")
            return True
        self.restarts += 1
        number, incarnation = name.rsplit("-", 1)[1].split(".")
        slot.name, slot.unfinished = f"{self.name}-{number}.{int(incarnation) + 1}", []
        slot.actor = self.factory(**slot.options)
        if self._last_broadcast is not None:  # queued before any call can reach the new actor
            method, args = self._last_broadcast
            slot.ack = getattr(slot.actor, method).remote(*args)
            if slot.joining is not None:
                slot.joining = [slot.ack]
        return True

    def add(self, options: dict | None = None) -> str:
        """Start an actor in a new slot; it joins once its latest broadcast and ``ready_method`` returned."""
        options = options or {}
        slot = _Slot(f"{self.name}-{self._next_number}.0", self.factory(**options), options, joining=[])
        self._next_number += 1
        if self.ready_method is not None:
            slot.joining.append(getattr(slot.actor, self.ready_method).remote())
        if self._last_broadcast is not None:
            method, args = self._last_broadcast
            slot.ack = getattr(slot.actor, method).remote(*args)
            slot.joining.append(slot.ack)
        self._slots.append(slot)
        return slot.name

    def retire(self, name: str) -> None:
        """Give ``name`` no more calls or broadcasts; it is killed once what it holds is done (a joining
        one holds nothing: at once)."""
        slot = next((s for s in self._slots if s.name == name), None)
        if slot is None:
            raise KeyError(f"{self.name}: no actor {name!r} to retire (have {self.names})")
        if slot.joining is None and len(self.serving) == 1:
            raise ValueError(f"{self.name}: {name} is the last serving actor; the pool cannot retire it")
        self._slots.remove(slot)
        if slot.joining is not None:
            ray.kill(slot.actor, no_restart=True)
            self._events.append(SlotEvent(REMOVED, slot.name, slot.options, "retired before it joined"))
        else:
            self._retiring.append(slot)

    def unfinished(self, name: str) -> int:
        """Calls of actor ``name`` not finished yet."""
        slot = next(s for s in self._slots + self._retiring if s.name == name)
        return len(ray.wait(slot.unfinished, num_returns=len(slot.unfinished), timeout=0,
                            fetch_local=False)[1]) if slot.unfinished else 0

    def settle(self) -> list[SlotEvent]:
        """What changed since the last call: joining actors admitted once started, those whose start
        failed dropped, retired ones killed once they hold nothing (never blocks)."""
        self._advance()
        events, self._events = self._events, []
        return events

    def _advance(self) -> None:
        for slot in [s for s in self._slots if s.joining is not None]:
            done, pending = ray.wait(slot.joining, num_returns=len(slot.joining), timeout=0, fetch_local=False)
            failure = _failure(done)
            if failure is not None:
                ray.kill(slot.actor, no_restart=True)
                self._slots.remove(slot)
                self._events.append(SlotEvent(JOIN_FAILED, slot.name, slot.options, failure))
            elif not pending:
                slot.joining = None
                self._events.append(SlotEvent(JOINED, slot.name, slot.options))
        for slot in list(self._retiring):
            held = slot.unfinished + ([slot.ack] if slot.ack is not None else [])
            if not held or not ray.wait(held, num_returns=len(held), timeout=0, fetch_local=False)[1]:
                ray.kill(slot.actor, no_restart=True)
                self._retiring.remove(slot)
                self._events.append(SlotEvent(REMOVED, slot.name, slot.options))

    def in_flight(self) -> int:
        """Calls submitted and not yet finished, over all actors (read-only: safe beside ``dispatch``)."""
        return sum(len(ray.wait(s.unfinished, num_returns=len(s.unfinished), timeout=0, fetch_local=False)[1])
                   for s in self._slots + self._retiring if s.unfinished)

    def kill(self, name: str) -> None:
        """Kill actor ``name`` (a stalled one): its calls fail and the failures replace it."""
        for slot in self._slots + self._retiring:
            if slot.name == name:
                ray.kill(slot.actor, no_restart=True)

    def _pick(self) -> _Slot:
        self._advance()
        serving = [s for s in self._slots if s.joining is None]
        for slot in serving:
            if slot.unfinished:
                _, slot.unfinished = ray.wait(slot.unfinished, num_returns=len(slot.unfinished), timeout=0,
                                              fetch_local=False)
        n = len(serving)
        if not n:
            raise RuntimeError(f"the {self.name} was shut down")
        chosen = min(range(n), key=lambda i: (len(serving[i].unfinished), (i - self._turn) % n))
        self._turn = (chosen + 1) % n
        return serving[chosen]

    def shutdown(self) -> None:
        """Kill the actors (their queued calls fail); unusable after."""
        for slot in self._slots + self._retiring:
            ray.kill(slot.actor)
        self._slots, self._retiring = [], []


def _failure(done: list[ray.ObjectRef]) -> str | None:
    """Why the first failed ref among finished ``done`` failed (None: all succeeded). The refs are
    small (a ping, a weights ack), so fetching them is cheap."""
    for ref in done:
        try:
            ray.get(ref, timeout=0)
        except RayError as exc:
            return error_summary(exc)
    return None


def error_summary(exc: BaseException) -> str:
    """The class and the last non-empty line: a Ray task error's text is the remote traceback,
    which ends with the exception raised in the actor."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


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


class ElasticPool(SupervisedPool):
    """A pool whose size changes while it serves (what ``pipelines.grpo.elastic`` drives): actors are
    engines here, added with their placement and retired once their calls are done."""

    @property
    def engines(self) -> int:
        """Engines given batches now (not those still starting or retiring)."""
        return len(self._dispatch.serving)

    @property
    def starting(self) -> list[str]:
        """Engines added and not serving yet."""
        return self._dispatch.joining

    def add_engine(self, options: dict | None = None) -> str:
        """Start one more engine (``options``: its placement); it serves once started with the latest weights."""
        return self._dispatch.add(options)

    def retire_engine(self, name: str | None = None) -> str:
        """Stop engine ``name``; by default a starting one, else the least busy serving one (the newest on ties)."""
        if name is None and self._dispatch.joining:
            name = self._dispatch.joining[-1]
        elif name is None:
            name = min(reversed(self._dispatch.serving), key=self._dispatch.unfinished)
        self._dispatch.retire(name)
        return name

    def settle(self) -> list[SlotEvent]:
        """Engines that joined, failed to start, or were removed since the last call."""
        return self._dispatch.settle()
