"""Replace a file or a folder so that a crash leaves the old version or the new one, never half of one.

The new version is written under a temporary name beside the target (the same file system,
so the rename is atomic), flushed to disk, renamed over the target, and then the parent
folder is flushed too, so the rename itself survives a power cut. A failed write removes
its temporary. Temporary names start with a dot and end in ``.tmp``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A new empty file beside ``target`` to write to (by any writer that takes a path); on a
    clean exit it replaces ``target``, on an error it is removed and ``target`` stays as it was."""
    target = Path(target)
    tmp = _temp_name(target)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(target.parent)


def write_atomic(target: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``target`` with ``data`` (str is written as UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder beside ``target`` to fill; on a clean exit it replaces ``target``.

    Two folders cannot swap in one rename: the old one is moved aside first and deleted once
    the new one is in place (a crash between the two renames leaves it under its aside name).
    """
    target = Path(target)
    tmp, aside = _temp_name(target), _temp_name(target)
    tmp.mkdir()
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(folder) / name)
            _fsync(Path(folder))
        with contextlib.suppress(FileNotFoundError):
            target.rename(aside)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not target.exists():
            aside.rename(target)
        raise
    _fsync(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.urandom(4).hex()}.tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
