"""A running GRPO run publishes its model (which steps, in what order) and `serve --follow` takes each one
as a snapshot that stays whole while the run renames the next one in. Ray-free, seconds; the real run's
publishes are checked in test_train.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ray.exceptions import RayActorError

from config.schema import TrainConfig
from data.atomic import atomic_folder
from models.segmenter import write_manifest
from pipelines.grpo.handoff import LearnerFailure
from pipelines.grpo.publish import Publisher, after_step, publish_interval, publishes
from pipelines.serve.follow import KEPT, Follower


@given(st.integers(0, 40), st.integers(1, 200))
def test_the_publishing_steps_are_the_multiples_short_of_the_end(every, total):
    steps = [s for s in range(1, total + 1) if publishes(s, every, total)]
    assert steps == (list(range(every, total, every)) if every else [])
    assert total not in steps  # the end-of-run save writes the last step's weights


def test_by_default_a_run_publishes_with_each_checkpoint():
    assert publish_interval(TrainConfig(checkpoint_every=7)) == 7
    assert publish_interval(TrainConfig(checkpoint_every=7, publish_every=3)) == 3
    assert publish_interval(TrainConfig(checkpoint_every=7, publish_every=0)) == 0


class Recorder:
    """Stands in for the LearnerGroup and the Checkpointer: records the calls, in order."""

    def __init__(self, calls: list):
        self.calls = calls

    def save_model(self, directory: str) -> str:
        self.calls.append(("publish", directory))
        return directory

    def __call__(self, step: int) -> None:
        self.calls.append(("checkpoint", step))


def test_the_run_log_checkpoints_then_publishes(tmp_path):
    calls: list = []
    recorder = Recorder(calls)
    hook = after_step(recorder, Publisher(tmp_path / "model", 2, 5, recorder))
    for step in range(1, 6):
        hook(step)
    model = str(tmp_path / "model")
    assert calls == [("checkpoint", 1), ("checkpoint", 2), ("publish", model), ("checkpoint", 3),
                     ("checkpoint", 4), ("publish", model), ("checkpoint", 5)]


def test_a_learner_dying_while_it_publishes_fails_the_attempt_not_the_run(tmp_path):
    """The run's driver resumes from its last checkpoint on a LearnerFailure; any other error ends the run."""

    class DeadRank:
        def save_model(self, directory: str) -> str:
            raise RayActorError()

    with pytest.raises(LearnerFailure, match="publishing the model after step 2 failed: RayActorError"):
        Publisher(tmp_path / "model", 2, 5, DeadRank())(2)


def publish(folder, weights: bytes) -> None:
    """What save_model does to RUN/model: a whole folder written beside, manifest last, renamed in."""
    with atomic_folder(folder) as tmp:
        (tmp / "model.safetensors").write_bytes(weights)
        (tmp / "head").mkdir()
        (tmp / "head" / "config.json").write_text(json.dumps({"kind": "segcompass"}))
        write_manifest(tmp)


def test_a_follower_serves_each_published_folder_as_a_snapshot_that_stays_whole(tmp_path):
    said: list[str] = []
    follower = Follower(tmp_path, said.append)
    assert follower.poll() is None  # nothing published yet
    publish(tmp_path / "model", b"step 2")
    first, version = follower.poll()
    assert version == 1 and Path(first).parent.parent == (tmp_path / "serving").resolve()
    assert os.path.samefile(os.path.join(first, "model.safetensors"), tmp_path / "model" / "model.safetensors")
    assert follower.poll() is None  # the same manifest: nothing new
    publish(tmp_path / "model", b"step 4")
    second, version = follower.poll()
    assert version == 2 and second != first
    with open(os.path.join(first, "model.safetensors"), "rb") as old, \
            open(os.path.join(second, "model.safetensors"), "rb") as new:
        assert (old.read(), new.read()) == (b"step 2", b"step 4")  # the replaced folder's snapshot is intact
    publish(tmp_path / "model", b"step 6")
    third, version = follower.poll()
    assert version == 3 and os.path.isdir(third) and os.path.isdir(second) and not os.path.exists(first)
    assert KEPT == 2
    assert said == []
    follower.close()
    assert not (tmp_path / "serving").exists() and (tmp_path / "model").is_dir()


def test_a_damaged_folder_is_reported_once_and_not_served(tmp_path):
    said: list[str] = []
    follower = Follower(tmp_path, said.append)
    publish(tmp_path / "model", b"step 2")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"step 3")  # same size, other bytes
    assert follower.poll() is None and follower.poll() is None
    assert len(said) == 1 and "model.safetensors: damaged" in said[0]
    assert not any((tmp_path / "serving").rglob("v1"))
    publish(tmp_path / "model", b"step 4")
    assert follower.poll()[1] == 1
