"""The scheduler over simulated stages on the session's Ray cluster.

The fake actors sleep a service time and pass a 4 MB numpy payload from stage to stage by
ref; the payload carries the weights version and group ids, so the learner checks the
staleness bound on the data itself, independently of the scheduler's bookkeeping.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray

from pipelines.grpo.admission import STALE, StalenessController
from pipelines.grpo.handoff import Handoff
from pipelines.grpo.phase_timer import PhaseTimer
from pipelines.grpo.scheduler import Scheduler

PAYLOAD_FLOATS = 1 << 20  # 4 MB per chunk: bulk the driver must never fetch
BATCH, PER_CALL, STEPS = 4, 2, 5
GENERATION = ("rollout", "reference", "reward")


@ray.remote(num_cpus=0)
class SimulatedStage:
    """A fake actor for any stage: sleeps ``service_s`` per call, passes the payload on."""

    def configure(self, service_s: float, slow: dict | None = None, fail=()):
        self.service_s, self.slow, self.fail = service_s, slow or {}, set(fail)
        self.version, self.trained = 0, []
        self.running, self.lock = 0, threading.Lock()  # rollout calls in progress

    @ray.method(num_returns=2)
    def rollout(self, group_ids):
        version = self.version  # the weights a real engine would start sampling with
        with self.lock:
            self.running += 1
        time.sleep(self.service_s + max(self.slow.get(g, 0.0) for g in group_ids))
        with self.lock:
            self.running -= 1
        if self.fail.intersection(group_ids):
            raise RuntimeError(f"simulated rollout failure in {group_ids}")
        payload = np.zeros(PAYLOAD_FLOATS, np.float32)
        payload[:2 + len(group_ids)] = [version, len(group_ids), *group_ids]
        return payload, {"weights_version": version}

    @ray.method(num_returns=2)
    def process(self, payload):
        time.sleep(self.service_s)
        return payload, {"reward_mean": float(payload[1])}

    @ray.method(num_returns=2)
    def learn(self, step, *payloads):
        time.sleep(self.service_s)
        staleness = [step - int(p[0]) for p in payloads]
        groups = [int(g) for p in payloads for g in p[2:2 + int(p[1])]]
        self.trained += groups
        return np.full(PAYLOAD_FLOATS, step, np.float32), {"staleness": staleness}

    def load_weights(self, weights, version):
        assert weights[0] == version - 1  # the weights of the step that just finished
        self.version = version
        return {"version": version, "interrupted": self.running > 0}  # as an interruptible engine reports

    def trained_groups(self):
        return self.trained


class SimStages:
    """The ``Stages`` protocol over four simulated actors; samples are keys ``s0, s1, ...``."""

    def __init__(self):
        self.pool = SimulatedStage.options(max_concurrency=4).remote()
        self.reference_sim, self.rewarder, self.learner = (SimulatedStage.remote() for _ in range(3))
        self.requeued, self.next_sample = [], 0

    def configure(self, rollout_s, reference_s, reward_s, learn_s, **pool):
        ray.get([self.pool.configure.remote(rollout_s, **pool),
                 self.reference_sim.configure.remote(reference_s),
                 self.rewarder.configure.remote(reward_s),
                 self.learner.configure.remote(learn_s)])

    def rollout(self, group_ids):
        samples = self.requeued[:len(group_ids)]
        self.requeued = self.requeued[len(group_ids):]
        while len(samples) < len(group_ids):
            samples.append(f"s{self.next_sample}")
            self.next_sample += 1
        name, actor = self.rollout_actor(group_ids)
        return Handoff(*actor.rollout.remote(group_ids), worker=name, samples=tuple(samples))

    def rollout_actor(self, group_ids):
        return "pool", self.pool

    def requeue(self, samples):
        self.requeued = list(samples) + self.requeued

    def recover(self, worker):
        return False

    def kill(self, worker):
        raise AssertionError(f"no stall expected, {worker} was reported")

    def reference(self, data):
        return Handoff(*self.reference_sim.process.remote(data))

    def reward(self, data):
        return Handoff(*self.rewarder.process.remote(data))

    def learn(self, step, data):
        return Handoff(*self.learner.learn.remote(step, *data))

    def sync(self, weights, version):
        return [actor.load_weights.remote(weights, version) for actor in (self.pool, self.reference_sim)]

    def kill_all(self):
        for actor in (self.pool, self.reference_sim, self.rewarder, self.learner):
            ray.kill(actor)


@pytest.fixture(scope="module")
def stages(ray_cluster):
    sim = SimStages()
    yield sim
    sim.kill_all()


def run(stages, eta, steps=STEPS, straggler_timeout_s=None, rollout_s=0.12, **pool):
    """One scheduler run; returns (report, scheduler, what the driver fetched, trained ids)."""
    stages.configure(rollout_s=rollout_s, reference_s=0.03, reward_s=0.03, learn_s=0.2, **pool)
    fetched, records = [], []
    original = ray.get

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        fetched.append(out)
        return out

    stages.requeued, stages.next_sample = [], 0
    controller = StalenessController(eta=eta, batch_size=BATCH)
    scheduler = Scheduler(stages, controller, groups_per_call=PER_CALL, poll_s=0.01,
                          straggler_timeout_s=straggler_timeout_s, on_step=records.append)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "get", spy)
        report = scheduler.run(steps)
    assert records == report.steps
    return report, scheduler, fetched, ray.get(stages.learner.trained_groups.remote())


@pytest.fixture(scope="module")
def sync_and_async(stages):
    return {eta: run(stages, eta) for eta in (0, 1)}


def overlap_s(a, b) -> float:
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def periods(scheduler, names):
    return [p for name in names for p in scheduler.timer.periods(name)]


def test_eta0_alternates_generation_and_training(sync_and_async):
    report, scheduler, _, _ = sync_and_async[0]
    generation, learning = periods(scheduler, GENERATION), periods(scheduler, ["learn"])
    assert len(learning) == STEPS and overlap_s(generation, learning) == 0.0
    assert all(record.staleness == {0: BATCH} for record in report.steps)
    assert all(record.metrics["staleness"] == [0, 0] for record in report.steps)
    assert all(record.interrupted_updates == 0 for record in report.steps)  # weights land between batches


def test_eta1_overlaps_generation_and_training(sync_and_async):
    (sync, _, _, _), (fast, fast_sched, _, _) = sync_and_async[0], sync_and_async[1]
    generation, learning = periods(fast_sched, GENERATION), periods(fast_sched, ["learn"])
    learn_busy = fast.phases["learn"]["busy_s"]
    assert overlap_s(generation, learning) > 0.3 * learn_busy
    for phase in ("rollout", "learn"):
        assert fast.phases[phase]["busy_fraction"] > sync.phases[phase]["busy_fraction"]
    assert fast.phases["learn"]["idle_s"] < sync.phases["learn"]["idle_s"]
    assert fast.wall_s < 0.85 * sync.wall_s
    assert fast.admission["staleness"].get(1, 0) > 0  # it did train one step behind


def test_weights_landing_inside_a_rollout_call_are_counted(stages):
    """Rollouts slower than a step: the sync after a step reaches calls still generating."""
    report = run(stages, 1, rollout_s=0.4)[0]
    assert report.steps[0].interrupted_updates == 0  # nothing was synced before step 0
    assert sum(record.interrupted_updates for record in report.steps) >= 1


@pytest.mark.parametrize("eta", [0, 1])
def test_staleness_never_exceeds_eta(sync_and_async, eta):
    report = sync_and_async[eta][0]
    for record in report.steps:
        assert max(record.staleness) <= eta
        assert max(record.metrics["staleness"]) <= eta  # measured on the data by the learner
    assert max(report.admission["staleness"]) <= eta


@pytest.mark.parametrize("eta", [0, 1])
def test_driver_fetches_only_metadata(sync_and_async, eta):
    _, _, fetched, _ = sync_and_async[eta]
    assert fetched and all(isinstance(meta, dict) for meta in fetched)
    assert not any(isinstance(v, np.ndarray) for meta in fetched for v in meta.values())


@pytest.mark.parametrize("eta", [0, 1])
def test_trains_exactly_the_admitted_groups(sync_and_async, eta):
    report, _, _, trained = sync_and_async[eta]
    stats = report.admission
    assert stats["dropped"] == 0 and stats["in_flight"] == stats["ready"] == 0
    assert stats["trained"] == stats["admitted"] == STEPS * BATCH
    assert sorted(trained) == list(range(STEPS * BATCH))
    assert [record.groups for record in report.steps] == [BATCH] * STEPS


def test_stragglers_are_dropped_and_failures_retried_never_trained_twice(stages):
    report, scheduler, fetched, trained = run(
        stages, eta=1, straggler_timeout_s=0.4, slow={6: 1.5}, fail={12})
    ctl, stats, ledger = scheduler.controller, report.admission, scheduler.ledger
    dropped = {g for g in range(stats["admitted"]) if ctl.drop_reason(g)}
    assert {ctl.drop_reason(g) for g in (6, 7)} == {STALE}
    assert [ledger.state(g) for g in (6, 7)] == ["dropped", "dropped"]
    assert [ledger.state(g) for g in (12, 13)] == ["requeued", "requeued"]
    retried = [ledger.sample(g) for g in (12, 13)]
    assert all(ledger.attempts(sample) == 2 for sample in retried)  # admitted again under new ids
    assert dropped == {6, 7, 12, 13}
    assert sorted(trained) == sorted(set(range(stats["admitted"])) - dropped - set(ledger.open_groups()))
    assert stats["trained"] == STEPS * BATCH and report.steps[-1].faults["retries"] == 2
    ledger.check(eta=1, batch_size=BATCH)
    assert max(stats["staleness"]) <= 1
    assert all(isinstance(meta, dict) for meta in fetched)


class HangingStages(SimStages):
    """The rollout of group ``HUNG`` goes to an actor of its own that never answers."""

    HUNG = 5

    def __init__(self):
        super().__init__()
        self.hung, self.killed = SimulatedStage.remote(), []
        ray.get(self.hung.configure.remote(3600.0))

    def rollout_actor(self, group_ids):
        return ("hung", self.hung) if self.HUNG in group_ids else super().rollout_actor(group_ids)

    def kill(self, worker):
        self.killed.append(worker)
        ray.kill(self.hung)


def test_the_watchdog_kills_a_hung_actor_and_its_samples_are_retried(ray_cluster):
    stages = HangingStages()
    try:
        stages.configure(rollout_s=0.05, reference_s=0.01, reward_s=0.01, learn_s=0.05)
        scheduler = Scheduler(stages, StalenessController(eta=1, batch_size=BATCH), groups_per_call=PER_CALL,
                              poll_s=0.01, stall_timeout_s=2.0)
        report = scheduler.run(3)
        ledger = scheduler.ledger
        assert stages.killed == ["hung"] and report.steps[-1].faults["stalls"] == 1
        hung_sample = ledger.sample(HangingStages.HUNG)
        assert ledger.state(HangingStages.HUNG) == "requeued" and ledger.attempts(hung_sample) == 2
        assert "rollout: actor hung died" in ledger.summary()["requeued_by_reason"]
        ledger.check(eta=1, batch_size=BATCH)
    finally:
        stages.kill_all()


def test_groups_per_call_must_divide_the_batch():
    with pytest.raises(ValueError):
        Scheduler(SimStages.__new__(SimStages), StalenessController(1, 4), groups_per_call=3)


def test_phase_timer_integrates_gauges_over_time():
    now = [0.0]
    timer = PhaseTimer(clock=lambda: now[0])
    timer.begin("rollout")
    now[0] = 1.0
    timer.begin("rollout")
    now[0] = 2.0
    timer.end("rollout")
    timer.end("rollout")
    timer.set("ready_groups", 4)
    now[0] = 4.0
    report = timer.report()
    assert report["rollout"] == {"busy_s": 2.0, "idle_s": 2.0, "busy_fraction": 0.5,
                                 "mean": 0.75, "max": 2}
    assert report["ready_groups"]["mean"] == 2.0
    assert timer.periods("rollout") == [(0.0, 2.0)]
    assert timer.periods("ready_groups") == [(2.0, 4.0)]
    with pytest.raises(ValueError):
        timer.end("rollout")
