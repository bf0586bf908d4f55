"""A GRPO run's checkpoints: written so a crash can never leave one that looks complete.

A checkpoint ``step<N>`` (N steps trained) is the learner's DeepSpeed folder, the
driver's state (data cursor, controller counters, fault counters) and the trajectory
ledger, each written atomically, and last a manifest naming every file with its size.
Only a checkpoint whose manifest exists and matches the files on disk, and whose state
and ledger load, counts; resuming takes the newest such one and says why it skipped any
newer.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.grpo.ledger import Ledger, LedgerError

TAG = re.compile(r"^step(\d+)$")


@dataclass
class RunCheckpoint:
    folder: Path  # the run's checkpoints folder (DeepSpeed's save dir)
    tag: str
    step: int
    state: dict  # the driver's state
    ledger: Ledger


def write_json_atomic(path: Path, payload: dict) -> None:
    """Temp file in the same folder, fsync, rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_run_checkpoint(folder: Path, step: int, learner_files: list[str], state: dict, ledger: Ledger,
                        keep: int) -> None:
    """Write the driver state, ledger and manifest of ``step<step>`` (the learner's files exist
    already), then delete all but the newest ``keep`` complete checkpoints."""
    tag = f"step{step}"
    write_json_atomic(folder / f"{tag}.state.json", {"step": step, **state})
    ledger.save(folder / f"{tag}.ledger.json")
    files = [*learner_files, f"{tag}.state.json", f"{tag}.ledger.json"]
    write_json_atomic(folder / f"{tag}.manifest.json",
                      {"step": step, "files": {f: (folder / f).stat().st_size for f in files}})
    for old in [c for c in _tags(folder)][keep:]:
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
    newest = checkpoint.folder / f"{checkpoint.tag}.manifest.json" if checkpoint else None
    if final.is_file() and (newest is None or final.stat().st_mtime >= newest.stat().st_mtime):
        return Ledger.load(final), f"ledger of the finished run: {final}", eta
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no ledger yet (no ledger.json, no complete checkpoint)")
    return checkpoint.ledger, f"ledger at checkpoint {checkpoint.tag} ({checkpoint.step} steps)", eta


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (partly written, files missing or damaged)."""


def _load(folder: Path, tag: str) -> RunCheckpoint:
    manifest = folder / f"{tag}.manifest.json"
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
        state = json.loads((folder / f"{tag}.state.json").read_text())
        ledger = Ledger.load(folder / f"{tag}.ledger.json")
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
        (folder / f"{tag}.{suffix}.json").unlink(missing_ok=True)
