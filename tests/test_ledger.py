"""The trajectory ledger: transitions, the exactly-once check, the summary (persistence: test_ledger_files)."""
from __future__ import annotations

import json

import pytest
from ledger_runs import document, small_run, train

from pipelines.grpo.ledger import (
    ADMITTED,
    DROPPED,
    GENERATED,
    REFERENCED,
    REQUEUED,
    REWARDED,
    STATES,
    TRAINED,
    Ledger,
    LedgerError,
    format_summary,
)


def test_life_cycle_and_summary():
    ledger = Ledger()
    ledger.admitted(0, "e0:17")
    assert ledger.state(0) == ADMITTED and ledger.open_groups() == [0]
    ledger.generated(0, 3)
    assert ledger.state(0) == GENERATED
    ledger.referenced(0)
    assert ledger.state(0) == REFERENCED
    ledger.rewarded(0)
    assert ledger.state(0) == REWARDED
    ledger.trained(0, 4)
    assert ledger.state(0) == TRAINED and ledger.open_groups() == []
    assert ledger.attempts("e0:17") == 1 and ledger.attempts("e0:99") == 0
    assert ledger.next_group_id() == 1
    ledger.check(eta=1)
    with pytest.raises(LedgerError, match="staleness 1"):
        ledger.check(eta=0)

    run = small_run()
    assert [run.state(i) for i in range(7)] == [
        TRAINED, TRAINED, REQUEUED, DROPPED, TRAINED, TRAINED, GENERATED,
    ]
    assert run.attempts("e0:2") == 2 and run.attempts("e0:5") == 1
    assert run.open_groups() == [6] and run.next_group_id() == 7
    run.check(eta=1, batch_size=2)
    assert run.summary() == {
        "groups": 7,
        "states": {
            ADMITTED: 0, GENERATED: 1, REFERENCED: 0, REWARDED: 0, TRAINED: 4, DROPPED: 1, REQUEUED: 1,
        },
        "samples": 6,
        "trained_samples": 4,
        "retried_samples": 1,
        "steps": 2,
        "dropped_by_reason": {"stale": 1},
        "requeued_by_reason": {"actor died": 1},
        "staleness": {"0": 3, "1": 1},
    }
    json.dumps(run.summary())  # JSON-able as it stands


def test_empty_ledger():
    ledger = Ledger()
    assert ledger.next_group_id() == 0 and ledger.open_groups() == []
    ledger.check(eta=0, batch_size=4)
    summary = ledger.summary()
    assert summary["groups"] == 0 and set(summary["states"]) == set(STATES)
    assert summary["staleness"] == {} and summary["steps"] == 0
    assert ledger.interrupt_open("resume") == []
    with pytest.raises(ValueError, match="eta >= 0"):
        ledger.check(eta=-1)


def _admitted(ledger: Ledger) -> None:
    ledger.admitted(3, "e1:8")


def _trained(ledger: Ledger) -> None:
    train(ledger, 3, "e1:8", version=0, step=0)


def _dropped(ledger: Ledger) -> None:
    _admitted(ledger)
    ledger.dropped(3, "bad data")


def _requeued(ledger: Ledger) -> None:
    _admitted(ledger)
    ledger.requeued(3, "resume")


@pytest.mark.parametrize(
    "setup, action, state, target",
    [
        (_admitted, lambda lg: lg.referenced(3), ADMITTED, REFERENCED),  # skips generated
        (_admitted, lambda lg: lg.trained(3, 0), ADMITTED, TRAINED),
        (_admitted, lambda lg: lg.admitted(3, "e1:9"), ADMITTED, ADMITTED),  # id reused
        (_trained, lambda lg: lg.dropped(3, "late"), TRAINED, DROPPED),
        (_trained, lambda lg: lg.requeued(3, "late"), TRAINED, REQUEUED),
        (_trained, lambda lg: lg.trained(3, 1), TRAINED, TRAINED),
        (_dropped, lambda lg: lg.generated(3, 0), DROPPED, GENERATED),
        (_dropped, lambda lg: lg.requeued(3, "again"), DROPPED, REQUEUED),
        (_requeued, lambda lg: lg.generated(3, 0), REQUEUED, GENERATED),
        (_requeued, lambda lg: lg.dropped(3, "again"), REQUEUED, DROPPED),
    ],
)
def test_illegal_transitions_name_group_sample_state_and_target(setup, action, state, target):
    ledger = Ledger()
    setup(ledger)
    with pytest.raises(LedgerError) as err:
        action(ledger)
    message = str(err.value)
    assert "group 3" in message and "'e1:8'" in message
    assert f"state {state}" in message and f"to {target}" in message
    assert ledger.state(3) == state  # a refused transition changes nothing


