"""Helpers for tests of refused input: a crafted image header, the CLI's one-line refusal, nothing written."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pipelines.cli import main


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): what a crafted upload looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def refuse(argv: list[str], capsys, *fragments: str) -> str:
    """Run the CLI; expect exit 2 and one error line (no traceback) holding every fragment."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"segrl {argv[0]}: error: "), err
    assert all(f in err for f in fragments), err
    return err


def nothing_written(folder: Path, *names: str) -> None:
    """No output under these names and no temporary file left in ``folder``."""
    assert not [n for n in names if (folder / n).exists()]
    assert not list(folder.glob(".*.tmp")) if folder.exists() else True
