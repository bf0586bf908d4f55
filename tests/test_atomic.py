"""Atomic replacement: a failed write leaves the old file (or folder) and no temporary behind."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.atomic import atomic_folder, atomic_path, write_atomic


def _crash(*args):
    raise OSError("disk gone")


@settings(max_examples=30, deadline=None)
@given(old=st.binary(max_size=64), new=st.binary(max_size=64) | st.text(max_size=32),
       fail_at=st.sampled_from([None, "write", "replace"]))
def test_a_file_holds_the_old_or_the_new_content_and_no_temp_is_left(tmp_path_factory, old, new, fail_at):
    folder = tmp_path_factory.mktemp("atomic")
    path = folder / "state.json"
    path.write_bytes(old)
    expected = new.encode() if isinstance(new, str) else new
    with pytest.MonkeyPatch.context() as mp:
        if fail_at == "replace":
            mp.setattr(os, "replace", _crash)
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(expected[: len(expected) // 2])
                if fail_at == "write":
                    raise OSError("disk gone")
                tmp.write_bytes(expected)
        except OSError:
            assert fail_at is not None
            expected = old
    assert path.read_bytes() == expected
    assert os.listdir(folder) == ["state.json"]


def test_write_atomic_creates_and_replaces(tmp_path):
    path = tmp_path / "a.txt"
    write_atomic(path, "één")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["a.txt"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"v1")
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "w.bin").write_bytes(b"half")
        raise RuntimeError("crash while saving")
    assert (out / "sub" / "w.bin").read_bytes() == b"v1" and os.listdir(tmp_path) == ["model"]
    with atomic_folder(out) as tmp:
        (tmp / "w.bin").write_bytes(b"v2")
    assert os.listdir(out) == ["w.bin"] and os.listdir(tmp_path) == ["model"]


def test_a_folder_whose_rename_fails_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "w.bin").write_bytes(b"v1")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder's rename onto "model", after the old one moved aside
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"), atomic_folder(out) as tmp:
        (tmp / "w.bin").write_bytes(b"v2")
    assert (out / "w.bin").read_bytes() == b"v1" and os.listdir(tmp_path) == ["model"] and len(calls) == 3
