"""The simulated cluster behind bench/scheduler.py: engine arithmetic, then a tiny bench run.

The engine tests drive ``EngineBank`` by hand in simulated seconds (no Ray); the last test
runs the real Scheduler over ``SimStages`` at a tiny scale on the session's Ray cluster.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.sim_engines import JOINED, REMOVED, STARTING, EngineBank
from bench.sim_profile import Profile
from bench.sim_stages import SimStages, measure

TICK = 0.01  # completions resolve to the tick that passes them
# engines of 2 sequences each, 10 ms per decode step whatever the batch
ENGINE = Profile(max_seqs=2, step_base_s=0.01, step_per_seq_s=0.0, engine_load_s=0.5,
                 prefill_tok_s=1000.0, prompt_tokens=80, group_size=2)


def run_until(bank: EngineBank, end: float, dt: float = TICK) -> dict[int, tuple[float, object]]:
    """Advance in steps of ``dt``; when each chunk finished, and its record."""
    done, now = {}, bank.now
    while now < end - 1e-9:
        now = round(now + dt, 6)
        done.update({chunk: (now, record) for chunk, record in bank.advance(now)})
    return done


def test_continuous_batching_starts_queued_sequences_in_freed_slots():
    bank = EngineBank(ENGINE, engines=1, interruptible=True)
    bank.submit(0, np.array([100.0, 200.0]), np.array([380.0]))
    bank.submit(1, np.array([100.0, 50.0]), np.array([310.0]))  # waits: both slots are taken
    done = run_until(bank, 3.0)
    assert done[0][0] == pytest.approx(2.0, abs=TICK / 2)  # 200 steps of 10 ms
    assert done[1][0] == pytest.approx(2.5, abs=TICK / 2)  # 100 from 1.0 s (a freed slot), 50 from 2.0 s
    assert bank.finished == 4 and bank.idle
    assert bank.slot_s == pytest.approx(4.5, abs=TICK)  # sequence-seconds: 1 + 2 + 1 + 0.5


def test_a_chunk_goes_to_the_least_loaded_engine():
    bank = EngineBank(ENGINE, engines=2, interruptible=True)
    for chunk in range(3):
        bank.submit(chunk, np.array([100.0, 100.0]), np.array([360.0]))
    assert bank.busy.sum(1).tolist() == [2, 2] and bank.queued.tolist() == [2, 0]
    done = run_until(bank, 3.0)
    assert [done[c][0] for c in range(3)] == pytest.approx([1.0, 1.0, 2.0], abs=TICK / 2)


def test_interrupt_pauses_for_load_and_kv_recompute_and_tags_the_version_range():
    bank = EngineBank(ENGINE, engines=1, interruptible=True)
    bank.submit(0, np.array([100.0, 100.0]), np.array([360.0]))
    run_until(bank, 0.5)  # 50 tokens each so far
    bank.update(1)
    assert not bank.loaded(1)  # load 0.5 s + (2 x 50 generated + 80 prompt) / 1000 tok/s
    done = run_until(bank, 2.0)
    assert bank.loaded(1) and bank.paused_s == pytest.approx(0.68, abs=0.01)
    finished_at, record = done[0]
    assert finished_at == pytest.approx(0.5 + 0.68 + 0.5, abs=TICK / 2)
    assert (record.first, record.last) == (0, 1)  # begun with version 0, finished with 1


def test_drain_starts_nothing_new_until_the_running_sequences_end_and_weights_load():
    bank = EngineBank(ENGINE, engines=1, interruptible=False)
    bank.submit(0, np.array([100.0, 30.0]), np.array([290.0]))
    run_until(bank, 0.2)
    bank.update(1)
    bank.submit(1, np.array([10.0, 10.0]), np.array([180.0]))  # a free slot, but the engine drains
    done = run_until(bank, 3.0)
    assert done[0][0] == pytest.approx(1.0, abs=TICK / 2) and (done[0][1].first, done[0][1].last) == (0, 0)
    assert done[1][0] == pytest.approx(1.0 + 0.5 + 0.1, abs=TICK)  # drained at 1.0, loaded for 0.5 s
    assert (done[1][1].first, done[1][1].last) == (1, 1)


def test_an_added_engine_serves_after_its_start_with_the_newest_weights_and_a_retired_one_finishes_first():
    bank = EngineBank(ENGINE, engines=1, interruptible=True, capacity=3)
    bank.submit(0, np.array([100.0, 100.0]), np.array([360.0]))
    bank.update(1)  # loads 0.5 s + KV of 2 x 0 tokens + 80 prompt tokens / 1000 tok/s
    added = bank.add(delay_s=0.4)
    assert added == 1 and bank.count(STARTING) == 1 and bank.loaded(1) is False
    run_until(bank, 0.5)
    assert bank.take_changes() == [(JOINED, 1)] and bank.version[1] == 1
    bank.submit(1, np.array([50.0, 50.0]), np.array([260.0]))  # to the new engine: the old one is busy
    assert bank.busy[1].sum() == 2
    assert bank.retire() == 1 and bank.take_changes() == []  # the least loaded (on ties the newest) keeps its work
    done = run_until(bank, 2.0)
    assert done[1][0] == pytest.approx(0.5 + 0.5, abs=TICK / 2) and bank.take_changes() == [(REMOVED, 1)]
    assert done[0][0] == pytest.approx(0.58 + 1.0, abs=TICK / 2)  # the first engine paused to load, then 100 steps
    assert bank.engine_s == pytest.approx(2.0 + 1.0, abs=TICK)  # engine 0 all along, engine 1 from 0 to 1.0 s
    starting = bank.add(delay_s=5.0)
    assert bank.retire(starting) == starting  # never served
    assert bank.add(delay_s=5.0) != starting  # its removal is not taken yet: its index is not reused
    assert bank.take_changes() == [(REMOVED, starting)] and bank.add(delay_s=5.0) == starting


def test_a_serial_engine_runs_one_chunk_at_a_time():
    bank = EngineBank(dataclasses.replace(ENGINE, max_seqs=4), engines=1, interruptible=True, serial=True)
    bank.submit(0, np.array([100.0, 10.0]), np.array([190.0]))
    bank.submit(1, np.array([10.0, 10.0]), np.array([100.0]))  # free slots, but the engine is on chunk 0
    done = run_until(bank, 2.0)
    assert [done[c][0] for c in (0, 1)] == pytest.approx([1.0, 1.1], abs=TICK / 2)


def test_stage_rates_follow_the_profile():
    p = Profile()
    rates = p.stage_rates(8)
    slot_rate = 8 * p.max_seqs / (p.step_base_s + p.step_per_seq_s * p.max_seqs)  # tokens/s
    batch = p.batch_groups(8) * p.group_size
    assert rates["rollout"] == pytest.approx(batch / (batch * p.mean_response_tokens() / slot_rate + 1.0))
    drawn = np.concatenate([p.response_lengths(g, seed=0) for g in range(4000)])
    assert drawn.mean() == pytest.approx(p.mean_response_tokens(), rel=0.03)
    assert np.array_equal(p.response_lengths(7, seed=0), p.response_lengths(7, seed=0))


TINY = dataclasses.replace(Profile(), group_size=4, groups_per_actor=2, max_seqs=8, median_tokens=400.0,
                           sigma=0.5, max_new_tokens=2000, time_scale=1 / 50)


@pytest.fixture(scope="module")
def sim(ray_cluster):
    stages = SimStages()
    yield stages
    stages.shutdown()


def test_tiny_bench_overlaps_and_keeps_the_staleness_bound(sim):
    sync, fast = (measure(sim, TINY, actors=2, eta=eta, steps=3, warmup=1) for eta in (0, 1))
    for eta, result in enumerate((sync, fast)):
        assert result["bound_held"] and result["staleness"] <= eta  # every step, on the data
        assert result["dropped"] == 0
    assert fast["rate"] >= sync["rate"]
    assert fast["learn"] > sync["learn"]  # the learner waits less once generation overlaps it
