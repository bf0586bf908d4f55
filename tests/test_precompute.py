"""Feature cache: encodes once per image, skips done work, reports broken images and goes on."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests_support import overrides_for

from config import load_config
from config.builders import feature_store
from data.features import FeatureStore, content_hash, encoder_key
from data.schema import read_samples, resolve_image
from models.encoders import FrozenEncoders
from pipelines.precompute import dataset_images, precompute


@pytest.fixture(scope="module")
def first_run(tiny_workspace, ray_cluster, tmp_path_factory):
    """The first precompute into a cache of this module's own (other tests may fill the shared one)."""
    cache = tmp_path_factory.mktemp("feature-cache")
    config = load_config("configs/tiny.yaml", [*overrides_for(tiny_workspace["config"]), f"paths.cache_dir={cache}"])
    return config, precompute(config, batch_size=8)


def test_every_image_encoded_once(first_run):
    config, report = first_run
    n_images = len(dataset_images(config, ["train", "val"]))
    assert report.images == n_images > 0
    assert (report.encoded, report.cached, report.failures) == (n_images, 0, [])
    assert feature_store(config).count() == n_images


def test_shard_matches_direct_encoder_call(first_run):
    config, _ = first_run
    root = Path(config.resolve_path(config.data.root))
    sample = read_samples(root / "val.parquet")[0]
    path = resolve_image(root / "val.parquet", sample.image_path)
    shard = feature_store(config).get(content_hash(path))
    encoders = FrozenEncoders("tiny", config.resolve_path(config.model.name_or_path), "tiny", None)
    direct = encoders([np.asarray(Image.open(path).convert("RGB"))])[0]
    assert shard.keys() == direct.keys()
    for key in shard:
        torch.testing.assert_close(shard[key], direct[key])
    assert shard["vision"].shape == (64, 64)  # (64/8)^2 patches x vision hidden
    assert tuple(shard["original_size"].tolist()) == (sample.height, sample.width)


def test_rerun_skips_done_work(first_run):
    config, report = first_run
    again = precompute(config, batch_size=8)
    assert (again.encoded, again.cached, again.failures) == (0, report.images, [])


def test_broken_images_are_reported_and_the_rest_cached(first_run, tmp_path):
    config, _ = first_run
    root = Path(config.resolve_path(config.data.root))
    copy = tmp_path / "synthetic"
    shutil.copytree(root, copy)
    images = sorted((copy / "images").glob("train-*.png"))  # cached before: only the test split is new
    images[0].write_bytes(b"not a png at all")
    images[1].unlink()
    broken = config.model_copy(update={"data": config.data.model_copy(update={"root": str(copy)})})
    report = precompute(broken, splits=["train", "val", "test"], batch_size=8)
    failed = {Path(p).name: why for p, why in report.failures}
    assert set(failed) == {images[0].name, images[1].name}
    assert "UnidentifiedImageError" in failed[images[0].name]
    assert "FileNotFoundError" in failed[images[1].name]
    n_test = len(dataset_images(broken, ["test"]))
    assert report.encoded == n_test  # the test split was not cached before
    assert report.cached + report.encoded + len(report.failures) == report.images
    assert any("FAILED" in line and images[0].name in line for line in report.lines())


def test_store_is_atomic_and_keyed_by_encoder(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"weights-1")
    b.write_bytes(b"weights-2")
    assert encoder_key(a) != encoder_key(b)
    assert encoder_key(a) == encoder_key(a)
    store = FeatureStore(tmp_path / "cache", encoder_key(a))
    feats = {"vision": torch.ones(4, 2), "sam": torch.zeros(2, 2, 2),
             "sam_input_size": torch.tensor([2, 2]), "original_size": torch.tensor([4, 4])}
    store.put("ab" * 32, feats)
    assert store.has("ab" * 32) and not list(store.root.rglob("*.tmp"))
    torch.testing.assert_close(store.get("ab" * 32)["vision"], feats["vision"])
    with pytest.raises(ValueError, match="lacks"):
        store.put("cd" * 32, {"vision": torch.ones(1)})
    with pytest.raises(FileNotFoundError, match="segrl precompute"):
        store.get("ef" * 32)
