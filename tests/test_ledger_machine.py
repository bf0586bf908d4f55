"""The trajectory ledger over random legal runs: whatever a scheduler does, ``check`` passes."""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pipelines.grpo.ledger import (
    ADMITTED,
    DROPPED,
    GENERATED,
    REFERENCED,
    REQUEUED,
    REWARDED,
    TRAINED,
    Ledger,
)


class LedgerMachine(RuleBasedStateMachine):
    """Drive the ledger like a scheduler: every record it leaves must pass ``check``."""

    @initialize(eta=st.integers(0, 2), batch=st.integers(1, 3))
    def setup(self, eta, batch):
        self.eta, self.batch = eta, batch
        self.ledger = Ledger()
        self.step = 0  # the next optimiser step, also the learner's weights version
        self.fresh = 0  # new samples minted so far
        self.sample: dict[int, str] = {}
        self.version: dict[int, int] = {}
        self.waiting: list[str] = []  # requeued samples not yet admitted again

    def _open(self, *states: str) -> list[int]:
        return [i for i in self.ledger.open_groups() if self.ledger.state(i) in states]

    def _admit(self, sample: str) -> None:
        group_id = self.ledger.next_group_id()
        self.ledger.admitted(group_id, sample)
        self.sample[group_id] = sample

    @rule()
    def admit_new(self):
        self._admit(f"e0:{self.fresh}")
        self.fresh += 1

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit_requeued(self, data):
        self._admit(self.waiting.pop(data.draw(st.integers(0, len(self.waiting) - 1))))

    def _advance(self, group_id: int, lag: int) -> None:
        """One stage on, stopping at rewarded (training happens in ``train_step``)."""
        state = self.ledger.state(group_id)
        if state == ADMITTED:  # a lag of eta + 1 makes a group that is stale at once
            self.version[group_id] = self.step - min(lag, self.step)
            self.ledger.generated(group_id, self.version[group_id])
        elif state == GENERATED:
            self.ledger.referenced(group_id)
        elif state == REFERENCED:
            self.ledger.rewarded(group_id)

    @precondition(lambda self: self._open(ADMITTED, GENERATED, REFERENCED))
    @rule(data=st.data(), stages=st.integers(1, 3))
    def advance_one(self, data, stages):
        group_id = data.draw(st.sampled_from(self._open(ADMITTED, GENERATED, REFERENCED)))
        for _ in range(stages):
            self._advance(group_id, data.draw(st.integers(0, self.eta + 1)))

    @precondition(lambda self: self._open(ADMITTED, GENERATED, REFERENCED))
    @rule(lag=st.integers(0, 3), stages=st.integers(1, 3))
    def advance_all(self, lag, stages):
        for group_id in self._open(ADMITTED, GENERATED, REFERENCED):
            for _ in range(stages):
                self._advance(group_id, lag)

    @precondition(lambda self: self.ledger.open_groups())
    @rule(data=st.data(), requeue=st.booleans())
    def fail(self, data, requeue):
        group_id = data.draw(st.sampled_from(self.ledger.open_groups()))
        if requeue:
            self.ledger.requeued(group_id, "actor died")
            self.waiting.append(self.sample[group_id])
        else:
            self.ledger.dropped(group_id, "bad data")

    @rule(now=st.integers(0, 3))
    def resume(self, now):
        """Now and then (it ends every open group) the run restarts mid-flight."""
        if now == 0:
            self.waiting += self.ledger.interrupt_open("resume")

    @precondition(lambda self: self._open(REWARDED))
    @rule()
    def train_step(self):
        """Drop what is too old for this step, then train a whole batch if one is left."""
        fresh = []
        for group_id in self._open(REWARDED):
            if self.step - self.version[group_id] > self.eta:
                self.ledger.dropped(group_id, "stale")
            else:
                fresh.append(group_id)
        if len(fresh) >= self.batch:
            for group_id in fresh[: self.batch]:
                self.ledger.trained(group_id, self.step)
            self.step += 1

    @invariant()
    def exactly_once(self):
        self.ledger.check(self.eta, batch_size=self.batch)

    @invariant()
    def counts_add_up(self):
        summary = self.ledger.summary()
        groups = len(self.sample)
        assert sum(summary["states"].values()) == summary["groups"] == groups
        assert summary["trained_samples"] == summary["states"][TRAINED] == self.step * self.batch
        assert summary["steps"] == self.step and summary["samples"] == self.fresh
        assert sum(summary["staleness"].values()) == self.step * self.batch
        assert all(0 <= int(lag) <= self.eta for lag in summary["staleness"])
        assert sum(summary["requeued_by_reason"].values()) == summary["states"][REQUEUED]
        assert sum(summary["dropped_by_reason"].values()) == summary["states"][DROPPED]
        assert sum(self.ledger.attempts(f"e0:{k}") for k in range(self.fresh)) == groups
        assert self.ledger.next_group_id() == groups

    def teardown(self):
        if hasattr(self, "ledger"):
            again = Ledger.from_dict(self.ledger.to_dict())
            assert again.summary() == self.ledger.summary()
            assert again.open_groups() == self.ledger.open_groups()


LedgerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestLedgerMachine = LedgerMachine.TestCase
