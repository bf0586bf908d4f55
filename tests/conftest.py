"""Session-wide fixtures: expensive things (a Ray cluster, the tiny workspace) start once."""
from __future__ import annotations

import os
import random

import pytest

from config import load_config

FAULT_SEED = int(os.environ.get("SEGRL_FAULT_SEED") or random.SystemRandom().randrange(2**31))
"""Where the fault-injection tests kill: new each session, printed in the header, repeated when given."""


def _fault_seed_line() -> str:
    return f"fault injection seed: {FAULT_SEED} (SEGRL_FAULT_SEED={FAULT_SEED} repeats its kill points)"


def pytest_report_header(config) -> str:
    return _fault_seed_line()


def pytest_terminal_summary(terminalreporter) -> None:
    """Also at the end, where `pytest -q` (which drops the header) still prints it."""
    terminalreporter.write_line(_fault_seed_line())


@pytest.fixture(scope="session")
def fault_seed() -> int:
    return FAULT_SEED

# Pretraining budgets cut for the suite (the main job runs the defaults; their figures are in its report).
TINY_OVERRIDES = ["data.synthetic.n_train=40", "data.synthetic.n_val=10", "data.synthetic.n_test=10",
                  "model.tiny.vision_pretrain.steps=300", "model.tiny.lm_align.steps=60",
                  "model.tiny.lm_align.eval_scenes=20"]


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    """configs/tiny.yaml with a small synthetic set, everything under a temporary work dir."""
    work = tmp_path_factory.mktemp("work")
    return load_config("configs/tiny.yaml", [f"paths.work_dir={work}", *TINY_OVERRIDES])


@pytest.fixture(scope="session")
def tiny_workspace(tiny_config):
    """Synthetic data + tiny models built once for the session (seconds)."""
    from pipelines.build import build_synthetic, build_tiny

    data = build_synthetic(tiny_config)
    tiny = build_tiny(tiny_config)
    return {"config": tiny_config, "data": data, "tiny": tiny}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session; actors get one thread each."""
    from cluster.local import connect, disconnect

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    connect(num_cpus=2)
    yield
    disconnect()


@pytest.fixture(scope="session")
def tiny_features(tiny_workspace, ray_cluster):
    """The tiny workspace's feature cache, filled once (Ray Data)."""
    from pipelines.precompute import precompute

    return precompute(tiny_workspace["config"], splits=["train", "val", "test"], batch_size=16)


@pytest.fixture(scope="session")
def default_world(tmp_path_factory, ray_cluster):
    """configs/tiny.yaml as the main job runs it (6,000 training samples, every pretraining budget and SAE
    default) with a smaller val/test and SFT for 3 epochs, not the main job's 7 (1,125 steps, for the suite's time),
    built, featurised and with its SAE trained once for the modules that check the quality of those defaults
    (minutes)."""
    from pipelines.build import build_synthetic, build_tiny
    from pipelines.precompute import precompute
    from pipelines.sae_train import run_sae_train

    work = tmp_path_factory.mktemp("default-world")
    config = load_config("configs/tiny.yaml", [f"paths.work_dir={work}", "data.synthetic.n_val=64",
                                               "data.synthetic.n_test=4", "sft.eval_samples=64",
                                               "sft.epochs=3"])
    build_synthetic(config)
    build_tiny(config)
    precompute(config, splits=["train", "val"], batch_size=64)
    run_sae_train(config, progress=False)
    return config


@pytest.fixture(scope="session")
def tiny_sae(tiny_workspace, tiny_features):
    """A quickly trained SAE on the tiny policy's layer-k states (a few epochs)."""
    from pipelines.sae_train import run_sae_train

    config = tiny_workspace["config"].model_copy(deep=True)
    config.model.sae.epochs = 2
    return run_sae_train(config, progress=False)
