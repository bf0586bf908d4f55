"""The watchdog: busy actors without progress are reported once per timeout."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.grpo.watchdog import Watchdog


def test_busy_actor_without_progress_is_reported_once_per_timeout():
    dog = Watchdog(10.0)
    dog.started("rollout-0.0", now=0.0)
    dog.started("rollout-0.0", now=5.0)  # still busy: progress clock not reset
    assert dog.stalled(9.0) == []
    assert dog.stalled(10.5) == [("rollout-0.0", 10.5)]
    assert dog.stalled(15.0) == []  # reported: a fresh allowance
    assert dog.stalled(21.0) == [("rollout-0.0", 10.5)]


def test_finishing_calls_is_progress_and_idle_actors_never_stall():
    dog = Watchdog(10.0)
    dog.started("scorer-0.0", now=0.0)
    dog.started("scorer-0.0", now=1.0)
    dog.finished("scorer-0.0", now=8.0)
    assert dog.stalled(17.0) == []
    assert dog.stalled(18.5) == [("scorer-0.0", 10.5)]
    dog.finished("scorer-0.0", now=19.0)
    assert dog.stalled(1000.0) == []  # idle


def test_no_timeout_never_reports_and_bad_timeouts_are_refused():
    dog = Watchdog(None)
    dog.started("learner", now=0.0)
    assert dog.stalled(1e9) == []
    with pytest.raises(ValueError, match="stall timeout"):
        Watchdog(0)


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.booleans(), st.floats(0, 5)), max_size=40))
def test_a_reported_actor_was_busy_and_silent_for_longer_than_the_timeout(events):
    dog, now, busy, last = Watchdog(3.0), 0.0, {"a": 0, "b": 0}, {}
    for worker, start, dt in events:
        now += dt
        for name, idle in dog.stalled(now):
            assert busy[name] > 0 and idle > 3.0 and now - last[name] > 3.0
            last[name] = now
        if start:
            if not busy[worker]:
                last[worker] = now
            busy[worker] += 1
            dog.started(worker, now)
        elif busy[worker]:
            busy[worker] -= 1
            last[worker] = now
            dog.finished(worker, now)
