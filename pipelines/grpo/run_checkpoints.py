"""A GRPO run's checkpoint folder: its format, written so a crash can never leave a checkpoint that
looks complete, and read so that a damaged or crafted one is never loaded.

This module owns the format; ``resume`` restores a run from a checkpoint, and the learner
only writes (reads) the DeepSpeed folder it is handed. In ``<run>/checkpoints``, the
checkpoint ``step<N>`` (N steps trained) is

- ``step<N>/``: the learner's DeepSpeed checkpoint (every rank's partitions of the weights
  and AdamW state, the schedule, the step counter, each rank's RNG states), torch zip
  files holding tensors and plain data only (``models.learner_checkpoint``);
- ``step<N>.state.json``: the driver's state (``step``, data cursor, fault counters);
- ``step<N>.ledger.json``: the trajectory ledger;
- ``step<N>.manifest.json``, written last: ``{"format": 2, "step": N, "files": {name:
  {"size": bytes, "sha256": hex}}}`` for every file above (names relative to the folder).

Each JSON file is written atomically. A checkpoint counts only when its manifest lists
exactly the files on disk (none missing, none added), each of its size and SHA-256, and
its state and ledger load; resuming takes the newest such one and says why it skipped
any newer (a run killed mid-save, a torn or bit-flipped file). A checkpoint whose files
match their hashes but refer to code (``UnsafeCheckpointError``) is refused outright: no
crash writes one. Everything is checked before any learner loads a byte.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray.exceptions import RayError

from data.atomic import write_atomic
from data.integrity import IntegrityError, describe, files_under, verify
from models.learner_checkpoint import check_globals
from pipelines.grpo.handoff import LearnerFailure
from pipelines.grpo.ledger import Ledger, LedgerError

TAG = re.compile(r"^step(\d+)$")  # a checkpoint of N steps trained is step<N>
FORMAT = 2  # 1: sizes only


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

    ``learner`` (a LearnerGroup) writes its DeepSpeed folder first and returns its files,
    ``describe``d; ``snapshot()`` -> (driver state, ledger) is taken next, still between two
    learner steps, so both agree. A rank that dies or hangs while it writes fails the run's
    attempt as a failed step does (``LearnerFailure``: the run resumes from its last complete
    checkpoint; this one, without a manifest, does not count), not the run.
    """

    def __init__(self, folder: Path, every: int, keep: int, learner, snapshot: Callable[[], tuple[dict, Ledger]]):
        self.folder, self.every, self.keep, self.learner, self.snapshot = folder, every, keep, learner, snapshot

    def __call__(self, step: int) -> None:
        if step % self.every == 0:
            self.save(step)

    def save(self, step: int) -> None:
        """Write ``step<step>``, manifest last, then delete all but the newest ``keep`` tags."""
        folder, tag = self.folder, f"step{step}"
        try:
            learner_files = self.learner.save_checkpoint(str(folder), tag)  # relative to folder
        except RayError as exc:  # a rank died or hung: the attempt fails, the run resumes from the last one
            raise LearnerFailure(f"saving checkpoint {tag} failed: {type(exc).__name__}") from exc
        state, ledger = self.snapshot()
        write_json_atomic(folder / _name(tag, "state"), {"step": step, **state})
        ledger.save(folder / _name(tag, "ledger"))
        files = {**learner_files, **describe(folder, [_name(tag, "state"), _name(tag, "ledger")])}
        write_json_atomic(folder / _name(tag, "manifest"), {"format": FORMAT, "step": step, "files": files})
        for old in checkpoint_tags(folder)[self.keep:]:
            _delete(folder, old)


