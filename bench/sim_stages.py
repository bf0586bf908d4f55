"""Simulated ``Stages``: the real Scheduler and StalenessController over fake GPUs.

Why: the scheduler's value is measured on a GRPO step the size of a 7B model on tens of
GPUs, which this CPU machine cannot run. Here every stage is a zero-CPU async Ray actor
that sleeps the service time the real stage would take, shrunk by ``Profile.time_scale``;
refs, metadata and weight syncs travel exactly as with ``pipelines.grpo.stages.ActorStages``.

The rollout pool is N vLLM-like engines simulated by one actor (one ticker advances all of
them with numpy): each engine decodes at most ``max_seqs`` sequences at once (continuous
batching; a decode step takes ``step_base_s + step_per_seq_s * n`` for n running), so the
pool's size bounds its throughput and short responses free their slots for queued ones.
A weight update either drains the engine (no new sequences start until the running ones
finish, then the weights load) or, with ``interruptible=True`` (AReaL-style), pauses it to
load the weights and recompute the KV cache of the running sequences, which then go on with
the new weights. A chunk's metadata carries its version range: ``weights_version`` is the
oldest version that generated any of its tokens (what the staleness bound applies to) and
``last_version`` the newest.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import ray

from pipelines.grpo.admission import StalenessController
from pipelines.grpo.scheduler import Handoff, Scheduler

TICK_S = 0.01  # wall seconds between pool updates: completions are resolved to this grain
DONE_TOKENS = 1e-6  # a sequence with less left to generate is finished (float residue)
# payload columns, one row per group: what later stages need to cost and check their work
FIRST, LAST, TOKENS = range(3)


@dataclass(frozen=True)
class Profile:
    """One GRPO step of a 7B model on H100s, in real seconds and tokens, per rollout actor.

    The cluster scales with the pool: N rollout actors (one engine on one GPU each) come
    with ``learner_gpus_per_actor * N`` learner GPUs, ``reference_gpus_per_actor * N`` reference
    GPUs (at least one) and N reward CPU workers; the batch is ``groups_per_actor * N`` groups.
    """

    group_size: int = 8  # responses per prompt (GRPO group)
    groups_per_actor: int = 8  # 64 responses per engine per step: one per decode slot
    groups_per_call: int = 1  # groups per rollout call: a call finishes with its slowest response
    prompt_tokens: int = 800  # image tokens + question
    median_tokens: float = 3000.0  # response length ~ lognormal(median, sigma), clipped
    sigma: float = 0.9
    max_new_tokens: int = 20480
    max_seqs: int = 64  # vLLM max_num_seqs: KV cache for ~64 long-CoT sequences on one H100
    step_base_s: float = 0.012  # decode step latency, memory bound: ~80 tok/s for one sequence
    step_per_seq_s: float = 0.0002  # ... and 2.6k tok/s for 64
    prefill_tok_s: float = 30_000.0  # KV recompute after an interrupt (~40% MFU)
    engine_load_s: float = 1.0  # 15 GB of bf16 weights into an engine (bucketed NCCL)
    reference_gpus_per_actor: float = 0.25
    reference_tok_s: float = 25_000.0  # reference forward over prompt + response
    reference_mask_s: float = 0.01  # mask decoder per response
    reference_load_s: float = 0.2  # segmentation modules only: the reference LLM is frozen
    reward_s: float = 0.05  # Hungarian matching + mask IoU per response, one CPU
    learner_gpus_per_actor: float = 0.5
    learner_tok_s: float = 7_000.0  # per GPU: fwd + bwd + proximal logprobs at ~45% MFU
    learner_fixed_s: float = 4.5  # per step: optimizer, ZeRO-3 gathers, weight export
    time_scale: float = 1 / 200  # wall seconds per real second

    def batch_groups(self, actors: int) -> int:
        return self.groups_per_actor * actors

    def response_lengths(self, group_id: int, seed: int) -> np.ndarray:
        """The group's response lengths; a function of the group id, so runs compare alike."""
        rng = np.random.default_rng([seed, group_id])
        drawn = self.median_tokens * np.exp(self.sigma * rng.standard_normal(self.group_size))
        return np.clip(np.round(drawn), 1, self.max_new_tokens)

    def mean_response_tokens(self) -> float:
        """E[min(L, max_new_tokens)] for the lognormal, in closed form."""
        mu, s, cap = math.log(self.median_tokens), self.sigma, self.max_new_tokens
        z = (math.log(cap) - mu) / s
        phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
        return math.exp(mu + s * s / 2) * phi(z - s) + cap * (1 - phi(z))

    def services(self, actors: int) -> dict[str, Service]:
        """The reference, reward and learner stages of a cluster with ``actors`` rollout actors."""
        return {
            "reference": Service(max(1, round(self.reference_gpus_per_actor * actors)), 0.0, self.reference_mask_s,
                             1 / self.reference_tok_s, self.reference_load_s),
            "reward": Service(actors, 0.0, self.reward_s),
            "learn": Service(1, self.learner_fixed_s, 0.0,
                             1 / (self.learner_tok_s * self.learner_gpus_per_actor * actors)),
        }

    def stage_rates(self, actors: int) -> dict[str, float]:
        """Responses per real second each stage sustains alone and always busy.

        The pool runs every slot with the mean response and loads weights once a step; the
        learner trains one batch per call; reference and reward actors take one chunk per call.
        """
        batch = self.batch_groups(actors) * self.group_size
        mean = self.mean_response_tokens()
        decode_tok_s = actors * self.max_seqs / (self.step_base_s + self.step_per_seq_s * self.max_seqs)
        rates = {"rollout": batch / (batch * mean / decode_tok_s + self.engine_load_s)}
        for name, service in self.services(actors).items():
            responses = batch if name == "learn" else self.groups_per_call * self.group_size
            call_s = service.call_s(responses, responses * (self.prompt_tokens + mean))
            rates[name] = service.servers * responses / call_s
        return rates


