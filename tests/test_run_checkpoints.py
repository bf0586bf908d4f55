"""Run checkpoints without Ray: complete ones are found, torn or damaged ones skipped with the reason;
the data cursor, metrics and `--resume` config pick up where the run stopped."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from config import ConfigError
from data.integrity import describe, files_under
from pipelines.cli import config_source
from pipelines.grpo.handoff import LearnerFailure
from pipelines.grpo.ledger import Ledger
from pipelines.grpo.metrics_log import MetricsLog, read_metrics
from pipelines.grpo.prompts import PromptStream
from pipelines.grpo.run_checkpoints import Checkpointer, latest_checkpoint, run_ledger


class FakeLearner:
    """Saves like a LearnerGroup: two torch files of plain data under ``directory/tag``, described with
    names relative to ``directory``."""

    def __init__(self, events: list[str] | None = None):
        self.events = [] if events is None else events

    def save_checkpoint(self, directory: str, tag: str) -> dict[str, dict]:
        shard = Path(directory) / tag
        shard.mkdir(parents=True)
        torch.save({"module": torch.full((100 + int(tag.removeprefix("step")),), 1.0)}, shard / "model_states.pt")
        torch.save({"optimizer_state_dict": {"exp_avg": torch.zeros(50)}}, shard / "optim_states.pt")
        self.events.append(f"learner {tag}")
        return describe(directory, files_under(directory, tag))


def trained_ledger(steps: list[int], in_flight: int | None = None) -> Ledger:
    """One group trained at each of ``steps`` (group id = step + 1), plus group ``in_flight`` still open."""
    ledger = Ledger()
    for step in steps:
        group = step + 1
        ledger.admitted(group, f"e0:{group}")
        ledger.generated(group, step)
        ledger.referenced(group)
        ledger.rewarded(group)
        ledger.trained(group, step)
    if in_flight is not None:
        ledger.admitted(in_flight, f"e0:{in_flight}")
    return ledger


def fake_checkpoint(folder, step: int, keep: int = 3, ledger: Ledger | None = None) -> Ledger:
    """A learner folder with two shard files, plus the driver's state and a ledger (default: one group
    trained at the last step, one in flight)."""
    ledger = trained_ledger([step - 1], in_flight=step + 100) if ledger is None else ledger
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


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def sizes_only(manifest: Path) -> None:
    """The manifest as segrl wrote it before content hashes."""
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({"step": doc["step"], "files": {n: e["size"] for n, e in doc["files"].items()}}))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "step4" / "optim_states.pt").write_bytes((d / "step4" / "optim_states.pt").read_bytes()[:10]),
     "step4/optim_states.pt: 10 bytes, step4.manifest.json says"),
    (lambda d: (d / "step4" / "model_states.pt").unlink(),
     "step4/model_states.pt: missing (listed in step4.manifest.json)"),
    (lambda d: flip_a_bit(d / "step4" / "model_states.pt"), "step4/model_states.pt: damaged (its SHA-256 differs"),
    (lambda d: (d / "step4" / "extra.pt").write_bytes(b"x"), "step4/extra.pt: not listed in step4.manifest.json"),
    (lambda d: (d / "step4.manifest.json").unlink(), "no manifest"),
    (lambda d: (d / "step4.manifest.json").write_text("{"), "unreadable manifest"),
    (lambda d: sizes_only(d / "step4.manifest.json"), "has no size and SHA-256 (written by an older segrl?)"),
    (lambda d: (d / "step4.ledger.json").write_text(" " * (d / "step4.ledger.json").stat().st_size),
     "step4.ledger.json: damaged"),
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


@pytest.mark.parametrize("failure", [RayActorError(), GetTimeoutError("a rank hung")])
def test_a_learner_failing_while_it_saves_fails_the_attempt_and_leaves_the_last_checkpoint(tmp_path, failure):
    """The run's driver resumes from its last checkpoint on a LearnerFailure; any other error ends the run."""
    fake_checkpoint(tmp_path, 2)

    class DyingLearner(FakeLearner):
        def save_checkpoint(self, directory: str, tag: str) -> dict[str, dict]:
            super().save_checkpoint(directory, tag)  # some files are written, then a rank dies
            raise failure

    snapshots = []
    checkpointer = Checkpointer(tmp_path, 2, 1, DyingLearner(), lambda: snapshots.append(1) or ({}, Ledger()))
    with pytest.raises(LearnerFailure, match=f"saving checkpoint step4 failed: {type(failure).__name__}"):
        checkpointer(4)
    assert snapshots == [] and latest_checkpoint(tmp_path, lambda _: None).step == 2  # keep=1 deleted nothing


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
    run = run_ledger(tmp_path)
    assert (run.eta, run.batch_size) == (2, 16) and "checkpoint step2" in run.source
    assert run.ledger.open_groups() == [102]
    final = Ledger()
    final.save(tmp_path / "ledger.json")
    assert "finished run" in run_ledger(tmp_path).source
    (tmp_path / "config.yaml").write_text("train:\n  staleness: 2\n  staleness_mode: admission\n")
    assert run_ledger(tmp_path).eta is None  # no per-group bound to check
    (tmp_path / "config.yaml").write_text("train:\n  stalenes: 2\n")
    with pytest.raises(ConfigError, match="stalenes"):
        run_ledger(tmp_path)


def test_run_ledger_checks_only_the_drivers_files_of_a_checkpoint(tmp_path):
    (tmp_path / "config.yaml").write_text("train:\n  staleness: 2\n")
    fake_checkpoint(tmp_path / "checkpoints", 2)
    flip_a_bit(tmp_path / "checkpoints" / "step2" / "model_states.pt")
    assert latest_checkpoint(tmp_path / "checkpoints", [].append) is None  # no resume from it
    assert "checkpoint step2" in run_ledger(tmp_path).source  # its ledger is intact
    flip_a_bit(tmp_path / "checkpoints" / "step2.ledger.json")
    with pytest.raises(FileNotFoundError, match="no ledger yet"):
        run_ledger(tmp_path)


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
    log = MetricsLog(tmp_path, ["jsonl"])
    for step in range(1, 6):
        log.log(step, {"reward": {"total": step / 10}})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # killed mid-write
    log = MetricsLog(tmp_path, ["jsonl"], resume_after=3)
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
    (tmp_path / "config.yaml").write_text(
        "train:\n  staleness: 1\n  groups_per_call: 1\ngrpo:\n  prompts_per_step: 1\n")
    fake_checkpoint(tmp_path / "checkpoints", 4, ledger=trained_ledger([0, 1, 2, 3], in_flight=9))
    assert main(["ledger", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step4" in out and "trained 4" in out
    assert "exactly-once check: passed (staleness bound eta=1, 1 groups every step)" in out
    fake_checkpoint(tmp_path / "checkpoints", 6, ledger=trained_ledger([0, 5]))  # steps 1-4 trained nothing
    assert main(["ledger", str(tmp_path)]) == 2
    assert "steps [1, 2, 3, 4] trained nothing (4 skipped)" in capsys.readouterr().err
