"""segrl's asynchronous scheduler: rollout, reference, rewards and the learner all busy at once.

The driver runs one event loop over ObjectRefs. Each stage call returns a ``Handoff``: the
ref of its bulk output, which only ever travels from actor to actor, and the ref of a small
metadata dict, the only thing the driver fetches. As soon as a call completes, the next
stage is submitted with the previous stage's data ref; prompts are admitted whenever the
``StalenessController`` has room; the learner gets a batch whenever it is free and the
controller can pick one; after each step the exported weights ref goes to the rollout pool
and the reference actors, and once every copy has landed the controller's rollout version moves up.

Work moves in *chunks* of ``groups_per_call`` groups (one rollout call samples all their
responses at once, which is what keeps vLLM's batches full); a chunk shares one weights
version, so it is generated, referenced, rewarded, trained or dropped as a whole.

Nothing is lost. Every group's life goes into the ``Ledger``. A stage call that fails
sends its chunk's samples back to the data queue (``Stages.requeue``) up to
``max_retries`` times, then drops them with the reason; a failed actor is replaced
(``Stages.recover``), and the replacement loads the current weights before serving. The
``Watchdog`` kills an actor that makes no progress for ``stall_timeout_s``, which turns a
hang into such a failure. A failed learner step raises ``LearnerFailure``: the run
resumes from its last checkpoint (``pipelines.train``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from actors.dispatch import error_summary
from pipelines.grpo.admission import StalenessController
from pipelines.grpo.handoff import (
    LEARN,
    REFERENCE,
    REWARD,
    ROLLOUT,
    SYNC,
    Handoff,
    LearnerFailure,
    RunReport,
    Stages,
    StepRecord,
)
from pipelines.grpo.ledger import Ledger
from pipelines.grpo.phase_timer import PhaseTimer
from pipelines.grpo.watchdog import Watchdog

META_TIMEOUT_S = 60.0  # metadata refs are fetched only once ready; this bounds a hang


@dataclass(eq=False)
class _Chunk:
    ids: list[int]
    admitted_at: float
    data: ray.ObjectRef | None = None  # the latest stage's output
    rewards: dict = field(default_factory=dict)  # the reward stage's metadata


@dataclass(eq=False)
class _Call:
    phase: str
    item: object  # a _Chunk; LEARN: (chunks, weights, started, wait_s); SYNC: the version
    worker: str | None
    watch: tuple[ray.ObjectRef, ...] = ()


class Scheduler:
    """Drives ``stages`` under ``controller``; ``run`` trains a number of steps.

    ``straggler_timeout_s``: a chunk in flight for longer may be left behind by the learner
    (it is then dropped if it turns up too old); None waits for every group.
    ``on_step`` is called with each StepRecord as it completes (metrics, checkpoints).
    ``ledger``: continue a resumed run's ledger (group ids continue after its last one).
    """

    def __init__(
        self,
        stages: Stages,
        controller: StalenessController,
        *,
        groups_per_call: int = 1,
        straggler_timeout_s: float | None = None,
        poll_s: float = 0.05,
        on_step: Callable[[StepRecord], None] | None = None,
        ledger: Ledger | None = None,
        max_retries: int = 2,
        stall_timeout_s: float | None = None,
    ):
        if groups_per_call < 1 or controller.batch_size % groups_per_call:
            raise ValueError(f"groups_per_call ({groups_per_call}) must divide the batch "
                             f"size ({controller.batch_size})")
        self.stages, self.controller = stages, controller
        self.groups_per_call = groups_per_call
        self.straggler_timeout_s, self.poll_s, self.on_step = straggler_timeout_s, poll_s, on_step
        self.timer = PhaseTimer()
        self.ledger = ledger or Ledger()
        self.max_retries = max_retries
        self.watchdog = Watchdog(stall_timeout_s)
        self.faults: Counter[str] = Counter()
        self._interrupted = 0  # weight loads that interrupted a running rollout call, since the last step
        controller.on_drop = self._controller_dropped
        self._waiting: dict[ray.ObjectRef, _Call] = {}  # meta/ack ref -> its call
        self._chunk_of: dict[int, _Chunk] = {}  # group id -> its live chunk
        self._ready: list[_Chunk] = []  # rewarded, awaiting the learner (holds their refs)
        self._syncing: dict[int, set[ray.ObjectRef]] = {}  # version -> acks still due
        self._learning = False
        self._idle_since = time.perf_counter()

    def run(self, num_steps: int) -> RunReport:
        """Train ``num_steps`` steps; returns once the last weights reached the pool."""
        start = time.perf_counter()
        if not self._learning:
            self._idle_since = start
        ctl, steps = self.controller, []
        last, trained_before = ctl.learner_version + num_steps, ctl.trained
        goal = num_steps * ctl.batch_size
        while ctl.learner_version < last:
            self._admit(goal - (ctl.pending + ctl.trained - trained_before))
            self._start_step(last)
            steps += self._poll()
        while self._syncing:
            self._poll()
        return RunReport(steps, ctl.stats(), self.timer.report(), time.perf_counter() - start)

    # --- submitting ------------------------------------------------------------------
    def _admit(self, room: int) -> None:
        size = self.groups_per_call
        while room >= size and self.controller.can_admit(size):
            chunk = _Chunk(self.controller.admit(size), time.perf_counter())
            self._chunk_of.update(dict.fromkeys(chunk.ids, chunk))
            handoff = self.stages.rollout(chunk.ids)
            for group_id, sample in zip(chunk.ids, handoff.samples or [f"g{i}" for i in chunk.ids], strict=True):
                self.ledger.admitted(group_id, sample)
            self._submit(ROLLOUT, chunk, handoff)
            room -= size

    def _start_step(self, last: int) -> None:
        ctl = self.controller
        if self._learning or ctl.learner_version >= last:
            return
        ids = ctl.next_batch(ctl.learner_version, stragglers=self._stragglers())
        self._ready = [chunk for chunk in self._ready if self._alive(chunk)]  # stale drops
        if not ids:
            return
        chunks = list(dict.fromkeys(self._chunk_of[group_id] for group_id in ids))
        if sum(len(chunk.ids) for chunk in chunks) != len(ids):
            raise RuntimeError(f"the batch {ids} splits a chunk")
        self._ready = [chunk for chunk in self._ready if chunk not in chunks]
        now = time.perf_counter()
        handoff = self.stages.learn(ctl.learner_version, [chunk.data for chunk in chunks])
        self._learning = True
        call = _Call(LEARN, (chunks, handoff.data, now, now - self._idle_since), handoff.worker, handoff.watch)
        self._wait(handoff.meta, call)
        self._waiting.update(dict.fromkeys(handoff.watch, call))

    def _submit(self, phase: str, chunk: _Chunk, handoff: Handoff) -> None:
        chunk.data = handoff.data
        self._wait(handoff.meta, _Call(phase, chunk, handoff.worker))

    def _wait(self, ref: ray.ObjectRef, call: _Call) -> None:
        self._waiting[ref] = call
        self.watchdog.started(call.worker, time.perf_counter())
        self.timer.begin(call.phase)

    def _stragglers(self) -> set[int]:
        if self.straggler_timeout_s is None:
            return set()
        oldest = time.perf_counter() - self.straggler_timeout_s
        return {group_id for call in self._waiting.values()
                if call.phase in (ROLLOUT, REFERENCE, REWARD) and call.item.admitted_at < oldest
                for group_id in call.item.ids}

    # --- completing ------------------------------------------------------------------
    def _poll(self) -> list[StepRecord]:
        """Wait up to ``poll_s`` for any call; handle every completed one; new StepRecords."""
        refs = list(self._waiting)
        if not refs:
            raise RuntimeError(f"stalled: nothing in flight, nothing admissible, no batch "
                               f"to train; {self.controller.stats()}")
        done, _ = ray.wait(refs, num_returns=1, timeout=self.poll_s, fetch_local=False)
        if done:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        records = [record for ref in done if (record := self._finish(ref)) is not None]
        self._watch()
        self.timer.set("ready_groups", self.controller.ready)
        self.timer.set("in_flight_groups", self.controller.in_flight)
        return records

    def _finish(self, ref: ray.ObjectRef) -> StepRecord | None:
        call = self._waiting.pop(ref)
        phase, item = call.phase, call.item
        if ref in call.watch:
            self._watched(ref, call)
            return None
        self.watchdog.finished(call.worker, time.perf_counter())
        if phase == SYNC:
            self._synced(ref, call)
            return None
        try:
            meta = self._small(ref)
        except RayError as exc:
            self.timer.end(phase)
            if phase == LEARN:
                raise LearnerFailure(f"learner step {self.controller.learner_version} failed: "
                                     f"{error_summary(exc)}") from exc
            self._failed(call, exc)
            return None
        self.timer.end(phase)
        if phase == LEARN:
            return self._learned(item, meta)
        if phase == ROLLOUT:
            self._rolled_out(item, int(meta["weights_version"]))
        elif phase == REFERENCE and self._alive(item):
            for group_id in item.ids:
                self.ledger.referenced(group_id)
            self._submit(REWARD, item, self.stages.reward(item.data))
        elif phase == REWARD and self._alive(item):
            item.rewards = meta
            for group_id in item.ids:
                self.ledger.rewarded(group_id)
            if all([self.controller.on_ready(group_id) for group_id in item.ids]):
                self._ready.append(item)
            else:
                self._forget(item)
        return None

    def _watched(self, ref: ray.ObjectRef, call: _Call) -> None:
        """A secondary ref of a learner step: a failure there fails the step (its peers may hang)."""
        try:
            self._small(ref)
        except RayError as exc:
            self.timer.end(call.phase)
            raise LearnerFailure(f"learner step {self.controller.learner_version} failed on another rank: "
                                 f"{error_summary(exc)}") from exc

    def _failed(self, call: _Call, exc: RayError) -> None:
        """Requeue the chunk's samples (or drop those out of retries); replace a dead actor."""
        died = isinstance(exc, RayActorError)
        reason = f"{call.phase}: " + (f"actor {call.worker} died" if died else _cause(exc))
        if died and call.worker is not None:
            self.faults["actor_failures"] += 1
            self.faults["restarts"] += self.stages.recover(call.worker)
        chunk, again = call.item, []
        for group_id in chunk.ids:
            if self.controller.drop_reason(group_id) is not None:
                continue  # dropped as stale while in flight
            sample = self.ledger.sample(group_id)
            if self.ledger.attempts(sample) <= self.max_retries:
                self.ledger.requeued(group_id, reason)
                again.append(sample)
            else:
                self.ledger.dropped(group_id, f"{reason} ({self.ledger.attempts(sample)} attempts)")
            self.controller.on_failed(group_id, reason)
        self.faults["retries"] += len(again)
        if again:
            self.stages.requeue(again)
        self._forget(chunk)

    def _controller_dropped(self, group_id: int, reason: str) -> None:
        """The controller's drops (staleness) go into the ledger; failures are recorded before."""
        if self.ledger.is_open(group_id):
            self.ledger.dropped(group_id, reason)

    def _watch(self) -> None:
        """Kill every stalled actor, saying what it was doing; the failures then replace it."""
        for worker, idle_s in self.watchdog.stalled(time.perf_counter()):
            doing = sorted({f"{c.phase} of groups {c.item.ids}" if isinstance(c.item, _Chunk) else c.phase
                            for c in self._waiting.values() if c.worker == worker})
            print(f"[segrl] watchdog: {worker} made no progress for {idle_s:.0f} s while running "
                  f"{'; '.join(doing)}: replacing it", flush=True)
            self.faults["stalls"] += 1
            self.stages.kill(worker)

    def _rolled_out(self, chunk: _Chunk, version: int) -> None:
        for group_id in chunk.ids:
            self.ledger.generated(group_id, version)
        if all([self.controller.on_generated(group_id, version) for group_id in chunk.ids]):
            self._submit(REFERENCE, chunk, self.stages.reference(chunk.data))
        else:
            self._forget(chunk)  # too old already: the controller dropped it

    def _learned(self, item, metrics: dict) -> StepRecord:
        chunks, weights, started, wait_s = item
        ctl = self.controller
        step = ctl.learner_version
        record = StepRecord(
            step=step, metrics=metrics, staleness=ctl.on_trained(step),
            rewards=[chunk.rewards for chunk in chunks],
            groups=sum(len(chunk.ids) for chunk in chunks),
            wait_s=wait_s, learn_s=time.perf_counter() - started, faults=dict(self.faults),
            interrupted_updates=self._interrupted,
        )
        self._interrupted = 0
        for chunk in chunks:
            for group_id in chunk.ids:
                self.ledger.trained(group_id, step)
            self._forget(chunk)
        self._learning, self._idle_since = False, time.perf_counter()
        acks = self.stages.sync(weights, step + 1)
        if not acks:
            raise ValueError("Stages.sync must return at least one ack ref")
        acks = [ack if isinstance(ack, tuple) else (ack, None) for ack in acks]
        self._syncing[step + 1] = {ref for ref, _ in acks}
        for ref, worker in acks:
            self._wait(ref, _Call(SYNC, step + 1, worker))
        if self.on_step is not None:
            self.on_step(record)
        return record

    def _synced(self, ref: ray.ObjectRef, call: _Call) -> None:
        version = call.item
        try:
            self._interrupted += bool(self._small(ref).get("interrupted"))
        except RayActorError:  # its replacement loads the latest weights before serving
            if call.worker is None:
                raise
            self.faults["actor_failures"] += 1
            self.faults["restarts"] += self.stages.recover(call.worker)
        due = self._syncing[version]
        due.discard(ref)
        if not due:
            del self._syncing[version]
            self.timer.end(SYNC)
            self.controller.on_synced(version)

    # --- helpers ---------------------------------------------------------------------
    @staticmethod
    def _small(ref: ray.ObjectRef) -> dict:
        """Fetch a metadata ref: the driver's only ``ray.get``, and only ever for a dict."""
        meta = ray.get(ref, timeout=META_TIMEOUT_S)
        if not isinstance(meta, dict):
            raise TypeError(f"stage metadata must be a dict, got {type(meta).__name__}")
        return meta

    def _alive(self, chunk: _Chunk) -> bool:
        """False, and the chunk forgotten, if the controller dropped it."""
        alive = self.controller.drop_reason(chunk.ids[0]) is None
        if not alive:
            self._forget(chunk)
        return alive

    def _forget(self, chunk: _Chunk) -> None:
        for group_id in chunk.ids:
            self._chunk_of.pop(group_id, None)


def _cause(exc: RayError) -> str:
    """The exception class raised inside the actor (a task error wraps it)."""
    return type(exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc).__name__
