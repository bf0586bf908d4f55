"""Per-step metrics a researcher can plot: JSONL under the run folder, and TensorBoard.

Nested dicts are flattened with "/" (`reward/total`, `time/rollout`), so the
same names appear in both sinks; non-numeric values go to JSONL only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def flatten(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


class MetricsLog:
    """Append-only: a resumed run continues the same files and step numbering."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> dict:
        flat = flatten(metrics)
        self.jsonl.write(json.dumps({"step": step, **flat}, default=float) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in flat.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(name, value, step)
        return flat

    def close(self) -> None:
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
