"""Logger backends (`train.loggers`): the registry matches the config, a missing package is one clear line,
and Weights & Biases (offline) and MLflow (a file store) receive exactly the logged numbers."""
from __future__ import annotations

import importlib.util
import json
import math
import time
import typing

import pytest

from config import ConfigError, load_config
from config.schema import TrainConfig
from pipelines.cli import main
from pipelines.grpo.metrics_log import (
    DEFAULT_LOGGERS,
    LOGGERS,
    MetricsLog,
    read_metrics,
    require_loggers,
)

STEPS = {1: {"reward": {"total": 0.25, "mask": 0.5}, "note": "warmup", "kl": float("nan")},
         2: {"reward": {"total": 0.75, "mask": 0.125}, "grad_norm": 3},
         3: {"reward": {"total": -1.5, "mask": 0.0}, "flag": True}}
EXPECTED = {1: {"reward/total": 0.25, "reward/mask": 0.5}, 2: {"reward/total": 0.75, "reward/mask": 0.125,
                                                                  "grad_norm": 3.0},
            3: {"reward/total": -1.5, "reward/mask": 0.0}}
"""What the plotting services must get: finite numbers only (no strings, NaN or bools)."""


def log_steps(run_dir, loggers) -> None:
    log = MetricsLog(run_dir, loggers)
    for step, metrics in STEPS.items():
        log.log(step, metrics)
    log.close()


def test_registry_names_are_the_configs_choices_and_defaults_agree():
    (choice,) = typing.get_args(TrainConfig.model_fields["loggers"].annotation)
    assert set(typing.get_args(choice)) == set(LOGGERS.names()) == {"jsonl", "tensorboard", "wandb", "mlflow"}
    assert load_config("configs/tiny.yaml").train.loggers == list(DEFAULT_LOGGERS) == ["jsonl", "tensorboard"]


def test_a_missing_package_is_one_line_naming_what_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.loggers: 'wandb' needs the wandb package.*pip install wandb"):
        require_loggers(["jsonl", "wandb"])
    require_loggers(["jsonl", "tensorboard", "mlflow"])  # installed: no error
    assert main(["train", "train.loggers=[jsonl,wandb]"]) == 2  # before any Ray cluster or actor starts
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install wandb" in err


def wandb_records(run_dir) -> list:
    """The offline run file's records: a leveldb-style log of protobuf Records (32 KiB blocks, 7-byte
    file header, each chunk: crc32 4, length 2 little-endian, type 1 (full, first, middle, last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, pending, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind not in (1, 4):
            continue
        records.append(pb.Record())
        records[-1].ParseFromString(pending)
    return records


def wandb_history(run_dir, timeout_s: float = 60.0) -> dict[int, dict[str, float]]:
    """step -> logged numbers, once the run's exit record is on disk (wandb-core writes the file after
    ``finish`` returns)."""
    deadline = time.monotonic() + timeout_s
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_dir)):
        assert time.monotonic() < deadline, "the offline run file never got its exit record"
        time.sleep(0.2)
    history = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def test_wandb_offline_run_holds_the_logged_numbers(tmp_path, monkeypatch):
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_steps(tmp_path, ["jsonl", "wandb"])
    assert wandb_history(tmp_path) == EXPECTED
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # the JSONL sink ran beside it


def test_mlflow_file_store_holds_the_logged_numbers(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "segrl-test")
    log_steps(tmp_path / "run", ["mlflow"])
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("segrl-test").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    logged: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            logged.setdefault(m.step, {})[key] = m.value
    assert logged == EXPECTED
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # only the named backends write


def test_mlflow_defaults_to_a_file_store_in_the_run_folder(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    log_steps(tmp_path, ["mlflow"])
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("segrl").experiment_id])
    history = client.get_metric_history(run.info.run_id, "reward/total")
    assert [(m.step, m.value) for m in history] == [(s, EXPECTED[s]["reward/total"]) for s in (1, 2, 3)]
    assert all(math.isfinite(v) for v in run.data.metrics.values())