def test_unknown_group_is_refused():
    ledger = Ledger()
    for action in (
        lambda: ledger.generated(42, 0),
        lambda: ledger.dropped(42, "x"),
        lambda: ledger.requeued(42, "x"),
        lambda: ledger.state(42),
    ):
        with pytest.raises(LedgerError, match="group 42 .*never admitted"):
            action()
    assert issubclass(LedgerError, ValueError)


def test_check_catches_a_sample_trained_twice():
    ledger = Ledger()
    train(ledger, 0, "e0:1", version=0, step=0)
    train(ledger, 1, "e0:1", version=1, step=1)  # the transitions alone allow this
    with pytest.raises(LedgerError) as err:
        ledger.check(eta=1)
    message = str(err.value)
    assert "sample 'e0:1' trained 2 times (groups [0, 1])" in message
    assert "group 1 was admitted after group 0, which is trained" in message


@pytest.mark.parametrize("first_end", [TRAINED, DROPPED, None])
def test_check_catches_a_group_after_a_final_or_open_one(first_end):
    ledger = Ledger()
    ledger.admitted(0, "e0:5")
    if first_end == TRAINED:
        ledger.generated(0, 0)
        ledger.referenced(0)
        ledger.rewarded(0)
        ledger.trained(0, 0)
    elif first_end == DROPPED:
        ledger.dropped(0, "bad data")
    ledger.admitted(1, "e0:5")  # still open: admitted again while group 0 is not requeued
    expected = f"group 1 was admitted after group 0, which is {first_end or ADMITTED}"
    with pytest.raises(LedgerError, match=expected):
        ledger.check(eta=0)
    ledger.requeued(1, "resume")  # the later group ending does not repair the order
    with pytest.raises(LedgerError, match="after group 0"):
        ledger.check(eta=0)


def test_check_accepts_requeues_before_the_final_group():
    ledger = Ledger()
    for group_id in range(3):
        ledger.admitted(group_id, "e0:5")
        ledger.requeued(group_id, "actor died")
    ledger.admitted(3, "e0:5")
    ledger.check(eta=0)
    ledger.dropped(3, "rollout: actor failure beyond 3 retries")
    ledger.check(eta=0)
    assert ledger.attempts("e0:5") == 4


def test_check_catches_staleness_beyond_eta_and_from_the_future():
    ledger = Ledger()
    train(ledger, 0, "e0:0", version=0, step=3)
    train(ledger, 1, "e0:1", version=5, step=4)  # generated with weights the step never had
    with pytest.raises(LedgerError) as err:
        ledger.check(eta=2)
    message = str(err.value)
    assert "2 violation(s)" in message
    assert "group 0 (sample 'e0:0'): staleness 3 (step 3 - version 0) is outside [0, 2]" in message
    assert "group 1 (sample 'e0:1'): staleness -1" in message
    with pytest.raises(LedgerError, match="1 violation"):
        ledger.check(eta=3)


