"""Simulated ``Stages``: the real Scheduler and StalenessController over fake GPUs.

Why: the scheduler's value is measured on a GRPO step the size of a 7B model on tens of
GPUs, which this CPU machine cannot run. Here every stage is a zero-CPU async Ray actor
that sleeps the service time the real stage would take, shrunk by ``Profile.time_scale``;
refs, metadata and weight syncs travel exactly as with ``pipelines.grpo.stages.ActorStages``.

The rollout pool is N vLLM-like engines simulated by one actor (one ticker advances all of
them: ``bench.sim_engines.EngineBank``); engines can be added and retired mid-run. The
stages' costs are ``bench.sim_profile.Profile``. A chunk's metadata carries its version
range: ``weights_version`` is the oldest version that generated any of its tokens (what the
staleness bound applies to) and ``last_version`` the newest.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import ray

from bench.sim_engines import RETIRING, SERVING, STARTING, EngineBank
from bench.sim_profile import Profile, Service
from pipelines.grpo.admission import StalenessController
from pipelines.grpo.handoff import Handoff
from pipelines.grpo.scheduler import Scheduler

TICK_S = 0.01  # wall seconds between pool updates: completions are resolved to this grain
# payload columns, one row per group: what later stages need to cost and check their work
FIRST, LAST, TOKENS = range(3)


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

    def configure(self, profile: Profile, engines: int, interruptible: bool, seed: int,
                  capacity: int | None = None, serial: bool = False) -> None:
        if self.waiting or self.syncs:
            raise RuntimeError("configure with calls in flight")
        self.p, self.seed, self.next_chunk = profile, seed, 0
        self.clock = _Clock(profile.time_scale)
        self.bank = EngineBank(profile, engines, interruptible, capacity, serial)

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

    def add_engine(self) -> int:
        """One more engine, serving once its node has come and it has loaded the weights; its index."""
        self._step()
        return self.bank.add(self.p.node_start_s + self.p.engine_start_s)

    def retire_engine(self, engine: int | None) -> int:
        """Stop an engine (default: the least loaded); it goes once its sequences are done."""
        self._step()
        return self.bank.retire(engine)

    def changes(self) -> list[tuple[str, int]]:
        """Engines that joined or were removed since the last call (``bench.sim_engines``)."""
        self._step()
        return self.bank.take_changes()

    def stats(self) -> dict:
        """Cumulative counters (simulated time, responses finished, sequence-, pause- and engine-seconds)
        and the engines serving and paid for (starting, serving or retiring) now."""
        self._step()
        bank, engines = self.bank, self.bank.count(SERVING)
        return {"now": bank.now, "finished": bank.finished, "slot_s": bank.slot_s, "paused_s": bank.paused_s,
                "engine_s": bank.engine_s, "engines": engines, "slots": engines * self.p.max_seqs,
                "paid": bank.count(STARTING, SERVING, RETIRING)}

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

    def configure(self, profile: Profile, actors: int, *, interruptible: bool = True, seed: int = 0,
                  engines: int | None = None, capacity: int | None = None, serial: bool = False) -> None:
        """A fresh cluster sized for ``actors`` rollout actors: empty engines, version 0, clocks at 0.

        ``engines``: the pool's engines at the start when not ``actors`` (the learner, reference
        and reward stages stay sized for ``actors``); ``capacity``: the most it may grow to;
        ``serial``: an engine runs one call at a time (``bench.sim_engines``).
        """
        services = profile.services(actors)
        ray.get([self.pool.configure.remote(profile, actors if engines is None else engines, interruptible, seed,
                                            capacity, serial)]
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