@dataclass(frozen=True)
class Service:
    """A stage's servers and what one call costs: fixed + per response + per token seconds."""

    servers: int
    fixed_s: float = 0.0
    per_response_s: float = 0.0
    per_token_s: float = 0.0
    load_s: float = 0.0  # a weight update

    def call_s(self, responses: int, tokens: float) -> float:
        return self.fixed_s + self.per_response_s * responses + self.per_token_s * tokens


@dataclass
class _ChunkRecord:
    remaining: int  # sequences not finished
    tokens: np.ndarray  # prompt + response tokens per group
    first: int = 1 << 62  # oldest version that decoded any of its tokens
    last: int = -1  # newest


class EngineBank:
    """N continuous-batching engines in simulated real time; plain numpy, driven by ``advance``.

    Sequences are (engine, slot) cells; each holds the tokens it still has to generate. A
    chunk goes whole to the engine with the fewest running plus queued sequences.
    """

    def __init__(self, profile: Profile, engines: int, interruptible: bool):
        n, s = engines, profile.max_seqs
        self.p, self.interruptible = profile, interruptible
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
        self.chunks: dict[int, _ChunkRecord] = {}
        self.now = 0.0
        self.slot_s = 0.0  # integral of running sequences over time: the pool's occupancy
        self.finished = 0  # responses generated
        self.paused_s = 0.0  # engine-seconds spent loading weights and recomputing KV

    @property
    def idle(self) -> bool:
        return not (self.busy.any() or self.queued.any() or (self.target > self.version).any())

    def submit(self, chunk_id: int, lengths: np.ndarray, group_tokens: np.ndarray) -> None:
        """Queue a chunk's sequences (``advance`` to now first)."""
        engine = int(np.argmin(self.busy.sum(1) + self.queued))
        self.chunks[chunk_id] = _ChunkRecord(len(lengths), group_tokens)
        self.queue[engine].append([chunk_id, lengths, 0])
        self.queued[engine] += len(lengths)
        self._refill()

    def update(self, version: int) -> None:
        """New weights arrive now: interrupt every engine, or drain each before it loads."""
        if not self.interruptible:
            self.target[:] = version
            self._start_drained_loads()
            return
        prompts = self.busy.sum(1) * self.p.prompt_tokens / self.p.group_size  # prefix-cached per group
        kv = self.made.sum(1) + prompts
        pause = self.p.engine_load_s + kv / self.p.prefill_tok_s
        self.resume_at = np.maximum(self.resume_at, self.now) + pause
        self.paused_s += float(pause.sum())
        self.version[:] = self.target[:] = version

    def loaded(self, version: int) -> bool:
        """Every engine decodes with ``version`` (or newer) by now."""
        return bool((self.version >= version).all() and (self.resume_at <= self.now).all())

    def advance(self, now: float) -> list[tuple[int, _ChunkRecord]]:
        """Decode up to ``now``; the chunks whose last sequence finished, with their records."""
        dt = now - self.now
        if dt <= 0:
            return []
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
        return done

    def _start_drained_loads(self) -> None:
        ready = (self.target > self.version) & ~self.busy.any(1)
        self.version[ready] = self.target[ready]
        self.resume_at[ready] = self.now + self.p.engine_load_s
        self.paused_s += self.p.engine_load_s * int(ready.sum())

    def _refill(self) -> None:
        """Start queued sequences in free slots; a freed slot's overshoot counts for its successor."""
        for engine in np.flatnonzero((self.queued > 0) & (self.target <= self.version)):
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