def test_check_catches_batch_size_mismatch_and_skipped_steps():
    ledger = Ledger()
    train(ledger, 0, "e0:0", version=0, step=0)
    train(ledger, 1, "e0:1", version=0, step=0)
    train(ledger, 2, "e0:2", version=1, step=1)
    ledger.check(eta=0)  # fine without a batch size
    with pytest.raises(LedgerError, match="step 1 trained 1 groups, not the batch size 2"):
        ledger.check(eta=0, batch_size=2)
    ledger.check(eta=1, batch_size=None)
    with pytest.raises(LedgerError, match="step 0 trained 2 groups"):
        ledger.check(eta=0, batch_size=1)

    gap = Ledger()
    train(gap, 0, "e0:0", version=0, step=0)
    train(gap, 1, "e0:1", version=2, step=2)
    with pytest.raises(LedgerError, match=r"steps \[1\] trained nothing"):
        gap.check(eta=0, batch_size=1)


def test_check_lists_ten_violations_and_counts_the_rest():
    ledger = Ledger()
    for group_id in range(13):
        train(ledger, group_id, f"e0:{group_id}", version=0, step=9)
    with pytest.raises(LedgerError) as err:
        ledger.check(eta=0)
    message = str(err.value)
    assert "13 violation(s)" in message and "... and 3 more" in message
    assert message.count("staleness 9") == 10


def test_check_catches_trained_rows_without_version_or_step():
    rows = [[0, "e0:0", TRAINED, None, 0, None], [1, "e0:1", TRAINED, 0, None, None]]
    ledger = Ledger.from_dict(document(rows))
    with pytest.raises(LedgerError) as err:
        ledger.check(eta=1)
    assert "group 0" in str(err.value) and "group 1" in str(err.value)
    assert "without a version and step" in str(err.value)


def test_interrupt_open_requeues_in_admission_order_and_readmission_passes():
    ledger = Ledger()
    ledger.admitted(0, "e0:4")
    ledger.admitted(1, "e0:2")
    ledger.generated(1, 0)
    train(ledger, 2, "e0:9", version=0, step=0)
    ledger.admitted(3, "e0:7")
    ledger.generated(3, 0)
    ledger.referenced(3)
    ledger.rewarded(3)
    ledger.admitted(4, "e0:1")
    ledger.dropped(4, "bad data")

    samples = ledger.interrupt_open("resume")
    assert samples == ["e0:4", "e0:2", "e0:7"]
    assert [ledger.state(i) for i in (0, 1, 3)] == [REQUEUED] * 3
    assert ledger.open_groups() == [] and ledger.state(2) == TRAINED
    ledger.check(eta=0, batch_size=1)
    assert ledger.summary()["requeued_by_reason"] == {"resume": 3}

    next_id = ledger.next_group_id()
    assert next_id == 5
    for step, sample in enumerate(samples, start=1):
        train(ledger, next_id, sample, version=step, step=step)
        next_id += 1
    ledger.check(eta=0, batch_size=1)
    assert ledger.attempts("e0:2") == 2
    summary = ledger.summary()
    assert summary["trained_samples"] == 4 and summary["retried_samples"] == 3
    assert summary["steps"] == 4 and summary["states"][TRAINED] == 4


def test_format_summary_shows_counts_reasons_and_staleness():
    ledger = small_run()
    train(ledger, 7, "e0:7", version=0, step=2)  # staleness 2
    ledger.admitted(8, "e0:8")
    ledger.dropped(8, "rollout: actor failure beyond 3 retries")
    text = format_summary(ledger.summary())
    lines = text.splitlines()
    assert lines[0] == "9 groups over 8 samples: 5 trained in 3 steps, 1 retried"
    assert lines[1] == (
        "admitted 0  generated 1  referenced 0  rewarded 0  trained 5  dropped 2  requeued 1"
    )
    assert "       1  stale" in lines and "       1  actor died" in lines
    assert "       1  rollout: actor failure beyond 3 retries" in lines
    assert "staleness (step - version):" in lines
    assert f"  0 | {'#' * 40} 3" in lines and f"  1 | {'#' * 13} 1" in lines
    assert f"  2 | {'#' * 13} 1" in lines
    empty = format_summary(Ledger().summary())
    assert "dropped: none" in empty and "requeued: none" in empty and "staleness" not in empty
