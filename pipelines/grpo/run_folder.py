"""A GRPO run's folder (``train.output``): what makes a folder one, and when a run may write into it.

Why: a run must never write into another run's folder (an SFT run's, whose model it would
replace) nor mix two runs' metrics and checkpoints in one. A fresh ``segrl train`` writes
``run.json`` into a new or empty folder before anything else; ``--resume`` continues only
a folder with that marker (or the shape of a run from before it); a fresh run into a
folder with outputs is refused unless ``--overwrite`` is given, which replaces only a
GRPO run's folder (a start that failed before any output, leaving the marker and config,
is no run to protect). No run writes into the folder it starts from. Every check happens
before anything is written.

``train.resume: auto`` lets one command both start and continue a run (a Kubernetes job
retried, a pod rescheduled): in a GRPO run folder it resumes, in a new or empty folder it
starts; a folder holding anything else is refused, as a fresh run would refuse it.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from pipelines.grpo.run_checkpoints import (
    CheckpointError,
    RunCheckpoint,
    checkpoint_tags,
    latest_checkpoint,
    write_json_atomic,
)

MARKER = "run.json"
KIND = "segrl-grpo-run"


class RunFolderError(ValueError):
    """``train.output`` cannot take this run; the message says why and what to do."""


def is_grpo_run(run_dir: Path) -> bool:
    """``run_dir`` was started by ``segrl train``: it holds the marker, or (a run from before the
    marker) a config.yaml beside checkpoints/ or ledger.json, which no other command writes."""
    try:
        return json.loads((run_dir / MARKER).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return (run_dir / "config.yaml").is_file() and ((run_dir / "checkpoints").is_dir()
                                                         or (run_dir / "ledger.json").is_file())


def prepare_run_folder(run_dir: Path, init_from: str, resume: bool | str, overwrite: bool,
                       say: Callable[[str], None] = print) -> RunCheckpoint | None:
    """Check ``run_dir`` for a fresh or resumed run and make it ready; the checkpoint to resume
    from (None: the run starts at step 0). ``resume`` is True, False or "auto" (``train.resume``).

    Resuming a run that has checkpoints, none of them usable, is an error (each one's
    defect is reported through ``say``): starting over would replace the run.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"train.output {run_dir} is a file, not a folder")
    if resume == "auto":
        resume = _auto_resume(run_dir, overwrite)
        say(f"[segrl] train.resume=auto: {'continuing the run in' if resume else 'starting a new run in'} {run_dir}")
    if resume and not is_grpo_run(run_dir):
        raise RunFolderError(f"{run_dir} is not a GRPO run folder (no {MARKER}, which `segrl train` writes "
                             "first); --resume continues a run that `segrl train` started there")
    init = Path(init_from)
    if init.exists() and (init.resolve().is_relative_to(run_dir.resolve())
                          or run_dir.resolve().is_relative_to(init.resolve())):
        raise RunFolderError(f"train.output {run_dir} and train.init_from {init} overlap: the run would write into "
                             "the model it starts from; choose another train.output")
    if resume:
        return _resume_point(run_dir / "checkpoints", say)
    if run_dir.exists() and any(p.name not in (MARKER, "config.yaml") for p in run_dir.iterdir()):
        if not overwrite:
            raise RunFolderError(f"train.output {run_dir} is not empty: continue the run there with `segrl train "
                                 f"--resume {run_dir}`, replace it with --overwrite, or choose another train.output")
        if not is_grpo_run(run_dir):
            raise RunFolderError(f"--overwrite replaces only a GRPO run folder, and {run_dir} has no {MARKER}: "
                                 "move it away or choose another train.output")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / MARKER, {"kind": KIND})
    return None


def _auto_resume(run_dir: Path, overwrite: bool) -> bool:
    """Whether ``train.resume: auto`` continues the run in ``run_dir`` (else it starts one there)."""
    if overwrite:
        raise RunFolderError(f"train.resume=auto continues the run in {run_dir} and --overwrite replaces it: "
                             "give one of them")
    if is_grpo_run(run_dir):
        return True
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise RunFolderError(f"train.resume=auto: train.output {run_dir} is not empty and holds no GRPO run (no "
                             f"{MARKER}, which `segrl train` writes first): choose another train.output")
    return False


def _resume_point(folder: Path, say: Callable[[str], None]) -> RunCheckpoint | None:
    skipped: list[str] = []

    def report(line: str) -> None:
        skipped.append(line)
        say(line)

    checkpoint = latest_checkpoint(folder, report)
    if checkpoint is None and checkpoint_tags(folder):
        newest = skipped[0].removeprefix("[segrl] skipping checkpoint ")
        raise CheckpointError(f"no usable checkpoint in {folder} (newest: {newest})")
    if checkpoint is None:
        say(f"[segrl] no checkpoint in {folder} yet: starting from step 0")
    return checkpoint