def latest_checkpoint(folder: Path, say: Callable[[str], None] = print,
                      learner_files: bool = True) -> RunCheckpoint | None:
    """The newest complete checkpoint in ``folder`` (None if there is none); each newer one
    that is torn or damaged is reported through ``say`` with what is wrong.

    Raises ``UnsafeCheckpointError`` for a checkpoint whose files refer to code.
    ``learner_files=False`` checks only the driver's JSON files (a reader of the ledger
    need not hash the learner's weights and optimizer state).
    """
    for tag in checkpoint_tags(folder):
        try:
            return _load(folder, tag, learner_files)
        except CheckpointError as exc:
            say(f"[segrl] skipping checkpoint {folder / tag}: {exc}")
    return None


@dataclass
class RunLedger:
    """A run's latest ledger, where it came from, and what ``Ledger.check`` needs to judge it."""

    ledger: Ledger
    source: str
    eta: int | None  # the staleness bound every trained group must meet; None: the run bounded admission only
    batch_size: int  # groups every step trains (grpo.prompts_per_step)


def run_ledger(run_dir: Path) -> RunLedger:
    """The final ``ledger.json`` of a finished run, or the newest complete checkpoint's of a
    run that stopped (or is still going), with the run's bounds from its ``config.yaml``."""
    from config import load_config

    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a `segrl train` output folder (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    eta = config.train.staleness if config.train.staleness_mode == "strict" else None
    final = run_dir / "ledger.json"
    checkpoint = latest_checkpoint(run_dir / "checkpoints", learner_files=False)
    if final.is_file() and (checkpoint is None or final.stat().st_mtime >= checkpoint.manifest.stat().st_mtime):
        ledger, source = Ledger.load(final), f"ledger of the finished run: {final}"
    elif checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no ledger yet (no ledger.json, no complete checkpoint)")
    else:
        ledger, source = checkpoint.ledger, f"ledger at checkpoint {checkpoint.tag} ({checkpoint.step} steps)"
    return RunLedger(ledger, source, eta, config.grpo.prompts_per_step)


class CheckpointError(IntegrityError):
    """A checkpoint that cannot be used (partly written, files missing, added or damaged)."""


def _load(folder: Path, tag: str, learner_files: bool = True) -> RunCheckpoint:
    manifest = folder / _name(tag, "manifest")
    if not manifest.is_file():
        raise CheckpointError("no manifest (the run stopped while writing it)")
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable manifest {manifest.name}: {exc}") from exc
    driver = [_name(tag, "state"), _name(tag, "ledger")]
    if not learner_files and isinstance(listed, dict):
        listed = {n: listed.get(n) for n in driver}
    present = [n for n in driver if (folder / n).is_file()] + (files_under(folder, tag) if learner_files else [])
    try:
        verify(folder, listed, present, manifest.name)
    except IntegrityError as exc:
        raise CheckpointError(str(exc)) from None
    if learner_files:
        for name in files_under(folder, tag):
            check_globals(folder / name)
    try:
        state = json.loads((folder / _name(tag, "state")).read_text())
        ledger = Ledger.load(folder / _name(tag, "ledger"))
        step = int(state["step"])
    except (ValueError, KeyError, TypeError, LedgerError) as exc:
        raise CheckpointError(f"{_name(tag, 'state')} or {_name(tag, 'ledger')}: {exc}") from exc
    if step != int(TAG.match(tag).group(1)):
        raise CheckpointError(f"{_name(tag, 'state')} says step {step}")
    return RunCheckpoint(folder, tag, step, state, ledger)


def checkpoint_tags(folder: Path) -> list[str]:
    """Checkpoint tags in ``folder``, newest first (complete or not)."""
    if not folder.is_dir():
        return []
    tags = {m.group(0) for p in folder.iterdir() if (m := TAG.match(p.name.split(".")[0]))}
    return sorted(tags, key=lambda t: -int(TAG.match(t).group(1)))


def _delete(folder: Path, tag: str) -> None:
    shutil.rmtree(folder / tag, ignore_errors=True)
    for suffix in ("manifest", "state", "ledger"):
        (folder / _name(tag, suffix)).unlink(missing_ok=True)
