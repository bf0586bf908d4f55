"""``segrl serve --follow RUN``: which model folder of a GRPO run to serve, and when it changed.

A run writes its servable model folder at ``RUN/model``: while it trains, every
``train.publish_every`` steps (by default with each checkpoint; ``pipelines.grpo.publish``),
and at its end. Each time the folder is written beside and renamed in whole, and its
``manifest.json`` lists every file with its SHA-256. ``Follower.poll`` looks at the manifest's
bytes only (cheap, every ``serve.follow_interval_s``); when they change it takes a snapshot of
the folder and checks it (``verify_model_folder``) before handing out the next weights version.

Why a snapshot: the replicas load the folder after the poll, over seconds to minutes, and the
run may rename the next one in meanwhile; a replica reading ``RUN/model`` could then read
half of each. The snapshot (``RUN/serving/<follower>/v<N>``) hard-links the folder's files (a
copy where links fail): the run never rewrites a file a manifest lists, it only renames new
folders in, so a snapshot that checks out against its own manifest stays whole for as long as
it is kept. A snapshot caught mid-rename fails the check and is dropped; the renamed folder's new
manifest is picked up at the next poll. A folder that fails the check is reported once and
skipped until its manifest changes again. The newest ``KEPT`` snapshots are kept (the
segmentation replicas may still need the previous version's head); ``close`` removes the
follower's own. Following needs write access to ``RUN``; a finished run's model can be served
read-only with ``--checkpoint RUN/model``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from data.integrity import IntegrityError
from models.segmenter import MANIFEST, verify_model_folder
from pipelines.grpo.publish import MODEL

SNAPSHOTS = "serving"
KEPT = 2
"""Snapshots kept: the served version and the one before it (``cores.HEADS_KEPT``)."""


def link_or_copy(source: str, target: str) -> None:
    """A hard link (same file, no bytes copied), or a copy where the file system refuses one."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class Follower:
    """Polls ``run_dir``; versions count the model folders handed out (1, 2, ...)."""

    def __init__(self, run_dir: str | Path, say: Callable[[str], None] = print):
        self.folder = Path(run_dir) / MODEL
        self.snapshots = Path(run_dir) / SNAPSHOTS / f"{os.getpid()}-{os.urandom(3).hex()}"
        self.say = say
        self.version = 0
        self.served: str | None = None  # the snapshot last handed out
        self.fingerprint: str | None = None  # of the manifest last looked at, served or refused

    def poll(self) -> tuple[str, int] | None:
        """(a snapshot of the model folder, its version) when a new complete one is there, else None."""
        try:
            fingerprint = hashlib.sha256((self.folder / MANIFEST).read_bytes()).hexdigest()
        except OSError:
            return None
        if fingerprint == self.fingerprint:
            return None
        self.fingerprint = fingerprint
        snapshot = self.snapshots / f"v{self.version + 1}"
        try:
            shutil.rmtree(snapshot, ignore_errors=True)
            shutil.copytree(self.folder, snapshot, copy_function=link_or_copy)
            verify_model_folder(snapshot)
        except (IntegrityError, OSError) as exc:  # shutil.Error is an OSError
            shutil.rmtree(snapshot, ignore_errors=True)
            self.say(f"[segrl serve] not serving {self.folder}: {exc}")
            return None
        self.fingerprint = hashlib.sha256((snapshot / MANIFEST).read_bytes()).hexdigest()
        self.version += 1
        self.served = str(snapshot.resolve())
        for old in sorted(self.snapshots.iterdir(), key=lambda p: -int(p.name[1:]))[KEPT:]:
            shutil.rmtree(old, ignore_errors=True)
        return self.served, self.version

    def close(self) -> None:
        """Remove this follower's snapshots (the replicas using them are gone by then)."""
        shutil.rmtree(self.snapshots, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.snapshots.parent.rmdir()  # only when no other follower's are there
