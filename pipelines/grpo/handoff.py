"""What the scheduler and the pipeline's stages hand each other: the calls' outputs
(``Handoff``), the stages' interface (``Stages``), the phase names, the record of each learner
step and of the run.

Kept apart from ``pipelines.grpo.scheduler`` so that the stages, the run log and the elastic
pool can speak of a step without importing the event loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import ray

ROLLOUT, REFERENCE, REWARD, LEARN, SYNC = "rollout", "reference", "reward", "learn", "sync"


@dataclass(frozen=True)
class Handoff:
    """A stage call's outputs: ``data`` stays in the object store, ``meta`` is a small dict."""

    data: ray.ObjectRef
    meta: ray.ObjectRef
    worker: str | None = None  # the actor running the call: recovery and the watchdog
    samples: tuple[str, ...] = ()  # rollout only: the data key of each group, in order
    watch: tuple[ray.ObjectRef, ...] = ()  # more small refs whose failure fails the call (other learner ranks)


class LearnerFailure(RuntimeError):
    """A learner step failed (a rank died or hung): the run must resume from a checkpoint."""


class Stages(Protocol):
    """The pipeline's stages as the scheduler sees them; every call returns at once."""

    def rollout(self, group_ids: list[int]) -> Handoff:
        """Sample the groups; meta has ``weights_version``, the version that sampled them."""

    def reference(self, data: ray.ObjectRef) -> Handoff:
        """Reference logprobs and masks for a rollout batch."""

    def reward(self, data: ray.ObjectRef) -> Handoff:
        """Rewards and advantages; ``data`` is what the learner trains on."""

    def learn(self, step: int, data: list[ray.ObjectRef]) -> Handoff:
        """One optimiser step on the batches; data is the exported weights, meta the metrics."""

    def sync(self, weights: ray.ObjectRef, version: int) -> list[ray.ObjectRef | tuple[ray.ObjectRef, str]]:
        """Push the weights to the rollout pool and the reference actors; an ack ref (or (ref, actor)) per copy."""

    def requeue(self, samples: list[str]) -> None:
        """Give these data keys out again, before any new ones."""

    def recover(self, worker: str) -> bool:
        """Replace the failed actor ``worker``; False if it was already replaced."""

    def kill(self, worker: str) -> None:
        """Kill a stalled actor; its calls then fail and take the failure path."""


@dataclass
class StepRecord:
    """What one learner step trained and how long the learner waited for it."""

    step: int
    metrics: dict  # the learner's metadata
    staleness: dict[int, int]  # s - v -> groups
    rewards: list[dict]  # the reward stage's metadata of each chunk
    groups: int
    wait_s: float  # learner idle before this step
    learn_s: float
    faults: dict = field(default_factory=dict)  # run totals so far: failures, restarts, retries, stalls
    interrupted_updates: int = 0  # engine weight loads that landed inside a running call, since the last step


@dataclass
class RunReport:
    steps: list[StepRecord]
    admission: dict  # StalenessController.stats()
    phases: dict  # PhaseTimer.report(): busy/idle per stage, queue lengths
    wall_s: float
