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
    """Append-only: a resumed run continues the same files and step numbering.

    ``resume_after``: the step a resumed run restarts after; lines of later steps (written
    before the crash, then rolled back with the weights) are removed, and TensorBoard
    purges its events of those steps.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_after: int | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if resume_after is not None and path.exists():
            kept = [row for row in read_metrics(self.dir) if row["step"] <= resume_after]
            path.write_text("".join(json.dumps(row, default=float) + "\n" for row in kept))
        self.jsonl = open(path, "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_after is None else resume_after + 1
            self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

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
    """The rows of metrics.jsonl; a torn last line (the run was killed mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
