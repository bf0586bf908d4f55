"""Admission under a staleness bound: which prompts may start, which groups may train.

Ray-free bookkeeping of group ids and weights versions, so the rule is testable alone.

Versions. The learner has finished ``s`` optimiser steps (learner version s); the next
step to run is step s and produces version s + 1. The rollout pool holds version
v_r <= s (it lags until the sync after a step lands). A group generated with version v
may train in step s only if s - v <= eta; its *deadline* is the last such step, v + eta.

Admission rule. A group admitted now is generated with v >= v_r, so its deadline is at
least d = v_r + eta. Steps s .. d take B groups each, (d - s + 1)·B in all, and every
pending group (admitted, not yet trained or dropped) has a deadline <= d, because no
version exceeds v_r. So n more groups are admitted only if

    pending + n <= (v_r + eta + 1 - s) · B        (i.e. admitted - dropped <= (v_r + eta + 1)·B)

and, for backpressure, in_flight + n <= max_in_flight. Once synced (v_r = s) this is the
(eta + 1)·B groups ahead of the learner; eta = 0 admits exactly one step's B groups, and
only after the previous step's weights reached the pool, so generation and training
alternate. Using v_r rather than the learner version (AReaL's formula uses the latter) is
what keeps the bound exact while a sync is still on its way.

Selection rule. ``next_batch`` takes the B ready groups with the earliest deadlines
(oldest version first), but only if every group left behind can still meet its deadline
when each later step takes B groups in deadline order: the j-th earliest remaining
deadline (j = 0, 1, ...) must be >= s + 1 + j // B. If that fails while a group still in
flight belongs among the B earliest, it returns [] and the learner waits for it; if the B
earliest are all ready, it trains them regardless, since waiting could not help.
Admission keeps the pending set schedulable in that sense, so without stragglers given up
by the caller and with every reported version >= its admission floor, no group is ever
dropped. A group found too old for the next step it could join is dropped with reason
``STALE``, counted, and never trained.

Modes. The above is ``strict`` (the default): the bound holds for the oldest token of
every trained group. ``admission`` is AReaL's semantics: the same admission rule, but the
learner trains the B oldest ready groups as soon as there are B, never waits for one in
flight and never drops one; a group that took long to generate may then train more than
eta steps after the version it began with (interruptible rollouts keep moving its later
tokens to newer weights). The staleness histogram still records s - v of every group.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Collection

STALE = "stale"
STRICT, ADMISSION = "strict", "admission"
MODES = (STRICT, ADMISSION)


class AdmissionError(RuntimeError):
    """``admit`` was asked for more groups than the bound or the backpressure allows."""


@dataclass
class _Group:
    floor: int  # rollout version at admission: its version will be at least this
    version: int | None = None  # the weights version that generated it, once known
    ready: bool = False  # rewarded and waiting for the learner

    def deadline(self, eta: int) -> int:
        """The last step that may train it (from its floor while the version is unknown)."""
        return (self.floor if self.version is None else self.version) + eta


class StalenessController:
    """Decides admission and batch selection for GRPO groups under the bound s - v <= eta.

    Group ids are minted by ``admit`` in admission order. A group's life: admitted (in
    flight) -> ``on_generated`` (version known) -> ``on_ready`` -> chosen by
    ``next_batch`` -> ``on_trained``; or dropped at any point before training, with a reason.
    """

    def __init__(self, eta: int, batch_size: int, max_in_flight: int | None = None, mode: str = STRICT):
        if eta < 0 or batch_size < 1:
            raise ValueError(f"need eta >= 0 and batch_size >= 1, got {eta}, {batch_size}")
        if mode not in MODES:
            raise ValueError(f"unknown staleness mode {mode!r}; one of {MODES}")
        self.mode = mode
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.eta = eta
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.learner_version = 0
        self.rollout_version = 0
        self.trained = 0
        self.staleness: Counter[int] = Counter()  # s - v of every trained group
        self._pending: dict[int, _Group] = {}  # admitted, not trained or dropped
        self._training: list[int] = []  # the batch of the step now running
        self._dropped: dict[int, str] = {}
        self._next_id = 0
        self.on_drop: Callable[[int, str], None] | None = None  # told of every drop (the ledger)

    def resume_at(self, version: int, next_id: int, staleness: dict[int, int], trained: int) -> None:
        """Continue a run from a checkpoint after ``version`` steps: nothing pending, all synced."""
        if self._pending or self._next_id or self.learner_version:
            raise RuntimeError("resume_at needs a fresh controller")
        self.learner_version = self.rollout_version = version
        self._next_id, self.trained = next_id, trained
        self.staleness.update(staleness)

    # --- admission -------------------------------------------------------------------
    def capacity(self) -> int:
        """How many more groups may be admitted now (the rule in the module docstring)."""
        window = (self.rollout_version + self.eta + 1 - self.learner_version) * self.batch_size
        room = window - len(self._pending)
        if self.max_in_flight is not None:
            room = min(room, self.max_in_flight - self.in_flight)
        return max(room, 0)

    def can_admit(self, n: int = 1) -> bool:
        return n <= self.capacity()

    def admit(self, n: int = 1) -> list[int]:
        """Admit n groups; their new ids. AdmissionError when over capacity."""
        if n < 1 or not self.can_admit(n):
            raise AdmissionError(f"cannot admit {n} groups: capacity {self.capacity()}")
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for group_id in ids:
            self._pending[group_id] = _Group(floor=self.rollout_version)
        return ids

    # --- rollout progress ------------------------------------------------------------
    def on_generated(self, group_id: int, version: int) -> bool:
        """The group was sampled with ``version``; False if that already makes it too old."""
        if group_id in self._dropped:
            return False
        group = self._live(group_id)
        if group.version is not None:
            raise ValueError(f"group {group_id} was already generated")
        group.version = version
        return self._keep_if_fresh(group_id)

    def on_ready(self, group_id: int) -> bool:
        """The group's rewarded trajectory exists; False if it was dropped meanwhile."""
        if group_id in self._dropped:
            return False
        group = self._live(group_id)
        if group.version is None:
            raise ValueError(f"group {group_id} is ready before on_generated")
        group.ready = True
        return self._keep_if_fresh(group_id)

    def on_failed(self, group_id: int, reason: str) -> None:
        """A stage failed on the group: drop it with ``reason`` (idempotent)."""
        if group_id not in self._dropped:
            self._live(group_id)
            self._drop(group_id, reason)

    # --- learner ---------------------------------------------------------------------
    def next_batch(self, step: int, *, stragglers: Collection[int] = ()) -> list[int]:
        """The ids to train in ``step``, oldest first, or [] if the learner must wait.

        ``stragglers`` are in-flight groups the caller stops waiting for: they may be left
        behind past their deadline (and are then dropped when they turn up too old).
        """
        if step != self.learner_version:
            raise ValueError(f"next step is {self.learner_version}, asked for {step}")
        if self._training:
            raise RuntimeError(f"step {step} already has its batch")
        strict = self.mode == STRICT
        for group_id, group in list(self._pending.items()):
            if strict and group.version is not None and step - group.version > self.eta:
                self._drop(group_id, STALE)
        batch = self.batch_size
        ready = sorted((g.deadline(self.eta), i) for i, g in self._pending.items() if g.ready)
        if len(ready) < batch:
            return []
        awaited = [  # in flight and still worth waiting for
            (d, i) for i, g in self._pending.items()
            if strict and not g.ready and i not in stragglers and (d := g.deadline(self.eta)) >= step
        ]
        if sorted(ready + awaited)[:batch] != ready[:batch]:  # an awaited group belongs here
            behind = sorted(d for d, _ in ready[batch:] + awaited)
            if any(d < step + 1 + j // batch for j, d in enumerate(behind)):
                return []
        self._training = [group_id for _, group_id in ready[:batch]]
        return list(self._training)

    def on_trained(self, step: int) -> dict[int, int]:
        """Step ``step`` finished with the batch ``next_batch`` gave; its staleness histogram."""
        if step != self.learner_version or not self._training:
            raise ValueError(f"step {step} was not started (next step {self.learner_version})")
        histogram = Counter(step - self._pending.pop(i).version for i in self._training)
        self.staleness.update(histogram)
        self.trained += len(self._training)
        self._training = []
        self.learner_version += 1
        return dict(sorted(histogram.items()))

    def on_synced(self, version: int) -> None:
        """The rollout pool now generates with ``version`` (never beyond the learner's)."""
        if version > self.learner_version:
            raise ValueError(f"version {version} is ahead of the learner ({self.learner_version})")
        self.rollout_version = max(self.rollout_version, version)

    # --- counters --------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return sum(not g.ready for g in self._pending.values())

    @property
    def ready(self) -> int:
        return sum(g.ready for g in self._pending.values()) - len(self._training)

    def drop_reason(self, group_id: int) -> str | None:
        return self._dropped.get(group_id)

    def stats(self) -> dict:
        """Counters for metrics: admitted, trained, dropped (by reason), queues, staleness."""
        reasons = Counter(self._dropped.values())
        return {
            "admitted": self._next_id,
            "trained": self.trained,
            "dropped": len(self._dropped),
            "dropped_stale": reasons[STALE],
            "drop_reasons": dict(reasons),
            "in_flight": self.in_flight,
            "ready": self.ready,
            "training": len(self._training),
            "staleness": dict(sorted(self.staleness.items())),
            "learner_version": self.learner_version,
            "rollout_version": self.rollout_version,
        }

    # --- internals -------------------------------------------------------------------
    def _live(self, group_id: int) -> _Group:
        if group_id in self._training:
            raise ValueError(f"group {group_id} is being trained")
        if group_id not in self._pending:
            raise KeyError(f"group {group_id} is not pending (never admitted, or trained)")
        return self._pending[group_id]

    def _keep_if_fresh(self, group_id: int) -> bool:
        """Drop the group if the next step it could join is already past its deadline."""
        next_open_step = self.learner_version + (1 if self._training else 0)
        if self.mode == STRICT and next_open_step > self._pending[group_id].deadline(self.eta):
            self._drop(group_id, STALE)
            return False
        return True

    def _drop(self, group_id: int, reason: str) -> None:
        del self._pending[group_id]
        self._dropped[group_id] = reason
        if self.on_drop is not None:
            self.on_drop(group_id, reason)
