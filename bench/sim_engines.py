"""N vLLM-like engines in simulated real time: plain numpy, driven by ``EngineBank.advance``.

Each engine decodes at most ``max_seqs`` sequences at once (continuous batching; a decode
step takes ``step_base_s + step_per_seq_s * n`` for n running), so the pool's size bounds
its throughput and short responses free their slots for queued ones. A weight update
either drains the engine (no new sequences start until the running ones finish, then the
weights load) or, with ``interruptible=True`` (AReaL-style), pauses it to load the weights
and recompute the KV cache of the running sequences, which then go on with the new weights.

The engine count can change mid-run. The arrays hold ``capacity`` engines, each off,
starting (an added engine serves from ``ready_at``: its node's arrival plus its weight load,
and joins with the newest weights), serving, or retiring (it gets no new chunk and goes off
once the sequences it holds are done). ``engine_s`` integrates the engines paid for
(starting, serving or retiring) over time: the pool's engine-seconds.

With ``serial=True`` an engine runs one chunk at a time, as segrl's rollout actor does (its
engine serialises calls): the next chunk starts once the last sequence of the one before
has finished, so a call's slowest response holds its engine.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from bench.sim_profile import Profile

DONE_TOKENS = 1e-6  # a sequence with less left to generate is finished (float residue)
OFF, STARTING, SERVING, RETIRING = range(4)
JOINED, REMOVED = "joined", "removed"


@dataclass
class _ChunkRecord:
    remaining: int  # sequences not finished
    tokens: np.ndarray  # prompt + response tokens per group
    first: int = 1 << 62  # oldest version that decoded any of its tokens
    last: int = -1  # newest


class EngineBank:
    """Continuous-batching engines; ``engines`` serve from the start, up to ``capacity`` in all.

    Sequences are (engine, slot) cells; each holds the tokens it still has to generate. A
    chunk goes whole to the serving engine with the fewest running plus queued sequences.
    """

    def __init__(self, profile: Profile, engines: int, interruptible: bool, capacity: int | None = None,
                 serial: bool = False):
        n, s = max(engines, capacity or 0), profile.max_seqs
        self.p, self.interruptible, self.serial = profile, interruptible, serial
        self.left = np.zeros((n, s))  # tokens still to generate
        self.made = np.zeros((n, s))  # tokens generated so far (KV to recompute on an interrupt)
        self.carry = np.zeros((n, s))  # decode steps a slot ran past its sequence's end this tick
        self.busy = np.zeros((n, s), bool)
        self.chunk = np.zeros((n, s), np.int64)
        self.first = np.zeros((n, s), np.int64)  # version that generated the sequence's first token
        self.version = np.zeros(n, np.int64)
        self.target = np.zeros(n, np.int64)  # version to load once drained (drain mode)
        self.resume_at = np.zeros(n)  # no decoding before: loading weights, recomputing KV
        self.queue: list[deque] = [deque() for _ in range(n)]  # [chunk id, lengths, next index]
        self.queued = np.zeros(n, np.int64)
        self.state = np.full(n, OFF)
        self.state[:engines] = SERVING
        self.ready_at = np.full(n, np.inf)  # a starting engine serves from then
        self.latest = 0  # the newest weights version sent
        self.changes: list[tuple[str, int]] = []  # (JOINED or REMOVED, engine) not taken yet
        self.chunks: dict[int, _ChunkRecord] = {}
        self.now = 0.0
        self.slot_s = 0.0  # integral of running sequences over time: the pool's occupancy
        self.engine_s = 0.0  # integral of the engines paid for over time
        self.finished = 0  # responses generated
        self.paused_s = 0.0  # engine-seconds spent loading weights and recomputing KV

    @property
    def live(self) -> np.ndarray:
        """The engines that hold weights: serving or retiring."""
        return (self.state == SERVING) | (self.state == RETIRING)

    def count(self, *states: int) -> int:
        return int(np.isin(self.state, states).sum())

    @property
    def idle(self) -> bool:
        return not (self.busy.any() or self.queued.any() or (self.target > self.version)[self.live].any())

    def submit(self, chunk_id: int, lengths: np.ndarray, group_tokens: np.ndarray) -> None:
        """Queue a chunk's sequences (``advance`` to now first)."""
        load = np.where(self.state == SERVING, self.busy.sum(1) + self.queued, np.iinfo(np.int64).max)
        engine = int(np.argmin(load))
        if self.state[engine] != SERVING:
            raise RuntimeError("no engine is serving")
        self.chunks[chunk_id] = _ChunkRecord(len(lengths), group_tokens)
        self.queue[engine].append([chunk_id, lengths, 0])
        self.queued[engine] += len(lengths)
        self._refill()

    def add(self, delay_s: float) -> int:
        """Start an engine now that serves ``delay_s`` later (``advance`` to now first); its index.

        An index is reused only once its removal has been taken (``take_changes``), so that a
        caller's names for engines stay unambiguous."""
        reported = [engine for _, engine in self.changes]
        free = np.setdiff1d(np.flatnonzero(self.state == OFF), reported)
        if not len(free):
            raise RuntimeError(f"all {len(self.state)} engines are in use")
        engine = int(free[0])
        self.state[engine], self.ready_at[engine] = STARTING, self.now + delay_s
        return engine

    def retire(self, engine: int | None = None) -> int:
        """Stop ``engine`` (default: the least loaded serving one, the newest on ties); a starting one goes at once."""
        if engine is None:
            load = np.where(self.state == SERVING, self.busy.sum(1) + self.queued, np.iinfo(np.int64).max)
            engine = len(load) - 1 - int(np.argmin(load[::-1]))
        if self.state[engine] == STARTING:
            self.state[engine], self.ready_at[engine] = OFF, np.inf
            self.changes.append((REMOVED, engine))
        elif self.state[engine] == SERVING:
            self.state[engine] = RETIRING
            self._remove_drained()
        else:
            raise ValueError(f"engine {engine} is neither starting nor serving")
        return engine

    def take_changes(self) -> list[tuple[str, int]]:
        """The engines that joined or were removed since the last call."""
        changes, self.changes = self.changes, []
        return changes

    def update(self, version: int) -> None:
        """New weights arrive now: interrupt every live engine, or drain each before it loads."""
        self.latest = version
        live = self.live
        if not self.interruptible:
            self.target[live] = version
            self._start_drained_loads()
            return
        prompts = self.busy.sum(1) * self.p.prompt_tokens / self.p.group_size  # prefix-cached per group
        kv = self.made.sum(1) + prompts
        pause = np.where(live, self.p.engine_load_s + kv / self.p.prefill_tok_s, 0.0)
        self.resume_at[live] = np.maximum(self.resume_at, self.now)[live] + pause[live]
        self.paused_s += float(pause.sum())
        self.version[live] = self.target[live] = version

    def loaded(self, version: int) -> bool:
        """Every live engine decodes with ``version`` (or newer) by now."""
        live = self.live
        return bool((self.version[live] >= version).all() and (self.resume_at[live] <= self.now).all())

    def advance(self, now: float) -> list[tuple[int, _ChunkRecord]]:
        """Decode up to ``now``; the chunks whose last sequence finished, with their records."""
        dt = now - self.now
        if dt <= 0:
            return []
        self.engine_s += self.count(STARTING, SERVING, RETIRING) * dt
        joining = (self.state == STARTING) & (self.ready_at <= now)
        for engine in np.flatnonzero(joining).tolist():
            self.state[engine] = SERVING
            self.version[engine] = self.target[engine] = self.latest
            self.resume_at[engine], self.ready_at[engine] = self.ready_at[engine], np.inf
            self.changes.append((JOINED, engine))
        active_s = np.clip(now - np.maximum(self.resume_at, self.now), 0.0, dt)
        running = self.busy.sum(1)
        steps = active_s / (self.p.step_base_s + self.p.step_per_seq_s * running)
        self.left -= steps[:, None] * self.busy
        self.made += steps[:, None] * self.busy
        self.slot_s += float((running * active_s).sum())
        self.now = now
        done = []
        engines, slots = np.nonzero(self.busy & (self.left < DONE_TOKENS))
        if len(engines):
            self.busy[engines, slots] = False
            self.finished += len(engines)
            self.carry[engines, slots] = -self.left[engines, slots]
            for chunk_id, first, last in zip(self.chunk[engines, slots].tolist(),
                                             self.first[engines, slots].tolist(),
                                             self.version[engines].tolist()):
                record = self.chunks[chunk_id]
                record.remaining -= 1
                record.first, record.last = min(record.first, first), max(record.last, last)
                if not record.remaining:
                    done.append((chunk_id, self.chunks.pop(chunk_id)))
        self._start_drained_loads()
        self._refill()
        self._remove_drained()
        return done

    def _remove_drained(self) -> None:
        drained = (self.state == RETIRING) & ~self.busy.any(1) & (self.queued == 0)
        for engine in np.flatnonzero(drained).tolist():
            self.state[engine] = OFF
            self.changes.append((REMOVED, engine))

    def _start_drained_loads(self) -> None:
        ready = (self.target > self.version) & ~self.busy.any(1)
        self.version[ready] = self.target[ready]
        self.resume_at[ready] = self.now + self.p.engine_load_s
        self.paused_s += self.p.engine_load_s * int(ready.sum())

    def _refill(self) -> None:
        """Start queued sequences in free slots; a freed slot's overshoot counts for its successor."""
        for engine in np.flatnonzero((self.queued > 0) & (self.target <= self.version)):
            if self.serial and self.busy[engine].any():
                continue
            free = np.flatnonzero(~self.busy[engine])
            queue = self.queue[engine]
            while len(free) and queue:
                entry = queue[0]
                chunk_id, lengths, start = entry
                take = min(len(free), len(lengths) - start)
                slots, free = free[:take], free[take:]
                self.left[engine, slots] = lengths[start:start + take] - self.carry[engine, slots]
                self.made[engine, slots] = self.carry[engine, slots]
                self.busy[engine, slots] = True
                self.chunk[engine, slots] = chunk_id
                self.first[engine, slots] = self.version[engine]
                self.queued[engine] -= take
                entry[2] += take
                if entry[2] == len(lengths):
                    queue.popleft()
        self.carry[:] = 0.0
