"""Per-step metrics a researcher can plot, sent to the logger backends a run names (`train.loggers`).

Backends, by name (``LOGGERS``): ``jsonl`` (metrics.jsonl in the run folder, what `segrl plot`
reads), ``tensorboard`` (run folder/tensorboard), ``wandb`` and ``mlflow``. The last two are
optional packages, imported only when asked for; `require_loggers` names the missing one in
one line before a run starts. Nested dicts are flattened with "/" (`reward/total`,
`time/rollout`), so every backend sees the same names; non-numeric values go to JSONL only.

Weights & Biases takes its project from WANDB_PROJECT (default "segrl") and writes under the
run folder (WANDB_MODE=offline runs without an account). MLflow logs to MLFLOW_TRACKING_URI;
unset, to a file store in the run folder (run folder/mlruns), experiment MLFLOW_EXPERIMENT_NAME
(default "segrl"). A resumed run is a new W&B / MLflow run continuing the step numbers: those
services cannot take back the steps a crash rolled back, as JSONL and TensorBoard do.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

from config import ConfigError
from rewards.registry import Registry

LOGGERS: Registry = Registry("logger backend")
DEFAULT_LOGGERS = ("jsonl", "tensorboard")
OPTIONAL_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}
"""Backend -> (module it imports, what to pip install)."""


def flatten(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def scalars(flat: dict) -> dict[str, float]:
    """The finite numbers of a flat metrics dict: what the plotting services accept."""
    return {name: float(value) for name, value in flat.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def require_loggers(names: Iterable[str]) -> None:
    """Fail in one line if a named backend is unknown or its package is not installed."""
    for name in names:
        LOGGERS.get(name)
        module, package = OPTIONAL_PACKAGES.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.loggers: '{name}' needs the {module} package, which is not installed "
                              f"(pip install {package}, or pip install 'segrl[loggers]')")


@LOGGERS.register("jsonl")
class JsonlLogger:
    """metrics.jsonl, append-only; a resumed run drops the lines of steps after ``resume_after``."""

    def __init__(self, run_dir: Path, resume_after: int | None):
        path = run_dir / "metrics.jsonl"
        if resume_after is not None and path.exists():
            kept = [row for row in read_metrics(run_dir) if row["step"] <= resume_after]
            path.write_text("".join(json.dumps(row, default=float) + "\n" for row in kept))
        self.file = open(path, "a")  # noqa: SIM115 - open for the run, closed by close()

    def log(self, step: int, flat: dict) -> None:
        self.file.write(json.dumps({"step": step, **flat}, default=float) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@LOGGERS.register("tensorboard")
class TensorBoardLogger:
    """Scalars under run folder/tensorboard; a resumed run purges the events of rolled-back steps."""

    def __init__(self, run_dir: Path, resume_after: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_after is None else resume_after + 1
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, flat: dict) -> None:
        for name, value in scalars(flat).items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


@LOGGERS.register("wandb")
class WandbLogger:
    """One W&B run per attempt, named after the run folder, files under it."""

    def __init__(self, run_dir: Path, resume_after: int | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "segrl"), name=run_dir.name,
                              dir=str(run_dir), reinit="create_new",
                              config={"run_dir": str(run_dir), "resumed_after_step": resume_after})

    def log(self, step: int, flat: dict) -> None:
        self.run.log(scalars(flat), step=step)

    def close(self) -> None:
        self.run.finish()


@LOGGERS.register("mlflow")
class MlflowLogger:
    """One MLflow run per attempt, through a client (no process-global active run)."""

    def __init__(self, run_dir: Path, resume_after: int | None):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # MLflow's own default is an SQLite file in the working directory
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to file stores
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "segrl")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        tags = {"run_dir": str(run_dir)} | ({} if resume_after is None else {"resumed_after_step": str(resume_after)})
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id

    def log(self, step: int, flat: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, value, now, step)
                                                    for name, value in scalars(flat).items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class MetricsLog:
    """Fans each step's metrics out to the named backends; a resumed run continues the step numbers.

    ``resume_after``: the step a resumed run restarts after; JSONL lines and TensorBoard events of
    later steps (written before the crash, then rolled back with the weights) are removed.
    """

    def __init__(self, run_dir: str | Path, loggers: Iterable[str] = DEFAULT_LOGGERS,
                 resume_after: int | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        names = list(dict.fromkeys(loggers))
        require_loggers(names)
        self.backends = [LOGGERS.get(name)(self.dir, resume_after) for name in names]

    def log(self, step: int, metrics: dict) -> dict:
        flat = flatten(metrics)
        for backend in self.backends:
            backend.log(step, flat)
        return flat

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (the run was killed mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
