"""The supervised warm start does its job: the policy emits the format and segments better than at the start.

The main job's SFT stage as it is (2000 synthetic training samples, 3 epochs) in a
workspace of its own, val measured on 64 samples before and after (greedy decoding).
The untrained policy never emits `<SEG>`, so its gIoU is the share of false premises
(each scored 1 for "no mask"): beating it takes real masks on the samples that have
an object. The slowest test of the suite (minutes), an end-to-end check of `segrl sft`.
"""
from __future__ import annotations

import pytest

from config import load_config

OVERRIDES = ["data.synthetic.n_val=64", "data.synthetic.n_test=4", "model.sae.epochs=4", "sft.eval_samples=64"]


@pytest.fixture(scope="module")
def report(tmp_path_factory, ray_cluster):
    from pipelines.build import build_synthetic, build_tiny
    from pipelines.precompute import precompute
    from pipelines.sae_train import run_sae_train
    from pipelines.sft import run_sft

    work = tmp_path_factory.mktemp("sft-work")
    config = load_config("configs/tiny.yaml", [f"paths.work_dir={work}", *OVERRIDES])
    build_synthetic(config)
    build_tiny(config)
    precompute(config, splits=["train", "val"], batch_size=64)
    run_sae_train(config, progress=False)
    return run_sft(config, progress=False)


def test_sft_teaches_the_format(report):
    assert report["before"]["format_valid"] < 0.5
    assert report["after"]["format_valid"] > 0.9


def test_sft_raises_val_giou_above_its_start(report):
    before, after = report["before"], report["after"]
    assert after["giou"] > before["giou"]
    assert after["t_acc"] > 0.5  # it segments objects that exist instead of refusing everything
