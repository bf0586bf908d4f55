"""A running GRPO run publishes its model, so that `segrl serve --follow RUN` serves it as it trains.

Rule (``publishes``): after N steps trained, the learner writes its model folder to ``RUN/model``
when ``every`` divides N and N is short of the run's ``total`` steps; the last step is left to
the end-of-run save, which writes the same weights. ``every`` is ``train.publish_every``, by
default ``train.checkpoint_every`` (``publish_interval``): a published model is then always
the weights of a complete checkpoint (the run log checkpoints first, then publishes), and it
costs less than the checkpoint beside it (the gathered weights once, not every rank's
weights and optimizer state). 0 publishes nothing before the end.

The writer is the final model's (``LearnerGroup.save_model``: ``save_segmenter``, its
``manifest.json`` last), and it writes into a temporary folder beside ``RUN/model`` and renames
it in (``data.atomic.atomic_folder``): a reader finds the previous folder, briefly none, or the
new one, each whole; ``serve.follow.Follower`` picks up each new manifest.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ray.exceptions import RayError

from config.schema import TrainConfig
from pipelines.grpo.handoff import LearnerFailure

MODEL = "model"
"""The run folder's servable model folder (mid-run and final)."""


def publish_interval(train: TrainConfig) -> int:
    """Steps between two publishes (0: none before the end)."""
    return train.checkpoint_every if train.publish_every is None else train.publish_every


def publishes(step: int, every: int, total: int) -> bool:
    """Whether the model is published after ``step`` steps trained of ``total``."""
    return every > 0 and step % every == 0 and step < total


class Publisher:
    """Called with the steps trained after each step; writes ``folder`` when ``publishes`` says so.

    A learner rank that dies while it writes fails the run's attempt as a failed step does
    (``LearnerFailure``: the run resumes from its last checkpoint), not the run."""

    def __init__(self, folder: Path, every: int, total: int, learner):
        self.folder, self.every, self.total, self.learner = folder, every, total, learner

    def __call__(self, step: int) -> None:
        if publishes(step, self.every, self.total):
            try:
                self.learner.save_model(str(self.folder))
            except RayError as exc:
                raise LearnerFailure(f"publishing the model after step {step} failed: "
                                     f"{type(exc).__name__}") from exc


def after_step(*hooks: Callable[[int], None]) -> Callable[[int], None]:
    """One callable running ``hooks`` in order with the steps trained (checkpoint, then publish)."""

    def run(step: int) -> None:
        for hook in hooks:
            hook(step)

    return run