class _Clock:
    """Simulated real seconds since construction; sleeps are shrunk by ``time_scale``."""

    def __init__(self, time_scale: float):
        self.scale, self.start = time_scale, time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self.start) / self.scale

    async def sleep(self, real_s: float) -> None:
        await asyncio.sleep(real_s * self.scale)


@ray.remote(num_cpus=0)
class RolloutPoolSim:
    """N rollout actors in one process; returns chunk payloads and their version range.

    ``configure`` starts a fresh pool (engines empty, weights version 0, clock at 0), so one
    process serves many runs: starting Ray workers costs seconds on a small machine.
    """

    def __init__(self):
        self.waiting: dict[int, asyncio.Future] = {}
        self.syncs: list[tuple[int, asyncio.Future]] = []
        self.wake: asyncio.Event | None = None
        self.ticker: asyncio.Task | None = None

    def configure(self, profile: Profile, engines: int, interruptible: bool, seed: int) -> None:
        if self.waiting or self.syncs:
            raise RuntimeError("configure with calls in flight")
        self.p, self.seed, self.next_chunk = profile, seed, 0
        self.clock = _Clock(profile.time_scale)
        self.bank = EngineBank(profile, engines, interruptible)

    @ray.method(num_returns=2)
    async def rollout(self, group_ids: list[int]):
        lengths = [self.p.response_lengths(g, self.seed) for g in group_ids]
        tokens = np.array([x.sum() + self.p.group_size * self.p.prompt_tokens for x in lengths])
        chunk_id, self.next_chunk = self.next_chunk, self.next_chunk + 1
        done = self.waiting[chunk_id] = self._future()
        self._step()
        self.bank.submit(chunk_id, np.concatenate(lengths), tokens)
        record = await done
        payload = np.zeros((len(group_ids), 3))
        payload[:, FIRST], payload[:, LAST], payload[:, TOKENS] = record.first, record.last, record.tokens
        meta = {"weights_version": record.first, "last_version": record.last,
                "tokens": int(record.tokens.sum())}
        return payload, meta

    async def update_weights(self, weights: np.ndarray, version: int) -> dict:
        if int(weights[0]) != version - 1:
            raise ValueError(f"weights of step {weights[0]} sent as version {version}")
        done = self._future()
        self.syncs.append((version, done))
        self._step()
        self.bank.update(version)
        await done
        return {"version": version}

    def stats(self) -> dict:
        """Cumulative counters: simulated time, responses finished, sequence- and pause-seconds."""
        self._step()
        engines, slots = self.bank.busy.shape
        return {"now": self.bank.now, "finished": self.bank.finished, "slot_s": self.bank.slot_s,
                "paused_s": self.bank.paused_s, "engines": engines, "slots": engines * slots}

    async def stop(self) -> None:
        """End the ticker, so that the actor can be killed without a pending task."""
        if self.ticker is not None:
            self.ticker.cancel()

    def _future(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self.ticker is None:  # the first call: the actor's event loop runs now
            self.wake = asyncio.Event()
            self.ticker = loop.create_task(self._ticker())
        return loop.create_future()

    def _step(self) -> None:
        """Bring the engines to now; resolve finished chunks and landed weight updates."""
        for chunk_id, record in self.bank.advance(self.clock.now()):
            self.waiting.pop(chunk_id).set_result(record)
        for version, done in list(self.syncs):
            if self.bank.loaded(version):
                self.syncs.remove((version, done))
                done.set_result(None)
        if self.wake is not None:
            self.wake.set()

    async def _ticker(self) -> None:
        """Advance every TICK_S while there is work; sleep on ``wake`` otherwise."""
        while True:
            if self.bank.idle and not self.syncs:
                self.wake.clear()
                await self.wake.wait()
            await asyncio.sleep(TICK_S)
            self._step()


@ray.remote(num_cpus=0)
class ServiceSim:
    """A stage of ``Service.servers`` GPUs or CPU workers; a call holds one for ``call_s``."""

    def configure(self, service: Service, time_scale: float, group_size: int) -> None:
        self.service, self.group_size = service, group_size
        self.clock = _Clock(time_scale)
        self.free = None  # the semaphore belongs to the event loop: made on first use

    @ray.method(num_returns=2)
    async def process(self, payload: np.ndarray):
        await self._serve([payload])
        return payload, {"groups": len(payload)}

    @ray.method(num_returns=2)
    async def learn(self, step: int, *payloads: np.ndarray):
        """One optimiser step; the staleness is measured here, on the data itself."""
        await self._serve(payloads)
        rows = np.concatenate(payloads)
        metrics = {"head_staleness": (step - rows[:, FIRST]).astype(int).tolist(),
                   "tail_staleness": (step - rows[:, LAST]).astype(int).tolist(),
                   "groups": len(rows)}
        return np.array([float(step)]), metrics

    async def update_weights(self, weights: np.ndarray, version: int) -> dict:
        await self.clock.sleep(self.service.load_s)
        return {"version": version}

    async def _serve(self, payloads) -> None:
        if self.free is None:
            self.free = asyncio.Semaphore(self.service.servers)
        responses = sum(len(p) for p in payloads) * self.group_size
        tokens = sum(float(p[:, TOKENS].sum()) for p in payloads)
        async with self.free:
            await self.clock.sleep(self.service.call_s(responses, tokens))


class SimStages:
    """The ``Stages`` protocol over a simulated cluster; ``configure`` before each run."""

    def __init__(self):
        self.pool = RolloutPoolSim.remote()
        self.reference_sim, self.rewarder, self.learner = (ServiceSim.remote() for _ in range(3))

    def configure(self, profile: Profile, actors: int, *, interruptible: bool = True, seed: int = 0) -> None:
        """A fresh cluster of ``actors`` rollout actors: empty engines, version 0, clocks at 0."""
        services = profile.services(actors)
        ray.get([self.pool.configure.remote(profile, actors, interruptible, seed)]
                + [actor.configure.remote(services[name], profile.time_scale, profile.group_size)
                   for name, actor in (("reference", self.reference_sim), ("reward", self.rewarder),
                                       ("learn", self.learner))], timeout=60)

    def rollout(self, group_ids: list[int]) -> Handoff:
        return Handoff(*self.pool.rollout.remote(group_ids))

    def reference(self, data: ray.ObjectRef) -> Handoff:
        return Handoff(*self.reference_sim.process.remote(data))

    def reward(self, data: ray.ObjectRef) -> Handoff:
        return Handoff(*self.rewarder.process.remote(data))

    def learn(self, step: int, data: list[ray.ObjectRef]) -> Handoff:
        return Handoff(*self.learner.learn.remote(step, *data))

    def sync(self, weights: ray.ObjectRef, version: int) -> list[ray.ObjectRef]:
        return [self.pool.update_weights.remote(weights, version),
                self.reference_sim.update_weights.remote(weights, version)]

    def requeue(self, samples: list[str]) -> None:
        raise RuntimeError(f"simulated stages never fail, yet {samples} were handed back")

    def recover(self, worker: str) -> bool:
        return False

    def kill(self, worker: str) -> None:
        raise RuntimeError(f"simulated stages never stall, yet {worker} was reported")

    def pool_stats(self) -> dict:
        return ray.get(self.pool.stats.remote(), timeout=60)

    def shutdown(self) -> None:
        ray.get(self.pool.stop.remote(), timeout=60)
        for actor in (self.pool, self.reference_sim, self.rewarder, self.learner):
            ray.kill(actor)


def measure(stages: SimStages, profile: Profile, actors: int, eta: int, steps: int, warmup: int = 2,
            interruptible: bool = True, mode: str = "strict") -> dict:
    """Run the real Scheduler over ``stages``; rates per real second over ``steps`` after ``warmup``.

    The run goes eta + 1 steps past the window, so admission never stops inside it for want
    of work. ``rate`` is the lower of the trained and the generated responses per second in
    the window: with eta >= 1, a stock generated while the pipeline filled would otherwise let
    the learner outrun the pool for a while and pass for throughput.
    """
    if warmup < 1 or steps < 1:
        raise ValueError("need warmup >= 1 (the window starts at a step's end) and steps >= 1")
    stages.configure(profile, actors, interruptible=interruptible)
    ends, pool = [], []

    def on_step(record) -> None:
        ends.append(time.perf_counter())
        if len(ends) in (warmup, warmup + steps):
            pool.append(stages.pool_stats())

    batch = profile.batch_groups(actors)
    scheduler = Scheduler(stages, StalenessController(eta, batch, mode=mode), groups_per_call=profile.groups_per_call,
                          poll_s=0.02, on_step=on_step)
    report = scheduler.run(warmup + steps + eta + 1)
    start, end = ends[warmup - 1], ends[warmup + steps - 1]
    head = [s for r in report.steps[warmup:warmup + steps] for s in r.metrics["head_staleness"]]
    tail = [s for r in report.steps[warmup:warmup + steps] for s in r.metrics["tail_staleness"]]
    pool_s = pool[1]["now"] - pool[0]["now"]
    trained = steps * batch * profile.group_size * profile.time_scale / (end - start)
    generated = (pool[1]["finished"] - pool[0]["finished"]) / pool_s
    return {
        "rate": min(trained, generated), "trained": trained, "generated": generated,
        "step_s": (end - start) / profile.time_scale / steps,
        "occupancy": (pool[1]["slot_s"] - pool[0]["slot_s"]) / (pool[1]["slots"] * pool_s),
        "paused": (pool[1]["paused_s"] - pool[0]["paused_s"]) / (pool[1]["engines"] * pool_s),
        "learn": _busy(scheduler.timer.periods("learn"), start, end),
        "generating": _busy(scheduler.timer.periods("rollout"), start, end),
        "staleness": max(head), "spanning": sum(t < h for t, h in zip(tail, head)) / len(head),
        "bound_held": all(max(r.metrics["head_staleness"]) <= eta and max(r.staleness) <= eta
                          for r in report.steps),
        "dropped": report.admission["dropped"],
    }


def _busy(periods: list[tuple[float, float]], start: float, end: float) -> float:
    """The fraction of [start, end] covered by the busy periods."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in periods) / (end - start)
