"""The learner's DeepSpeed checkpoint files, read without ever running code from them.

DeepSpeed writes and reads its checkpoint files through the engine's ``checkpoint_engine``;
its own reads them with ``torch.load(weights_only=False)``, which unpickles anything, so a
crafted ``.pt`` file in a run folder would run its payload in a learner rank on resume.
``WeightsOnlyEngine`` takes that engine's place: files are written in torch's zip format
and read with ``weights_only=True``, which rebuilds only tensors, containers and plain
values, plus ``ALLOWED_GLOBALS``: the classes ZeRO-3's optimizer state pickles (its static
or dynamic loss scaler, its stage enum), restored as data (a scaler's attributes set, an
enum member looked up by value). The learner's own client state holds only plain values
and tensors (``rng_states``).

``check_globals`` lists what a file refers to beyond that by reading its pickle's opcodes,
without loading it: the driver checks every file before any learner starts. That check
only sees names a pickle spells out, so the weights-only load stays the real gate.
"""
from __future__ import annotations

import importlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

from data.integrity import IntegrityError

ALLOWED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


class UnsafeCheckpointError(IntegrityError):
    """A checkpoint file that would run code or build objects beyond tensors and plain data if loaded."""


def check_globals(path: str | Path) -> None:
    """Raise UnsafeCheckpointError if ``path`` is not a torch zip file that refers to allowed globals only."""
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(f"{path}: not a torch zip-format file (segrl writes checkpoints in that format)")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise UnsafeCheckpointError(f"{path}: unreadable pickle ({type(exc).__name__}: {exc})") from None
    if unsafe := sorted(set(names) - set(ALLOWED_GLOBALS)):
        raise UnsafeCheckpointError(f"{path}: refers to {', '.join(unsafe)}; a checkpoint holds tensors and plain "
                                    "data only, so it is refused (crafted or written by other code)")


def load_weights_only(path: str | Path, map_location=None):
    """``torch.load`` that rebuilds tensors, plain data and ``ALLOWED_GLOBALS`` only."""
    allowed = [getattr(importlib.import_module(module), name)
               for module, _, name in (g.rpartition(".") for g in ALLOWED_GLOBALS)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL (\S+)", str(exc))
        reason = f"it refers to {named.group(1)}" if named else str(exc).splitlines()[0]
        raise UnsafeCheckpointError(f"{path}: refused to load: {reason} (a checkpoint holds tensors and plain data "
                                    "only)") from None


class WeightsOnlyEngine:
    """A DeepSpeed checkpoint engine whose reads are weights-only and whose writes are zip files;
    every other call goes to the engine it wraps (DeepSpeed's own)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        torch.save(state_dict, path)

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location)
