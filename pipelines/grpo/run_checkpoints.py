"""A GRPO run's checkpoint folder: its format, written so a crash can never leave a checkpoint that looks complete.

This module owns the format; ``resume`` restores a run from a checkpoint, and the learner
only writes (reads) the DeepSpeed folder it is handed. In ``<run>/checkpoints``, the
checkpoint ``step<N>`` (N steps trained) is

- ``step<N>/``: the learner's DeepSpeed checkpoint (every rank's partitions of the weights
  and AdamW state, the schedule, the step counter, each rank's RNG states);
- ``step<N>.state.json``: the driver's state (``step``, data cursor, fault counters);
- ``step<N>.ledger.json``: the trajectory ledger;
- ``step<N>.manifest.json``, written last: every file above with its size.

Each JSON file is written atomically. Only a checkpoint whose manifest exists and matches
the files on disk, and whose state and ledger load, counts; resuming takes the newest such
one and says why it skipped any newer.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data.atomic import write_atomic
from pipelines.grpo.ledger import Ledger, LedgerError

TAG = re.compile(r"^step(\d+)$")  # a checkpoint of N steps trained is step<N>


def _name(tag: str, kind: str) -> str:
    """A checkpoint's JSON file beside its DeepSpeed folder: kind is state, ledger or manifest."""
    return f"{tag}.{kind}.json"


@dataclass
class RunCheckpoint:
    folder: Path  # the run's checkpoints folder (DeepSpeed's save dir)
    tag: str
    step: int
    state: dict  # the driver's state
    ledger: Ledger

    @property
    def manifest(self) -> Path:
        return self.folder / _name(self.tag, "manifest")


def write_json_atomic(path: Path, payload: dict) -> None:
    """A crash leaves the old file or the new one (``data.atomic``)."""
    write_atomic(path, json.dumps(payload))


class Checkpointer:
    """Saves ``step<N>`` after every ``every``-th step (the run log calls it with N, steps trained).

    ``learner`` (a LearnerGroup) writes its DeepSpeed folder first; ``snapshot()`` -> (driver
    state, ledger) is taken next, still between two learner steps, so both agree.
    """

    def __init__(self, folder: Path, every: int, keep: int, learner, snapshot: Callable[[], tuple[dict, Ledger]]):
        self.folder, self.every, self.keep, self.learner, self.snapshot = folder, every, keep, learner, snapshot

    def __call__(self, step: int) -> None:
        if step % self.every == 0:
            self.save(step)

    def save(self, step: int) -> None:
        """Write ``step<step>``, manifest last, then delete all but the newest ``keep`` tags."""
        folder, tag = self.folder, f"step{step}"
        learner_files = self.learner.save_checkpoint(str(folder), tag)  # relative to folder
        state, ledger = self.snapshot()
        write_json_atomic(folder / _name(tag, "state"), {"step": step, **state})
        ledger.save(folder / _name(tag, "ledger"))
        files = [*learner_files, _name(tag, "state"), _name(tag, "ledger")]
        write_json_atomic(folder / _name(tag, "manifest"),
                          {"step": step, "files": {f: (folder / f).stat().st_size for f in files}})
        for old in [c for c in _tags(folder)][self.keep:]:
            _delete(folder, old)


def latest_checkpoint(folder: Path, say: Callable[[str], None] = print) -> RunCheckpoint | None:
    """The newest complete checkpoint in ``folder`` (None if there is none); each newer one
    that is torn or corrupt is reported through ``say`` with what is wrong."""
    for tag in _tags(folder):
        try:
            return _load(folder, tag)
        except CheckpointError as exc:
            say(f"[segrl] skipping checkpoint {folder / tag}: {exc}")
    return None


def run_ledger(run_dir: Path) -> tuple[Ledger, str, int | None]:
    """A run's latest ledger: (ledger, where it came from, the staleness bound every trained group
    must meet: eta, or None when the run bounded admission only).

    The final ``ledger.json`` of a finished run, or the newest complete checkpoint's of a
    run that stopped (or is still going).
    """
    import yaml

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a `segrl train` output folder (no config.yaml)")
    train = yaml.safe_load(config.read_text())["train"]
    eta = int(train["staleness"]) if train.get("staleness_mode", "strict") == "strict" else None
    final = run_dir / "ledger.json"
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if final.is_file() and (checkpoint is None or final.stat().st_mtime >= checkpoint.manifest.stat().st_mtime):
        return Ledger.load(final), f"ledger of the finished run: {final}", eta
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no ledger yet (no ledger.json, no complete checkpoint)")
    return checkpoint.ledger, f"ledger at checkpoint {checkpoint.tag} ({checkpoint.step} steps)", eta


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (partly written, files missing or damaged)."""


def _load(folder: Path, tag: str) -> RunCheckpoint:
    manifest = folder / _name(tag, "manifest")
    if not manifest.is_file():
        raise CheckpointError("no manifest (the run stopped while writing it)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable manifest {manifest.name}: {exc}") from exc
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"missing file {name}")
        if path.stat().st_size != size:
            raise CheckpointError(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
    try:
        state = json.loads((folder / _name(tag, "state")).read_text())
        ledger = Ledger.load(folder / _name(tag, "ledger"))
    except (ValueError, LedgerError) as exc:
        raise CheckpointError(str(exc)) from exc
    return RunCheckpoint(folder, tag, int(state["step"]), state, ledger)


def _tags(folder: Path) -> list[str]:
    """Checkpoint tags in ``folder``, newest first (complete or not)."""
    if not folder.is_dir():
        return []
    tags = {m.group(0) for p in folder.iterdir() if (m := TAG.match(p.name.split(".")[0]))}
    return sorted(tags, key=lambda t: -int(TAG.match(t).group(1)))


def _delete(folder: Path, tag: str) -> None:
    shutil.rmtree(folder / tag, ignore_errors=True)
    for suffix in ("manifest", "state", "ledger"):
        (folder / _name(tag, suffix)).unlink(missing_ok=True)
