"""Content manifests: the files a writer wrote, with their sizes and SHA-256, checked before anything is loaded.

Why: a file that was torn, bit-flipped, removed, or slipped in afterwards must never be
loaded as if it were the one written. A writer lists every file it wrote (``describe``)
in a manifest it writes last; a reader checks the folder against it (``verify``), which
names the first file that is missing, damaged or not listed. Hashing reads each file
once, several at a time (hashlib releases the GIL), about what loading it costs; the
loader then reads it again from the page cache.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 << 20
_THREADS = 8


class IntegrityError(ValueError):
    """A file or folder that cannot be trusted; the message names the file and what is wrong."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_under(root: str | os.PathLike, folder: str = "") -> list[str]:
    """Every file under ``root/folder``, as sorted "/"-separated names relative to ``root``."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in (root / folder).rglob("*") if p.is_file())


def describe(root: str | os.PathLike, names: Iterable[str]) -> dict[str, dict]:
    """{name: {"size": bytes, "sha256": hex}} of the files ``names`` (relative to ``root``)."""
    root, names = Path(root), sorted(names)
    with ThreadPoolExecutor(min(_THREADS, max(len(names), 1))) as pool:
        hashes = list(pool.map(lambda n: file_sha256(root / n), names))
    return {n: {"size": (root / n).stat().st_size, "sha256": h} for n, h in zip(names, hashes)}


def verify(root: str | os.PathLike, listed: object, present: Iterable[str], manifest: str | os.PathLike) -> None:
    """Raise IntegrityError unless the files ``present`` under ``root`` are exactly those ``listed``
    (a ``describe`` result read from ``manifest``), each of its size and SHA-256.

    Cheap checks first (names, sizes); the hashes only when all of those pass.
    """
    root = Path(root)
    entries = _entries(listed, manifest)
    present = set(present)
    for name in sorted(set(entries) | present):
        if name not in present:
            raise IntegrityError(f"{root / name}: missing (listed in {manifest})")
        if name not in entries:
            raise IntegrityError(f"{root / name}: not listed in {manifest} (added after it was written)")
        if (size := (root / name).stat().st_size) != entries[name]["size"]:
            raise IntegrityError(f"{root / name}: {size} bytes, {manifest} says {entries[name]['size']} (truncated "
                                 f"or replaced)")
    actual = describe(root, entries)
    for name, entry in entries.items():
        if actual[name]["sha256"] != entry["sha256"]:
            raise IntegrityError(f"{root / name}: damaged (its SHA-256 differs from {manifest})")


def _entries(listed: object, manifest) -> dict[str, dict]:
    """The manifest's file entries, each name a plain relative path: a crafted ``../`` never leaves the folder."""
    if not isinstance(listed, dict):
        raise IntegrityError(f"{manifest}: no file list with content hashes (written by an older segrl?)")
    for name, entry in listed.items():
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise IntegrityError(f"{manifest}: file name {name!r} is not a path inside its folder")
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
            raise IntegrityError(f"{manifest}: entry {name!r} has no size and SHA-256 (written by an older segrl?)")
    return listed
