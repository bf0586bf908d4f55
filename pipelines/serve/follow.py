"""``segrl serve --follow RUN``: which model folder of a GRPO run to serve, and when it changed.

A run writes its servable model folder at ``RUN/model`` (``segrl train`` at the end of the run,
again when a resumed run is extended); the folder appears whole (written beside, then renamed
in) and its ``manifest.json`` lists every file with its SHA-256. ``Follower.poll`` looks at the
manifest's bytes only (cheap, every ``serve.follow_interval_s``); when they change it checks the
whole folder (``verify_model_folder``) and hands out the next weights version. A folder that
fails the check is reported once and skipped until its manifest changes again. The run's
mid-run checkpoints are the learner's DeepSpeed state (partitioned weights and optimizer), not
model folders, so they are not served.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from data.integrity import IntegrityError
from models.segmenter import MANIFEST, verify_model_folder

MODEL = "model"


class Follower:
    """Polls ``run_dir``; versions count the model folders handed out (1, 2, ...)."""

    def __init__(self, run_dir: str | Path, say: Callable[[str], None] = print):
        self.folder = Path(run_dir) / MODEL
        self.say = say
        self.version = 0
        self.fingerprint: str | None = None  # of the manifest last looked at, served or refused

    def poll(self) -> tuple[str, int] | None:
        """(model folder, its version) when a new complete one is there, else None."""
        manifest = self.folder / MANIFEST
        try:
            fingerprint = hashlib.sha256(manifest.read_bytes()).hexdigest()
        except OSError:
            return None
        if fingerprint == self.fingerprint:
            return None
        self.fingerprint = fingerprint
        try:
            verify_model_folder(self.folder)
        except IntegrityError as exc:
            self.say(f"[segrl serve] not serving {self.folder}: {exc}")
            return None
        self.version += 1
        return str(self.folder.resolve()), self.version
