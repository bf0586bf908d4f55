"""Content manifests and feature-shard checksums: any change to a described file is caught and named."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.features import FeatureShardError, FeatureStore, read_shard
from data.integrity import IntegrityError, describe, files_under, verify

names = st.lists(st.sampled_from(["a.bin", "b/c.pt", "b/d/e.json", "f"]), min_size=1, max_size=4, unique=True)


@settings(max_examples=60, deadline=None)
@given(files=names.flatmap(lambda ns: st.fixed_dictionaries({n: st.binary(min_size=1, max_size=300) for n in ns})),
       data=st.data())
def test_a_described_folder_verifies_and_any_changed_byte_is_named(files, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
        listed = describe(root, files_under(root))
        assert set(listed) == set(files) and all(e["size"] == len(files[n]) for n, e in listed.items())
        verify(root, listed, files_under(root), "manifest")
        victim = data.draw(st.sampled_from(sorted(files)))
        content = bytearray(files[victim])
        at = data.draw(st.integers(0, len(content) - 1))
        content[at] ^= data.draw(st.integers(1, 255))
        (root / victim).write_bytes(bytes(content))
        with pytest.raises(IntegrityError, match=f"{root / victim}: damaged"):
            verify(root, listed, files_under(root), "manifest")


@pytest.mark.parametrize("listed, problem", [
    ({"../x": {"size": 1, "sha256": "0" * 64}}, "not a path inside its folder"),
    ({"/etc/passwd": {"size": 1, "sha256": "0" * 64}}, "not a path inside its folder"),
    ({"a": 5}, "has no size and SHA-256"),
    ({"a": {"size": 1, "sha256": "not-hex"}}, "has no size and SHA-256"),
    ([], "no file list"),
])
def test_a_malformed_manifest_is_refused_before_any_file_is_read(tmp_path, listed, problem):
    with pytest.raises(IntegrityError, match=problem):
        verify(tmp_path, listed, [], "manifest")


def test_a_shard_records_its_checksum_and_non_finite_features_are_never_cached(tmp_path):
    store = FeatureStore(tmp_path, "key")
    feats = {"vision": torch.ones(4, 2), "sam": torch.zeros(2, 2, 2),
             "sam_input_size": torch.tensor([2, 2]), "original_size": torch.tensor([4, 4])}
    path = store.put("ab" * 32, feats)
    assert store.check("ab" * 32) is None and store.check("cd" * 32) == "missing"
    torch.testing.assert_close(read_shard(path)["sam"], feats["sam"])
    with pytest.raises(ValueError, match=r"non-finite values in \['vision'\]: not cached"):
        store.put("ef" * 32, {**feats, "vision": torch.full((4, 2), float("inf"))})
    assert not store.has("ef" * 32)
    path.write_bytes(path.read_bytes()[:-1])
    assert "truncated or overwritten" in store.check("ab" * 32)
    with pytest.raises(FeatureShardError, match=f"{path}: feature shard of image {'ab' * 32}: .*segrl precompute"):
        store.get("ab" * 32)
