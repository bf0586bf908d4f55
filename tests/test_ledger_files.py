"""The trajectory ledger on disk: round trips, atomic saves, damaged and malformed files refused naming the path."""
from __future__ import annotations

import json
import os

import pytest
from ledger_runs import document, small_run, train

from pipelines.grpo.ledger import (
    ADMITTED,
    DROPPED,
    GENERATED,
    Ledger,
    LedgerCorruptError,
    LedgerError,
)


def test_round_trip_through_dict_and_file(tmp_path):
    run = small_run()
    copy = Ledger.from_dict(json.loads(json.dumps(run.to_dict())))
    path = tmp_path / "ledger.json"
    run.save(path)
    loaded = Ledger.load(path)
    for other in (copy, loaded):
        assert other.to_dict() == run.to_dict()
        assert other.summary() == run.summary()
        assert [other.state(i) for i in range(7)] == [run.state(i) for i in range(7)]
        assert other.attempts("e0:2") == 2 and other.next_group_id() == 7
        assert other.open_groups() == [6]
        other.dropped(6, "stale")  # the copy keeps working
        other.check(eta=1, batch_size=2)
    saved = json.loads(path.read_text())
    assert saved["format"] == 1 and len(saved["entries"]) == 7
    assert saved["entries"][3] == [3, "e0:3", DROPPED, 0, None, "stale"]


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    ledger = small_run()
    ledger.save(path)
    ledger.dropped(6, "stale")
    ledger.save(path)  # overwrite in place
    assert os.listdir(tmp_path) == ["ledger.json"]
    assert Ledger.load(path).state(6) == DROPPED
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    train(ledger, 7, "e0:6", version=1, step=2)
    with pytest.raises(OSError, match="disk gone"):
        ledger.save(path)
    assert path.read_bytes() == before  # the old ledger is intact
    assert os.listdir(tmp_path) == ["ledger.json"]


def _saved(tmp_path) -> tuple:
    path = tmp_path / "run" / "ledger.json"
    path.parent.mkdir()
    small_run().save(path)
    return path, path.read_bytes()


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(LedgerCorruptError, match=f"{path}: no ledger file"):
        Ledger.load(path)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[: len(b) // 2], "not a readable JSON ledger"),  # truncated
        (lambda b: b"\x00\xffgarbage", "not a readable JSON ledger"),
        (lambda b: b"[1, 2, 3]", "not a ledger document"),
        (lambda b: b.replace(b'"e0:3"', b'"e0:8"'), "checksum mismatch"),  # a flipped byte
        (lambda b: b.replace(b'"stale"', b'"stalf"'), "checksum mismatch"),
        (lambda b: b.replace(b'"format":1', b'"format":2'), "unknown format version 2"),
        (lambda b: b.replace(b'"sha256":"', b'"sha256":"0'), "checksum mismatch"),
    ],
)
def test_load_rejects_damaged_files_naming_the_path(tmp_path, damage, why):
    path, good = _saved(tmp_path)
    path.write_bytes(damage(good))
    assert path.read_bytes() != good
    with pytest.raises(LedgerCorruptError) as err:
        Ledger.load(path)
    assert str(path) in str(err.value) and why in str(err.value)
    assert isinstance(err.value, LedgerError)


@pytest.mark.parametrize(
    "rows",
    [
        [[0, "e0:0", "finished", None, None, None]],  # unknown state
        [[0, "e0:0", ADMITTED, None, None]],  # short row
        [[0, 7, ADMITTED, None, None, None]],  # sample not a string
        [[True, "e0:0", ADMITTED, None, None, None]],  # a bool is not an id
        [[0, "e0:0", GENERATED, "3", None, None]],  # version not an int
        [[0, "e0:0", ADMITTED, None, None, None], [0, "e0:1", ADMITTED, None, None, None]],
        {"0": ["e0:0", ADMITTED]},  # not a list
    ],
)
def test_load_rejects_malformed_entries_even_with_a_valid_checksum(tmp_path, rows):
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(document(rows)))
    with pytest.raises(LedgerCorruptError, match="malformed|not a list") as err:
        Ledger.load(path)
    assert str(path) in str(err.value)
