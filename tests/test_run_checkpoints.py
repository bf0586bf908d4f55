"""Run checkpoints without Ray: complete ones are found, torn ones skipped with the reason; the
data cursor, metrics and `--resume` config pick up where the run stopped."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pipelines.cli import config_source
from pipelines.grpo.ledger import Ledger
from pipelines.grpo.metrics_log import MetricsLog, read_metrics
from pipelines.grpo.prompts import PromptStream
from pipelines.grpo.run_checkpoints import Checkpointer, latest_checkpoint, run_ledger


class FakeLearner:
    """Saves like a LearnerGroup: two shard files under ``directory/tag``, listed relative to ``directory``."""

    def __init__(self, events: list[str] | None = None):
        self.events = [] if events is None else events

    def save_checkpoint(self, directory: str, tag: str) -> list[str]:
        shard = Path(directory) / tag
        shard.mkdir(parents=True)
        (shard / "model_states.pt").write_bytes(b"w" * (100 + int(tag.removeprefix("step"))))
        (shard / "optim_states.pt").write_bytes(b"o" * 50)
        self.events.append(f"learner {tag}")
        return [f"{tag}/model_states.pt", f"{tag}/optim_states.pt"]


def fake_checkpoint(folder, step: int, keep: int = 3) -> Ledger:
    """A learner folder with two shard files, plus the driver's state and a ledger of one trained group."""
    ledger = Ledger()
    ledger.admitted(step, f"e0:{step}")
    ledger.admitted(step + 100, f"e0:{step + 100}")  # still in flight
    for advance in (lambda: ledger.generated(step, step - 1), lambda: ledger.referenced(step),
                    lambda: ledger.rewarded(step), lambda: ledger.trained(step, step - 1)):
        advance()
    state = {"prompts": {"epoch": 0, "position": step}}
    Checkpointer(folder, step, keep, FakeLearner(), lambda: (state, ledger)).save(step)
    return ledger


def test_a_checkpoint_is_saved_every_n_steps_the_learner_first(tmp_path):
    events = []

    def snapshot():
        events.append("snapshot")
        return {"prompts": {}}, Ledger()

    checkpointer = Checkpointer(tmp_path, 2, 5, FakeLearner(events), snapshot)
    for step in range(1, 6):
        checkpointer(step)
    assert events == ["learner step2", "snapshot", "learner step4", "snapshot"]
    assert latest_checkpoint(tmp_path).step == 4


def test_the_newest_complete_checkpoint_is_found(tmp_path):
    for step in (2, 4):
        fake_checkpoint(tmp_path, step)
    said = []
    found = latest_checkpoint(tmp_path, said.append)
    assert (found.step, found.tag, found.state["prompts"]["position"]) == (4, "step4", 4)
    assert found.ledger.open_groups() == [104] and not said


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "step4" / "optim_states.pt").write_bytes(b"o" * 10), "step4/optim_states.pt has 10 bytes, the manifest says 50"),
    (lambda d: (d / "step4" / "model_states.pt").unlink(), "missing file step4/model_states.pt"),
    (lambda d: (d / "step4.manifest.json").unlink(), "no manifest"),
    (lambda d: (d / "step4.manifest.json").write_text("{"), "unreadable manifest"),
    (lambda d: (d / "step4.ledger.json").write_text(" " * (d / "step4.ledger.json").stat().st_size), "ledger"),
])
def test_a_torn_newest_checkpoint_is_skipped_with_the_reason(tmp_path, damage, message):
    for step in (2, 4):
        fake_checkpoint(tmp_path, step)
    damage(tmp_path)
    said = []
    assert latest_checkpoint(tmp_path, said.append).step == 2
    assert len(said) == 1 and f"skipping checkpoint {tmp_path / 'step4'}" in said[0] and message in said[0]


def test_a_crash_before_the_manifest_leaves_no_complete_checkpoint(tmp_path):
    (tmp_path / "step2").mkdir()
    (tmp_path / "step2" / "model_states.pt").write_bytes(b"partial")
    said = []
    assert latest_checkpoint(tmp_path, said.append) is None and "no manifest" in said[0]
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step6", "step6.ledger.json", "step6.manifest.json", "step6.state.json",
        "step8", "step8.ledger.json", "step8.manifest.json", "step8.state.json"]


def test_run_ledger_prefers_the_final_ledger_and_needs_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a `segrl train` output folder"):
        run_ledger(tmp_path)
    (tmp_path / "config.yaml").write_text("train:\n  staleness: 2\n")
    with pytest.raises(FileNotFoundError, match="no ledger yet"):
        run_ledger(tmp_path)
    fake_checkpoint(tmp_path / "checkpoints", 2)
    ledger, source, eta = run_ledger(tmp_path)
    assert eta == 2 and "checkpoint step2" in source and ledger.open_groups() == [102]
    final = Ledger()
    final.save(tmp_path / "ledger.json")
    assert "finished run" in run_ledger(tmp_path)[1]
    (tmp_path / "config.yaml").write_text("train:\n  staleness: 2\n  staleness_mode: admission\n")
    assert run_ledger(tmp_path)[2] is None  # no per-group bound to check


def test_prompt_stream_hands_requeued_samples_out_first_and_resumes_its_cursor():
    rows = [{"sample_id": f"s{i}", "image_hash": "h", "prompt_ids": [1, 2], "gt_masks": [], "no_target": False}
            for i in range(5)]
    stream = PromptStream(rows, seed=3)
    _, first = stream.take(range(3))
    stream.requeue(first[1:])
    batch, again = stream.take(range(3, 6))
    assert again[:2] == first[1:] and again[2].startswith("e0:") and again[2] not in first
    assert batch.column("sample_id").to_pylist() == [f"s{int(k.split(':')[1])}" for k in again]
    assert batch.column("group_id").to_pylist() == [3, 4, 5]  # the scheduler's ids, in order
    stream.requeue(["e0:4"])
    copy = PromptStream(rows, seed=3)
    copy.restore(json.loads(json.dumps(stream.state())))
    assert copy.take(range(6, 10))[1] == stream.take(range(6, 10))[1]  # crosses into epoch 1 the same way
    with pytest.raises(ValueError, match="training split is empty"):
        PromptStream([], seed=0)


def test_resumed_metrics_drop_the_rolled_back_steps(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log(step, {"reward": {"total": step / 10}})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # killed mid-write
    log = MetricsLog(tmp_path, tensorboard=False, resume_after=3)
    log.log(4, {"reward": {"total": 0.9}})
    log.close()
    assert [(r["step"], r["reward/total"]) for r in read_metrics(tmp_path)] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.9)]


def test_resume_reads_the_runs_own_config_and_keeps_its_folder(tmp_path):
    args = argparse.Namespace(config=None, overrides=["train.steps=9"], resume=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.yaml there"):
        config_source(args)
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    assert config_source(args) == (str(tmp_path / "config.yaml"), ["train.steps=9", f"train.output={tmp_path}"])
    plain = argparse.Namespace(config=None, overrides=[], resume=None)
    assert config_source(plain) == ("configs/tiny.yaml", [])


def test_segrl_ledger_prints_the_summary_and_the_check(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["ledger", str(tmp_path)]) == 2
    assert "not a `segrl train` output folder" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("train:\n  staleness: 1\n")
    fake_checkpoint(tmp_path / "checkpoints", 4)
    assert main(["ledger", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step4" in out and "trained 1" in out and "exactly-once check: passed (staleness bound eta=1)" in out
